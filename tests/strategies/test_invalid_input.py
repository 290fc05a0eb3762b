"""Bad input: a clear error naming what is wrong, and the server state never half-changes."""

from __future__ import annotations

import warnings

import pytest
import torch
from strategy_sim import play_round

from peft_fed.state import ServerState, Upload
from peft_fed.strategies import STRATEGIES, InvalidUploadError, NoValidUploadsError, get_strategy


def _snapshot(state: ServerState):
    flat, meta = state.state_dict()
    return {k: v.clone() for k, v in flat.items()}, dict(meta)


def _assert_unchanged(state, snapshot):
    flat, meta = state.state_dict()
    assert meta == snapshot[1]
    assert flat.keys() == snapshot[0].keys()
    assert all(torch.equal(flat[k], snapshot[0][k]) for k in flat)


def _good_uploads(build, specs, new_clients, method="fedit"):
    strategy = build(method, specs, invalid_upload="raise")
    state, _ = strategy.init_server(extras={"head.weight": torch.zeros(3, 4, dtype=torch.float64)})
    clients = new_clients(3)
    uploads = []
    generator = torch.Generator().manual_seed(0)
    for cid in clients:
        broadcast = strategy.configure(state, clients[cid])
        start = strategy.client_begin(broadcast, clients[cid])
        upload, _ = strategy.client_end(
            start.factors, {"head.weight": torch.randn(3, 4, generator=generator, dtype=torch.float64)},
            start, clients[cid], 5, 0,
        )
        uploads.append(upload)
    return strategy, state, uploads


def _corrupt(kind, upload, specs):
    layer = next(iter(specs))
    if kind == "missing_layer":
        del upload.layers[layer]
        return r"missing layer"
    if kind == "wrong_shape":
        upload.layers[layer]["B"] = torch.zeros(3, 3, dtype=torch.float64)
        return r"has shape \(3, 3\), expected \(12, 2\)"
    if kind == "nan":
        upload.layers[layer]["A"] = upload.layers[layer]["A"].clone()
        upload.layers[layer]["A"][0, 0] = float("nan")
        return r"contains NaN or Inf"
    if kind == "inf_extra":
        upload.extras["head.weight"] = upload.extras["head.weight"].clone()
        upload.extras["head.weight"][1, 1] = float("inf")
        return r"extra tensor 'head.weight' contains NaN or Inf"
    if kind == "no_samples":
        upload.num_samples = 0
        return r"num_samples must be positive"
    raise AssertionError(kind)


KINDS = ["missing_layer", "wrong_shape", "nan", "inf_extra", "no_samples"]


@pytest.mark.parametrize("kind", KINDS)
def test_raise_policy_rejects_whole_aggregation(build, specs, new_clients, kind):
    strategy, state, uploads = _good_uploads(build, specs, new_clients)
    pattern = _corrupt(kind, uploads[1], specs)
    snapshot = _snapshot(state)
    with pytest.raises(InvalidUploadError, match=rf"client '1' rejected: .*{pattern}"):
        strategy.aggregate(state, uploads)
    _assert_unchanged(state, snapshot)


@pytest.mark.parametrize("kind", KINDS)
def test_drop_policy_aggregates_the_rest(build, specs, new_clients, kind, caplog):
    strategy, state, uploads = _good_uploads(build, specs, new_clients)
    strategy.invalid_upload = "drop"
    clean = strategy.aggregate(state, [uploads[0], uploads[2]])
    _corrupt(kind, uploads[1], specs)
    snapshot = _snapshot(state)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # reported once, through the logger, not also as a warning
        result = strategy.aggregate(state, uploads)
    assert len([r for r in caplog.records if "rejected" in r.getMessage()]) == 1
    assert result.accepted == ["0", "2"] and [c for c, _ in result.dropped] == ["1"]
    for n in specs:
        assert torch.equal(result.state.layers[n]["B"], clean.state.layers[n]["B"])
    assert torch.equal(result.state.extras["head.weight"], clean.state.extras["head.weight"])
    _assert_unchanged(state, snapshot)


def test_all_invalid_raises_and_keeps_state(build, specs, new_clients):
    strategy, state, uploads = _good_uploads(build, specs, new_clients)
    strategy.invalid_upload = "drop"
    for u in uploads:
        u.num_samples = 0
    snapshot = _snapshot(state)
    with pytest.raises(NoValidUploadsError, match="server state is unchanged"):
        strategy.aggregate(state, uploads)
    _assert_unchanged(state, snapshot)


def test_duplicate_client_upload_is_rejected(build, specs, new_clients):
    strategy, state, uploads = _good_uploads(build, specs, new_clients)
    with pytest.raises(InvalidUploadError, match="duplicate"):
        strategy.aggregate(state, [uploads[0], uploads[0]])


@pytest.mark.parametrize("method", sorted(STRATEGIES))
def test_every_method_leaves_its_input_state_untouched(build, specs, new_clients, method):
    W = {n: torch.randn(s.out_features, s.in_features, dtype=torch.float64) for n, s in specs.items()}
    strategy = build(method, specs, **({"num_rounds": 2} if method == "fedsmoothlora" else {}))
    state, _ = strategy.init_server(base_weights=W)
    snapshot = _snapshot(state)

    def gradient_fn(offsets):
        return {n: torch.ones(s.out_features, s.in_features) for n, s in specs.items()}

    result, *_ = play_round(strategy, state, new_clients(2), ["0", "1"], {"0": 1, "1": 2},
                            torch.Generator().manual_seed(0), gradient_fn)
    _assert_unchanged(state, snapshot)
    assert result.state.round == state.round + 1


def test_unknown_method_names_the_choices(specs):
    with pytest.raises(ValueError, match=r"unknown federated method 'fedprox'.*fedsmoothlora"):
        get_strategy("fedprox", specs)


def test_aliases(specs):
    assert get_strategy("FedAvg", specs).name == "fedit"
    assert get_strategy("svd", specs).name == "flexlora"


def test_unknown_hyperparameter_is_a_type_error(specs):
    with pytest.raises(TypeError):
        get_strategy("fedit", specs, zeta=0.5)


def test_bad_policy(specs):
    with pytest.raises(ValueError, match="invalid_upload"):
        get_strategy("fedit", specs, invalid_upload="ignore")


def test_upload_with_unknown_layer(build, specs, new_clients):
    strategy, state, uploads = _good_uploads(build, specs, new_clients)
    uploads[0].layers["extra.layer"] = uploads[0].layers[next(iter(specs))]
    with pytest.raises(InvalidUploadError, match="unknown layer"):
        strategy.aggregate(state, uploads)


def test_upload_dataclass_bytes(specs):
    upload = Upload("c", 1, {"x": {"B": torch.zeros(4, 2), "A": torch.zeros(2, 5)}}, {"h": torch.zeros(3, dtype=torch.float16)})
    assert upload.nbytes == 4 * (8 + 10) + 2 * 3
