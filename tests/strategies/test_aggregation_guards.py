"""Every part of an upload is accounted for and the aggregated state is checked, for all ten methods.

Each test is written from a reproduction of the reliability issue (finding 4): NaN/Inf/bool sample counts,
finite uploads whose aggregation overflows or breaks the SVD, ids ``0`` and ``"0"`` from one client, and
upload keys the server does not have. Under ``"raise"`` a bad upload raises :class:`InvalidUploadError`
and nothing is aggregated; under ``"drop"`` it is dropped (logged once) and the rest aggregated. An
aggregation that would give NaN/Inf is rejected whole under both policies. The server state never changes
on rejection.
"""

from __future__ import annotations

import re
import warnings

import pytest
import torch
from strategy_sim import fake_training

from peft_fed.linalg import LowRank
from peft_fed.state import ClientState, ServerState
from peft_fed.strategies import STRATEGIES, AggregationError, InvalidUploadError

METHODS = sorted(STRATEGIES)
POLICIES = ["raise", "drop"]
HEAD = "head.weight"


def _snapshot(state: ServerState):
    flat, meta = state.state_dict()
    return {k: v.clone() for k, v in flat.items()}, dict(meta)


def _assert_same(state: ServerState, snapshot) -> None:
    flat, meta = state.state_dict()
    assert meta == snapshot[1]
    assert flat.keys() == snapshot[0].keys()
    for key in flat:
        assert torch.equal(flat[key], snapshot[0][key]), key


def _round(build, specs, method, policy, dtype=torch.float64, num_samples=(5, 3, 4)):
    """A fresh server and one honest upload per client ``"0"``, ``"1"``, ``"2"`` (with a head in the extras)."""
    kw = {"num_rounds": 2} if method == "fedsmoothlora" else {}
    strategy = build(method, specs, invalid_upload=policy, dtype=dtype, **kw)
    generator = torch.Generator().manual_seed(3)
    W = {n: torch.randn(s.out_features, s.in_features, generator=generator, dtype=dtype) for n, s in specs.items()}
    state, _ = strategy.init_server(extras={HEAD: torch.zeros(3, 4, dtype=dtype)}, base_weights=W)

    def gradient_fn(offsets):
        return {n: W[n] + offsets[n] for n in specs}

    uploads = []
    for i, n_samples in enumerate(num_samples):
        client = ClientState(client_id=str(i))
        broadcast = strategy.configure(state, client)
        start = strategy.client_begin(broadcast, client, gradient_fn)
        head = torch.randn(3, 4, generator=generator, dtype=dtype)
        upload, _ = strategy.client_end(
            fake_training(start, generator), {HEAD: head}, start, client, n_samples, broadcast.backbone_version
        )
        uploads.append(upload)
    return strategy, state, uploads


def _expect_rejected(strategy, state, uploads, bad, pattern, caplog, dropped_id=None):
    """Upload ``bad`` is rejected with a reason matching ``pattern``, under the strategy's policy."""
    snapshot = _snapshot(state)
    client = uploads[bad].client_id
    if strategy.invalid_upload == "raise":
        with pytest.raises(InvalidUploadError, match=rf"client {re.escape(repr(client))} rejected: .*{pattern}"):
            strategy.aggregate(state, uploads)
        _assert_same(state, snapshot)
        return
    clean = strategy.aggregate(state, [u for i, u in enumerate(uploads) if i != bad])
    caplog.clear()
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # reported once, through the logger, never also as a warning
        result = strategy.aggregate(state, uploads)
    assert len([r for r in caplog.records if "rejected" in r.getMessage()]) == 1
    assert result.accepted == clean.accepted
    assert len(result.dropped) == 1 and re.search(pattern, result.dropped[0][1])
    if dropped_id is not None:
        assert result.dropped[0][0] == dropped_id
    _assert_same(result.state, _snapshot(clean.state))
    _assert_same(state, snapshot)


# ---------------------------------------------------------------- sample counts


@pytest.mark.parametrize("method", METHODS)
@pytest.mark.parametrize("policy", POLICIES)
@pytest.mark.parametrize(
    "value", [float("nan"), float("inf"), -float("inf"), 2.5, True, "5", None], ids=repr
)
def test_num_samples_must_be_a_finite_positive_count(build, specs, method, policy, value, caplog):
    # reproduction: num_samples=nan passed `<= 0` and gave a NaN state (or a raw _LinAlgError)
    strategy, state, uploads = _round(build, specs, method, policy)
    uploads[1].num_samples = value
    _expect_rejected(strategy, state, uploads, 1, r"num_samples must be positive and a finite integer count", caplog, dropped_id="1")


@pytest.mark.parametrize("method", METHODS)
def test_integral_float_num_samples_counts_like_the_int(build, specs, method):
    strategy, state, uploads = _round(build, specs, method, "raise")
    as_int = strategy.aggregate(state, uploads)
    for u in uploads:
        u.num_samples = float(u.num_samples)
    as_float = strategy.aggregate(state, uploads)
    assert as_float.weights == as_int.weights
    _assert_same(as_float.state, _snapshot(as_int.state))


# ---------------------------------------------------------------- the aggregated state

OVERFLOW_CASES = [  # finite float32 uploads (every uploaded tensor filled with the value)
    ("fedsmoothlora", 1e19),  # Inf backbone update before the fix
    ("flexlora", 1e19),  # Inf state
    ("subspace_reg", 1e19),  # Inf state
    ("fedex_lora", 3e38),  # Inf residual update
    ("frlora", 3e38),  # Inf backbone update
    ("fedsmoothlora", 3e38),  # raw _LinAlgError
    ("fedsvd", 3e38),  # raw _LinAlgError
    ("flexlora", 3e38),  # raw _LinAlgError
    ("subspace_reg", 3e38),  # raw _LinAlgError
]


