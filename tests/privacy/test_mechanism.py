"""Clipping and noise: the clipped updates' norms, the aggregate's exact form, the noise's distribution."""

from __future__ import annotations

import math

import pytest
import torch
from privacy_helpers import head, random_uploads

from peft_fed.privacy.accountant import REPLACE_ONE_SENSITIVITY_IN_CLIPS
from peft_fed.privacy.mechanism import (
    clip_update,
    noise_generator,
    noised_mean,
    tensor_parts,
    update_norm,
    upload_update,
)
from peft_fed.state import LayerSpec


def _delta(strategy, before, after):
    """The server's change as the update vector the mechanism works in (same order as ``upload_update``)."""
    parts = []
    for name in sorted(before.layers):
        for key in strategy.uploaded:
            parts.append(after.layers[name][key].double() - before.layers[name][key].double())
    for key in sorted(before.extras):
        parts.append(after.extras[key].double() - before.extras[key].double())
    return torch.cat([p.flatten() for p in parts])


@pytest.mark.parametrize("method", ["fedit", "ffa_lora", "fedsa_lora"])
def test_clipped_updates_have_norm_at_most_clip_and_the_aggregate_is_their_plain_mean(dp_strategy, method):
    clip = 0.8
    strategy = dp_strategy(method, clip=clip, noise_multiplier=0.0, clients_per_round=4)
    state, _ = strategy.init_server(extras=head())
    # two updates far above the clip, two below it
    uploads = random_uploads(strategy, state, 2, scale=1.0, seed=1) + random_uploads(strategy, state, 2, scale=1e-3, seed=2)
    uploads[2].client_id, uploads[3].client_id = "2", "3"
    updates = [upload_update(state, u, strategy.uploaded) for u in uploads]
    clipped = [clip_update(parts, clip)[0] for parts in updates]
    for original, after in zip(updates, clipped, strict=True):
        assert update_norm(after) <= clip * (1 + 1e-12)
        if update_norm(original) <= clip:  # untouched below the clip
            assert all(torch.equal(a, b) for (_, a), (_, b) in zip(original, after, strict=True))
        else:  # same direction, norm exactly the clip
            assert math.isclose(update_norm(after), clip, rel_tol=1e-12)
            ratio = torch.cat([b.flatten() for _, b in after]) / torch.cat([a.flatten() for _, a in original])
            torch.testing.assert_close(ratio, torch.full_like(ratio, clip / update_norm(original)))

    result = strategy.aggregate(state, uploads)
    expected = sum(torch.cat([t.flatten() for _, t in parts]) for parts in clipped) / 4  # unweighted: counts ignored
    torch.testing.assert_close(_delta(strategy, state, result.state), expected, rtol=1e-12, atol=1e-14)
    assert result.metrics["dp_clipped_clients"] == 2
    # the tensors a method does not upload are the server's, unchanged
    for name, tensors in result.state.layers.items():
        for key in set(tensors) - set(strategy.uploaded):
            assert torch.equal(tensors[key], state.layers[name][key])


def test_a_failed_client_counts_as_zero_the_divisor_stays_the_cohort_size(dp_strategy):
    strategy = dp_strategy(clip=10.0, noise_multiplier=0.0, clients_per_round=4)
    state, _ = strategy.init_server()
    uploads = random_uploads(strategy, state, 3, scale=0.01)
    uploads[2].layers["layer.0.query"]["B"][0, 0] = float("nan")  # dropped by FedIT's upload rules
    result = strategy.aggregate(state, uploads)
    assert result.accepted == ["0", "1"] and [c for c, _ in result.dropped] == ["2"]
    good = [torch.cat([t.flatten() for _, t in upload_update(state, u, strategy.uploaded)]) for u in uploads[:2]]
    torch.testing.assert_close(_delta(strategy, state, result.state), (good[0] + good[1]) / 4)


def test_noise_has_std_z_clip_over_cohort_size_and_a_wrong_scale_is_detected(dp_strategy):
    big = {"big.0": LayerSpec(out_features=128, in_features=112, rank=24, scale=1.0)}  # 5760 coordinates
    clip, z, m = 0.7, 1.5, 4
    strategy = dp_strategy(specs=big, clip=clip, noise_multiplier=z, clients_per_round=m, num_rounds=4)
    state, _ = strategy.init_server()
    samples = []
    for _ in range(4):  # zero updates: what the server adds is the noise alone
        uploads = random_uploads(strategy, state, m, scale=0.0)
        result = strategy.aggregate(state, uploads)
        samples.append(_delta(strategy, state, result.state))
        state = result.state
    noise = torch.cat(samples)  # 23040 draws
    expected = z * clip / m
    measured = float(noise.std())
    # the standard error of a std estimate from n normal draws is std / sqrt(2 n): 0.47 % here
    tolerance = 4 / math.sqrt(2 * noise.numel())
    assert abs(float(noise.mean())) < 4 * expected / math.sqrt(noise.numel())
    assert abs(measured / expected - 1) < tolerance
    for wrong in (1.05 * expected, z * clip / math.sqrt(m), z * clip, expected / REPLACE_ONE_SENSITIVITY_IN_CLIPS):
        assert abs(measured / wrong - 1) > tolerance  # the test would fail a mechanism with that scale


