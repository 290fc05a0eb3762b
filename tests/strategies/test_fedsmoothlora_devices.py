"""FedSmoothLoRA's client side runs where its gradients are: the SVDs, the start factors and the dense offsets
stay on the gradients' device, only what the client sends or keeps comes to the CPU (at rank r), and the start
is the one the CPU computes.

Without a GPU, "another device" is :class:`Elsewhere`: a CPU tensor that reports ``cuda:0`` as its device and
refuses, as CUDA does, an operation that mixes it with a CPU tensor of more than zero dimensions. ``Tensor.to`` and
``Tensor.cpu`` are spied on (:class:`Transfers`): each crossing between the CPU and "the device" is logged with the
tensor's shape. Since the numbers are CPU numbers underneath, a run on ``Elsewhere`` gradients must also be
bit-identical to the CPU run. ``tests/runtime/test_cuda.py`` checks the same on a real GPU.
"""

from __future__ import annotations

import math

import pytest
import torch
from strategy_sim import quadratic_gradient_fn
from torch.utils import _pytree as pytree

from peft_fed.linalg import best_rank_r
from peft_fed.state import ClientState

ELSEWHERE = torch.device("cuda", 0)  # a label only: nothing is ever allocated on CUDA
_to, _cpu = torch._C.TensorBase.to, torch._C.TensorBase.cpu


class Elsewhere(torch.Tensor):
    """A CPU tensor that says it lives on ``cuda:0``; operations on it give ``Elsewhere`` tensors, and one that
    mixes it with a CPU tensor (other than a 0-dim scalar) raises, as on a GPU."""

    @property
    def device(self) -> torch.device:
        return ELSEWHERE

    @classmethod
    def __torch_function__(cls, func, types, args=(), kwargs=None):
        leaves = pytree.tree_leaves((args, kwargs or {}))
        if any(isinstance(t, Elsewhere) for t in leaves) and any(
            isinstance(t, torch.Tensor) and not isinstance(t, Elsewhere) and t.dim() > 0 for t in leaves
        ):
            raise RuntimeError(f"{getattr(func, '__name__', func)}: expected all tensors to be on the same device")
        return super().__torch_function__(func, types, args, kwargs)


class Transfers:
    """``Tensor.to``/``Tensor.cpu`` between the CPU and ``ELSEWHERE``, logged as ``(direction, shape)``."""

    def __init__(self) -> None:
        self.log: list[tuple[str, tuple[int, ...]]] = []

    def to(self, tensor, *args, **kwargs):
        kwargs.pop("copy", None)
        device, dtype, _, _ = torch._C._nn._parse_to(*args, **kwargs)
        there = isinstance(tensor, Elsewhere)
        if device is not None and device.type == "cuda" and not there:
            self.log.append(("to_device", tuple(tensor.shape)))
            return (tensor if dtype is None else _to(tensor, dtype)).clone().as_subclass(Elsewhere)
        if device is not None and device.type == "cpu" and there:
            self.log.append(("to_cpu", tuple(tensor.shape)))
            plain = tensor.as_subclass(torch.Tensor)
            return (plain if dtype is None else _to(plain, dtype)).clone()
        return tensor if dtype is None else _to(tensor, dtype)

    def cpu(self, tensor, *args, **kwargs):
        if isinstance(tensor, Elsewhere):
            self.log.append(("to_cpu", tuple(tensor.shape)))
            return tensor.as_subclass(torch.Tensor).clone()
        return _cpu(tensor, *args, **kwargs)

    def to_cpu(self) -> list[tuple[int, ...]]:
        shapes = [shape for direction, shape in self.log if direction == "to_cpu"]
        self.log.clear()
        return shapes


@pytest.fixture
def transfers(monkeypatch) -> Transfers:
    spy = Transfers()
    monkeypatch.setattr(torch.Tensor, "to", lambda self, *a, **k: spy.to(self, *a, **k))
    monkeypatch.setattr(torch.Tensor, "cpu", lambda self, *a, **k: spy.cpu(self, *a, **k))
    return spy


def _plain(tensor: torch.Tensor) -> torch.Tensor:
    return tensor.as_subclass(torch.Tensor)