@pytest.mark.parametrize("policy", POLICIES)
@pytest.mark.parametrize(("method", "value"), OVERFLOW_CASES, ids=[f"{m}-{v:g}" for m, v in OVERFLOW_CASES])
def test_overflowing_aggregation_is_rejected_whole(build, specs, policy, method, value):
    strategy, state, uploads = _round(build, specs, method, policy, dtype=torch.float32)
    for u in uploads:
        for tensors in u.layers.values():
            for t in tensors.values():
                t.fill_(value)
    snapshot = _snapshot(state)
    with pytest.raises(AggregationError, match=r"round 0: aggregation rejected: .*server state is unchanged") as info:
        strategy.aggregate(state, uploads)
    message = str(info.value)
    assert "linear algebra failed" in message or re.search(r"NaN or Inf in (backbone update of )?layer '", message)
    _assert_same(state, snapshot)


def _poison(strategy, state):
    """Make the method's per-layer aggregation return one NaN (as a numerically broken method would)."""
    original = strategy._aggregate_layers
    where = []

    def poisoned(state_, uploads, weights):
        layers, update, global_B = original(state_, uploads, weights)
        name = next(iter(strategy.specs))
        if layers and layers is not state_.layers:
            key = next(iter(layers[name]))
            bad = layers[name][key].clone()
            bad.view(-1)[0] = float("nan")
            layers = {**layers, name: {**layers[name], key: bad}}
            where.append(rf"layer {re.escape(repr(name))} tensor {re.escape(repr(key))}")
        else:
            B = update[name].B.clone()
            B.view(-1)[0] = float("inf")
            update = {**update, name: LowRank(B, update[name].A)}
            where.append(rf"backbone update of layer {re.escape(repr(name))} factor 'B'")
        return layers, update, global_B

    strategy._aggregate_layers = poisoned
    return where


@pytest.mark.parametrize("method", METHODS)
@pytest.mark.parametrize("policy", POLICIES)
def test_non_finite_aggregation_is_rejected_whole(build, specs, method, policy):
    strategy, state, uploads = _round(build, specs, method, policy)
    where = _poison(strategy, state)
    snapshot = _snapshot(state)
    with pytest.raises(AggregationError, match="NaN or Inf") as info:
        strategy.aggregate(state, uploads)
    assert re.search(where[0], str(info.value)), str(info.value)
    assert "server state is unchanged" in str(info.value)
    _assert_same(state, snapshot)


@pytest.mark.parametrize("method", METHODS)
@pytest.mark.parametrize("policy", POLICIES)
def test_linalg_error_becomes_aggregation_error(build, specs, method, policy):
    strategy, state, uploads = _round(build, specs, method, policy)

    def broken(state_, uploads_, weights):
        raise torch.linalg.LinAlgError("linalg.svd: The algorithm failed to converge")

    strategy._aggregate_layers = broken
    snapshot = _snapshot(state)
    with pytest.raises(AggregationError, match=r"linear algebra failed.*failed to converge.*server state is unchanged"):
        strategy.aggregate(state, uploads)
    _assert_same(state, snapshot)


# ---------------------------------------------------------------- client ids


@pytest.mark.parametrize("method", METHODS)
@pytest.mark.parametrize("policy", POLICIES)
def test_client_ids_are_normalised_before_the_duplicate_check(build, specs, method, policy, caplog):
    # reproduction: ids 0 and "0" were both aggregated, counting one client twice
    strategy, state, uploads = _round(build, specs, method, policy)
    uploads[0].client_id = 0
    uploads[1].client_id = "0"
    _expect_rejected(strategy, state, uploads, 1, "duplicate upload", caplog, dropped_id="0")
    if policy == "drop":
        assert strategy.aggregate(state, uploads).accepted == ["0", "2"]


@pytest.mark.parametrize("method", METHODS)
@pytest.mark.parametrize("policy", POLICIES)
@pytest.mark.parametrize("client_id", [None, 1.0, True, ("1",)], ids=repr)
def test_client_id_must_be_str_or_int(build, specs, method, policy, client_id, caplog):
    strategy, state, uploads = _round(build, specs, method, policy)
    uploads[1].client_id = client_id
    _expect_rejected(strategy, state, uploads, 1, r"client id must be a str or an int", caplog)


# ---------------------------------------------------------------- every key accounted for


@pytest.mark.parametrize("method", METHODS)
@pytest.mark.parametrize("policy", POLICIES)
def test_unknown_extra_tensor_is_rejected(build, specs, method, policy, caplog):
    # reproduction: an extra the server does not have was silently ignored
    strategy, state, uploads = _round(build, specs, method, policy)
    uploads[1].extras["classifier.bias"] = torch.zeros(3, dtype=torch.float64)
    _expect_rejected(strategy, state, uploads, 1, r"unknown extra tensor\(s\) \['classifier\.bias'\]", caplog)


@pytest.mark.parametrize("method", METHODS)
@pytest.mark.parametrize("policy", POLICIES)
def test_unexpected_tensor_in_a_layer_is_rejected(build, specs, method, policy, caplog):
    # reproduction: FFA-LoRA's server ignored an uploaded "A" (and FedSA-LoRA's a "B") without a word
    strategy, state, uploads = _round(build, specs, method, policy)
    name = next(iter(specs))
    key = next(k for k in ("B", "A", "C") if k not in strategy.uploaded)
    uploads[1].layers[name][key] = torch.zeros(2, 2, dtype=torch.float64)
    _expect_rejected(
        strategy, state, uploads, 1, rf"layer {re.escape(repr(name))} has unexpected tensor\(s\) \['{key}'\]", caplog
    )