def test_noise_is_one_seeded_stream_per_round():
    a = torch.randn(5, generator=noise_generator(3, 1))
    assert torch.equal(a, torch.randn(5, generator=noise_generator(3, 1)))
    assert not torch.equal(a, torch.randn(5, generator=noise_generator(3, 2)))
    assert not torch.equal(a, torch.randn(5, generator=noise_generator(4, 1)))


def test_replacing_one_client_moves_the_clipped_sum_by_at_most_twice_the_clip():
    """The sensitivity the accountant is given (``z / 2``): one update replaced, the sum moves by up to ``2 C``."""
    clip = 0.5
    generator = torch.Generator().manual_seed(0)
    others = [[(("x",), torch.randn(6, generator=generator, dtype=torch.float64))] for _ in range(3)]
    direction = torch.randn(6, generator=generator, dtype=torch.float64)
    worst = 0.0
    for first, second in ((direction, -direction), (direction, 3 * direction), (direction, torch.zeros(6))):
        sums = [
            noised_mean(others + [[(("x",), u)]], clip=clip, noise_multiplier=0.0, cohort_size=4,
                        generator=torch.Generator()).parts[0][1] * 4
            for u in (first, second)
        ]  # fmt: skip
        worst = max(worst, float(torch.linalg.vector_norm(sums[0] - sums[1])))
    assert math.isclose(worst, REPLACE_ONE_SENSITIVITY_IN_CLIPS * clip, rel_tol=1e-12)


def test_more_updates_than_the_cohort_are_refused():
    parts = [(("x",), torch.ones(2, dtype=torch.float64))]
    with pytest.raises(ValueError, match="3 updates for a round that samples 2 clients"):
        noised_mean([parts] * 3, clip=1.0, noise_multiplier=1.0, cohort_size=2, generator=torch.Generator())


# ------------------------------------------------------------------ noise added by the clients (secure aggregation)


@pytest.mark.parametrize("method", ["fedit", "ffa_lora", "fedsa_lora"])
def test_client_noise_sums_to_the_central_mechanism_with_the_noise_shared_by_k_clients(dp_strategy, specs, method):
    """Each client clips against the broadcast it started from; the server's noised mean from the sum of the
    contributions is the central aggregation's (z = 0), and with noise the sum's std is z C sqrt(n / k)."""
    clip, cohort = 0.5, 4
    strategy = dp_strategy(method, clip=clip, noise_multiplier=0.0, clients_per_round=cohort)
    state, _ = strategy.init_server(extras=head())
    broadcast = strategy.configure(state)
    uploads = random_uploads(strategy, state, 3, scale=1.0, seed=5)
    noise = strategy.noise_on_clients()
    contributions = [noise.contribution(broadcast, u, 2, torch.Generator()) for u in uploads]
    assert [clipped for _, clipped in contributions] == [True, True, True]
    for contribution, _ in contributions:
        assert update_norm(tensor_parts(contribution, strategy.uploaded)) <= clip * (1 + 1e-12)
    summed = _sum_uploads([c for c, _ in contributions])
    private = noise.noised_mean_upload(broadcast, summed, cohort)
    central = strategy.aggregate(state, uploads)  # the server clipping (z = 0), 3 of the 4 sampled answered
    ours = strategy.inner.aggregate(state, [private]).state
    torch.testing.assert_close(_delta(strategy, state, ours), _delta(strategy, state, central.state), rtol=1e-12, atol=1e-14)

    z, k, n = 3.0, 2, 3
    noisy = dp_strategy(method, clip=clip, noise_multiplier=z, clients_per_round=cohort).noise_on_clients()
    generator = torch.Generator().manual_seed(11)
    noise_only = torch.cat([  # the noise of 80 rounds' sums
        _flat(_sum_uploads([noisy.contribution(broadcast, u, k, generator)[0] for u in uploads]), strategy)
        - _flat(summed, strategy)
        for _ in range(80)
    ])
    expected = z * clip * math.sqrt(n / k)
    assert noise_only.numel() > 4000
    assert abs(float(noise_only.std()) / expected - 1) < 0.05
    assert float(noise_only.std()) > z * clip  # at least the central mechanism's noise on the sum
    with pytest.raises(ValueError, match="at least one client"):
        noisy.noise_std(0)


def _sum_uploads(uploads):
    from peft_fed.state import Upload

    first = uploads[0]
    layers = {n: {k: sum(u.layers[n][k] for u in uploads) for k in ts} for n, ts in first.layers.items()}
    return Upload("sum", 1, layers, {k: sum(u.extras[k] for u in uploads) for k in first.extras})


def _flat(upload, strategy):
    return torch.cat([t.flatten() for _, t in tensor_parts(upload, strategy.uploaded)])