def _gradients_on(specs, device_fn, dtype=torch.float32):
    """The quadratic test loss's gradients, handed over by ``device_fn`` (on "the device", or as they are)."""
    gradient_fn = quadratic_gradient_fn(specs)

    def on_device(offsets):
        assert all(type(o) is torch.Tensor for o in offsets.values())  # the offsets it is given: CPU tensors
        return {n: device_fn(g.to(dtype)) for n, g in gradient_fn(offsets).items()}

    return on_device


def _play(strategy, gradient_fn, rounds=2, clients=("0", "1")):
    """``rounds`` rounds of ``clients`` (first participation, then returning), yielding ``("begin", client, start)``
    after each ``client_begin`` and ``("end", client, (upload, new state))`` after each ``client_end``."""
    torch.manual_seed(0)  # the upload's randomized SVD draws from the global generator, as a runtime seeds it per client
    state, _ = strategy.init_server()
    client_states = {c: ClientState(c) for c in clients}
    generator = torch.Generator().manual_seed(5)
    for _ in range(rounds):
        uploads = []
        for c in clients:
            broadcast = strategy.configure(state, client_states[c])
            start = strategy.client_begin(broadcast, client_states[c], gradient_fn)
            yield "begin", c, start
            trained = {  # "local training" as the bridge hands it back: CPU factors
                n: type(f)(_plain(f.B).clone(), _plain(f.A) + 0.1 * torch.randn(f.A.shape, generator=generator, dtype=f.A.dtype))
                for n, f in start.factors.items()
            }
            upload, client_states[c] = strategy.client_end(trained, {}, start, client_states[c], 10, broadcast.backbone_version)
            yield "end", c, (upload, client_states[c])
            uploads.append(upload)
        state = strategy.aggregate(state, uploads).state


@pytest.mark.parametrize("svd_method", ["randomized", "full"])
@pytest.mark.parametrize("exact_round_matching", [False, True])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_client_maths_stays_on_the_gradients_device(build, specs, transfers, svd_method, exact_round_matching, dtype):
    """No ``m x n`` tensor comes to the CPU in ``client_begin`` (the randomized SVD's only crossing is its small
    ``q x n`` core, for LAPACK's signs; the exact SVD brings the gradient itself, once) nor in ``client_end`` (the
    upload comes at rank r); the start is on the device; and every number equals the CPU run's, bit for bit."""
    kwargs = dict(svd_method=svd_method, exact_round_matching=exact_round_matching, dtype=dtype, zeta=0.7)
    dense = {(s.out_features, s.in_features) for s in specs.values()}
    dense |= {shape[::-1] for shape in dense}
    # the randomized SVD's core: q x min(m, n), q = min(4r, m, n) (SPEC: q = 4r for the 2r vectors)
    cores = {(min(4 * s.rank, s.out_features, s.in_features), min(s.out_features, s.in_features)) for s in specs.values()}
    events = []
    transfers.log.clear()
    for step, client, value in _play(build("fedsmoothlora", specs, **kwargs), _gradients_on(specs, lambda g: g.to(ELSEWHERE))):
        events.append((step, client, value, transfers.to_cpu()))
    reference = list(_play(build("fedsmoothlora", specs, **kwargs), _gradients_on(specs, lambda g: g)))
    assert len(events) == len(reference) == 8

    for (step, _, value, to_cpu), (_, _, expected) in zip(events, reference, strict=True):
        if step == "begin":
            start = value
            for name in specs:
                for tensor in (start.factors[name].B, start.factors[name].A, start.backbone_offsets[name]):
                    assert isinstance(tensor, Elsewhere) and tensor.dtype == dtype  # where the gradients are
                assert torch.equal(_plain(start.factors[name].B), expected.factors[name].B)
                assert torch.equal(_plain(start.factors[name].A), expected.factors[name].A)
                assert torch.equal(_plain(start.backbone_offsets[name]), expected.backbone_offsets[name])
            full_matrices = [shape for shape in to_cpu if shape in dense]
            if svd_method == "randomized":
                assert full_matrices == [], to_cpu
                assert len(to_cpu) == len(specs) and set(to_cpu) <= cores, to_cpu  # one small core per layer
            else:  # the exact SVD's signs are LAPACK's: the gradient comes to the CPU once, nothing else does
                assert full_matrices == to_cpu and len(to_cpu) == len(specs)
        else:
            (upload, state), (expected_upload, expected_state) = value, expected
            ranks = {(s.out_features, s.rank) for s in specs.values()} | {(s.rank, s.in_features) for s in specs.values()}
            assert to_cpu and set(to_cpu) <= ranks  # only the rank-r factors of U_c cross
            for name in specs:
                for got, want in ((upload.layers[name], expected_upload.layers[name]), (state.layers[name], expected_state.layers[name])):
                    for key, tensor in got.items():
                        assert type(tensor) is torch.Tensor and tensor.device.type == "cpu"  # sent and kept on the CPU
                        assert torch.equal(tensor, want[key])


