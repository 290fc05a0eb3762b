"""Which methods the wrapper accepts, that it is the method itself when no noise and no clipping bite, and that the
clients' side is untouched."""

from __future__ import annotations

import dataclasses

import pytest
import torch
from privacy_helpers import head, random_uploads

from peft_fed.privacy import ClientLevelDPSettings, ClientLevelDPStrategy, ClientLevelDPUnsupportedError
from peft_fed.privacy.strategy import client_level_dp_refusal, global_model_reads_client_states
from peft_fed.runtime.run_arguments import FederatedArguments
from peft_fed.state import ClientState
from peft_fed.strategies import STRATEGIES, get_strategy

LINEAR_METHODS = {"fedit", "ffa_lora", "fedsa_lora"}


@pytest.mark.parametrize("method", sorted(STRATEGIES))
def test_linear_methods_are_wrapped_and_the_others_refused_with_the_reason(specs, method):
    inner = get_strategy(method, specs, dtype=torch.float64)
    settings = ClientLevelDPSettings(clip=1.0, noise_multiplier=1.0)
    if method in LINEAR_METHODS:
        strategy = ClientLevelDPStrategy(inner, settings, num_clients=10, clients_per_round=3, num_rounds=2)
        for capability in ("name", "uploaded", "merges_into_backbone", "needs_gradient", "has_client_loss",
                           "keeps_client_state", "Hyperparameters"):  # fmt: skip
            assert getattr(strategy, capability) == getattr(inner, capability)
        return
    with pytest.raises(ClientLevelDPUnsupportedError, match=rf"client-level DP refused: {method}") as caught:
        ClientLevelDPStrategy(inner, settings, num_clients=10, clients_per_round=3, num_rounds=2)
    reason = str(caught.value)
    assert "\n" not in reason
    if inner.merges_into_backbone:
        assert "merges data-dependent products" in reason
    else:
        assert "not the mean of its uploads" in reason


def test_the_refusal_follows_behaviour_not_names(specs):
    """A method named like FedIT whose server aggregates something else than the mean is refused."""

    class LooksLinear(STRATEGIES["fedit"]):
        def _aggregate_layers(self, state, uploads, weights):
            layers, update, global_B = super()._aggregate_layers(state, uploads, weights)
            return {n: {"B": t["B"] ** 3, "A": t["A"]} for n, t in layers.items()}, update, global_B

    assert client_level_dp_refusal(get_strategy("fedit", specs)) is None
    assert "not the mean of its uploads" in client_level_dp_refusal(LooksLinear(specs))


@pytest.mark.parametrize("method", sorted(LINEAR_METHODS))
def test_without_noise_and_with_a_clip_nobody_reaches_it_is_the_method_with_equal_weights(dp_strategy, method):
    strategy = dp_strategy(method, clip=1e6, noise_multiplier=0.0, clients_per_round=3)
    plain = get_strategy(method, strategy.specs, dtype=torch.float64, seed=7)
    state, _ = strategy.init_server(extras=head())
    uploads = random_uploads(strategy, state, 3)
    equal_counts = [type(u)(u.client_id, 1, u.layers, u.extras) for u in uploads]  # DP-FedAvg's mean is unweighted
    private, reference = strategy.aggregate(state, uploads), plain.aggregate(state, equal_counts)
    for name, tensors in reference.state.layers.items():
        for key, tensor in tensors.items():
            torch.testing.assert_close(private.state.layers[name][key], tensor, rtol=1e-12, atol=1e-14)
    torch.testing.assert_close(private.state.extras, reference.state.extras, rtol=1e-12, atol=1e-14)
    assert private.accepted == ["0", "1", "2"] and private.weights == pytest.approx([1 / 3] * 3)
    assert private.metrics["dp_clipped_clients"] == 0 and private.metrics["dp_epsilon"] is None  # no noise


def test_noise_is_reproducible_and_the_round_result_changes_only_the_server(dp_strategy):
    a, b = dp_strategy(noise_multiplier=2.0), dp_strategy(noise_multiplier=2.0)
    state, _ = a.init_server()
    uploads = random_uploads(a, state, 4)
    first, second = a.aggregate(state, uploads), b.aggregate(state, uploads)
    for name in state.layers:
        assert torch.equal(first.state.layers[name]["B"], second.state.layers[name]["B"])
    assert state.round == 0 and first.state.round == 1  # the old state is untouched


def test_the_client_side_is_the_inner_methods(dp_strategy):
    strategy = dp_strategy("ffa_lora")
    plain = get_strategy("ffa_lora", strategy.specs, dtype=torch.float64, seed=7)
    state, _ = strategy.init_server()
    start = strategy.client_begin(strategy.configure(state, None), ClientState("0"))
    reference = plain.client_begin(plain.configure(state, None), ClientState("0"))
    assert start.train_A is False and reference.train_A is False
    for name in state.layers:
        assert torch.equal(start.factors[name].A, reference.factors[name].A)
        assert torch.equal(start.factors[name].B, reference.factors[name].B)


def test_fedsa_loras_exported_model_is_not_covered_fedits_is(specs):
    assert global_model_reads_client_states(get_strategy("fedsa_lora", specs))
    assert not global_model_reads_client_states(get_strategy("fedit", specs))
    assert not global_model_reads_client_states(get_strategy("ffa_lora", specs))


@pytest.mark.parametrize(
    ("arguments", "message"),
    [
        (dict(dp_clip=0), r"`dp_clip` must be > 0"),
        (dict(dp_clip=1.0, dp_noise_multiplier=-1), r"`dp_noise_multiplier` must be >= 0"),
        (dict(dp_noise_multiplier=1.0), r"dp_noise_multiplier given without `dp_clip`"),
        (dict(dp_target_epsilon=1.0, dp_delta=1e-3), r"dp_target_epsilon, dp_delta given without `dp_clip`"),
        (dict(dp_clip=1.0, dp_noise_multiplier=1.0, dp_delta=2.0), r"`dp_delta` must be < 1"),
    ],
)
def test_run_settings_refuse_bad_dp_values_before_anything_loads(arguments, message):
    with pytest.raises(ValueError, match=message):
        FederatedArguments(method="fedit", **arguments)
    assert FederatedArguments(method="fedit").differential_privacy() is None


def test_with_noise_from_the_clients_the_server_aggregates_the_secure_mean_as_it_is_and_refuses_anything_else(dp_strategy):
    """Under secure aggregation every record carries the one noised mean: the wrapper hands it to the method
    unchanged (no second clipping or noise); a record holding anything else (a client's own upload) is refused."""
    strategy = dp_strategy(clip=0.5, noise_multiplier=1.0, clients_per_round=3)
    strategy.expect_noise_from_clients()
    state, _ = strategy.init_server()
    (secure_mean,) = random_uploads(strategy, state, 1, scale=3.0)  # far beyond the clip: it must not be clipped
    copies = [dataclasses.replace(secure_mean, client_id=str(i)) for i in range(3)]
    result = strategy.aggregate(state, copies)
    expected = strategy.inner.aggregate(state, [secure_mean])
    for name, tensors in expected.state.layers.items():
        for key, tensor in tensors.items():
            assert torch.equal(result.state.layers[name][key], tensor)
    assert result.metrics["dp_clipped_clients"] is None and result.metrics["dp_median_update_norm"] is None
    assert strategy.guarantee().noise_added_by == "clients (secure aggregation)"
    own = random_uploads(strategy, state, 3, scale=0.1, seed=4)
    with pytest.raises(ValueError, match="expects every upload to be the securely aggregated noised mean"):
        strategy.aggregate(state, own)