def test_the_old_mixing_is_refused(specs, transfers):
    """The spy is strict: a CPU matrix added to a device matrix raises, as on CUDA (the old client_end did this)."""
    G = torch.ones(3, 4).to(ELSEWHERE)
    with pytest.raises(RuntimeError, match="same device"):
        G + torch.ones(3, 4)
    assert isinstance(G * torch.tensor(2.0), Elsewhere)  # a 0-dim CPU scalar is fine, as on CUDA
    assert transfers.to_cpu() == []


@pytest.mark.parametrize("gradient_dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_start_is_the_spec_formula_whatever_the_gradients_dtype(build, specs, gradient_dtype, dtype):
    """The start from float32 or float64 gradients is the SPEC's, computed the way it was before the client's
    mathematics moved to the gradients' device (LAPACK's SVD in float64 on the CPU), within the dtypes' rounding;
    and it is on the gradients' device (the CPU here) in the strategy's dtype."""
    strategy = build("fedsmoothlora", specs, dtype=dtype, gamma=16.0, zeta=0.6)
    gradient_fn = _gradients_on(specs, lambda g: g, gradient_dtype)
    tolerance = 1e-10 if gradient_dtype == dtype == torch.float64 else 2e-5
    state, _ = strategy.init_server()
    client = ClientState("0")
    generator = torch.Generator().manual_seed(3)
    for round_index in range(2):
        broadcast = strategy.configure(state, client)
        W_rm = strategy.round_matching(broadcast, client)
        start = strategy.client_begin(broadcast, client, gradient_fn)
        gradients = gradient_fn({n: s.scale * W_rm[n] for n, s in specs.items()})
        for name, spec in specs.items():
            r = spec.rank
            U, _, Vh = torch.linalg.svd(gradients[name].double(), full_matrices=False)
            stable = spec.out_features**0.25 / math.sqrt(16.0)
            B_ga, A_ga = U[:, r : 2 * r] * stable, Vh[:r] * stable
            W_ga = B_ga @ A_ga
            got = start.factors[name]
            for tensor in (got.B, got.A, start.backbone_offsets[name]):
                assert tensor.device.type == "cpu" and tensor.dtype == dtype
            if round_index == 0:  # the gradient-aligned factors themselves (they pair different triplets)
                torch.testing.assert_close(got.B.double(), B_ga, atol=tolerance, rtol=0)
                torch.testing.assert_close(got.A.double(), A_ga, atol=tolerance, rtol=0)
            else:  # SVD_r(W_ga + W_rm): its factors' signs are free, its product is not
                expected = best_rank_r(W_ga + W_rm[name].double(), r).dense()
                torch.testing.assert_close(got.dense().double(), expected, atol=tolerance, rtol=0)
            torch.testing.assert_close(start.backbone_offsets[name].double(), -spec.scale * W_ga, atol=tolerance, rtol=0)
        trained = {n: type(f)(f.B.clone(), f.A + 0.1 * torch.randn(f.A.shape, generator=generator, dtype=f.A.dtype))
                   for n, f in start.factors.items()}  # fmt: skip
        upload, client = strategy.client_end(trained, {}, start, client, 10, broadcast.backbone_version)
        state = strategy.aggregate(state, [upload]).state
