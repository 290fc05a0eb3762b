"""Federated hyperspectral unmixing: GAUSS networks trained on a source scene, adapted to a target with LoRA.

Setting: a GAUSS model was trained on a *source* scene; a *target* scene of the same materials (other
spectra of the same material classes, other abundances, other noise) is split among clients, for example
as spatial tiles (:func:`~peft_fed.unmixing.patches.tile_pixel_indices`). The clients adapt the source
networks with LoRA adapters under any federated method of :mod:`peft_fed.strategies` (FedSmoothLoRA by
default) without sharing pixels. Two references use the same adapter budget:

- :func:`run_local_only`: every client adapts alone on its own pixels;
- :func:`run_centralised`: one adapter trained on all target pixels (the pooled-data upper reference).

Local training is GAUSS's blind stage (:func:`~peft_fed.unmixing.train.train_stage` with ``blind=True``):
the approximation loss plus the reconstruction loss back-propagated through UN and MN. It needs no labels,
which matters here because k-means pseudo labels computed on each client would come in a different,
arbitrary order on every client.

The rounds are played by the same engine as :class:`~peft_fed.runtime.FederatedTrainer`'s
(:class:`~peft_fed.engine.RoundEngine`: sample -> configure -> clients -> aggregate -> merge -> diagnostics);
only the client executor differs: :func:`~peft_fed.runtime.client.run_client` whose local training callable
runs ``train_stage`` on the client's pixels. A client whose gradient estimate, weights or loss are not finite
is dropped from its round, as in the trainer. The aggregation maths lives in the strategies only. Every method's client loss term
(Subspace-Reg's regulariser) is added through the optimizer (:class:`_ClientLossOptimizer`), and
FedSmoothLoRA's gradient estimate uses the same blind GAUSS loss on batches of the client's pixels.

Metrics after every round (and before the first, ``round`` 0): SAD (after Hungarian matching), aRMSE and
reconstruction RMSE of the *global* model on the whole target scene, and the exact uplink / downlink bytes.
"""

from __future__ import annotations

import copy
import dataclasses
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
from peft import get_peft_model
from torch import nn
from tqdm.auto import tqdm

from .. import peft_bridge
from ..engine import ClientRecord, ClientTask, RoundEngine, RoundHooks, client_seed
from ..linalg import LowRank
from ..runtime.client import run_client
from ..state import ServerState
from ..strategies import Strategy, build_strategy, canonical_method_name
from ..strategies.base import default_initial_factors
from ..tuners import peft_config_class
from .config import GaussTrainingConfig
from .data import HyperspectralScene
from .metrics import evaluate_unmixing
from .patches import PixelWindows
from .train import gauss_losses, predict, train_stage

__all__ = [
    "DEFAULT_RANK_PATTERN",
    "DEFAULT_TARGET_MODULES",
    "AdaptationResult",
    "FederatedUnmixingConfig",
    "adapt_gauss_model",
    "evaluate_gauss_model",
    "run_centralised",
    "run_federated_unmixing",
    "run_local_only",
]

DEFAULT_TARGET_MODULES: tuple[str, ...] = (
    "approximation.hidden",
    "approximation.output",
    "unmixing.mlp.layers.0",
    "unmixing.mlp.layers.1",
    "unmixing.mlp.layers.2",
    "mixing.linear",
    "mixing.mlp.layers.0",
    "mixing.mlp.layers.1",
    "mixing.mlp.layers.2",
)
"""Every ``nn.Linear`` of the default :class:`~peft_fed.unmixing.GaussModel` (AN, UN and MN)."""

DEFAULT_RANK_PATTERN: dict[str, int] = {
    "unmixing.mlp.layers.2": 1,
    "mixing.linear": 1,
    "mixing.mlp.layers.0": 1,
}
"""Rank 1 for the three layers with a side of size ``p`` (the number of endmembers): FedSmoothLoRA's
gradient-aligned init needs ``2 r <= min(in, out)`` (so ``r = 1`` for ``p`` = 2 or 3), and a rank-``p``
change of a ``p``-wide layer would be a full-rank one. ``mixing.linear`` is the MN's endmember matrix: without
an adapter there, the endmembers can move only through the MN's penalised non-linear correction."""


@dataclass
class FederatedUnmixingConfig:
    """How the source GAUSS model is adapted with LoRA, federated or not.

    Attributes:
        method: any registered federated method (``peft_fed.STRATEGIES``: ``fedsmoothlora``, ``fedit``,
            ``flexlora``, ``fedsvd``, ``subspace_reg``...; aliases such as ``fedavg`` work). Local-only and
            centralised training ignore it.
        rank: LoRA rank ``r`` of the adapted layers (``rank_pattern`` overrides it per layer).
        alpha: LoRA ``alpha``; the adapter's scale is ``alpha / r``.
        target_modules: names of the adapted ``nn.Linear`` layers of :class:`~peft_fed.unmixing.GaussModel`
            (default :data:`DEFAULT_TARGET_MODULES`).
        rank_pattern: PEFT's per-layer ranks, ``{layer name: r}`` (default :data:`DEFAULT_RANK_PATTERN`).
        num_rounds: federated rounds. Local-only and centralised training get as many evaluation points.
        local_steps: optimisation steps of each client in each round (batches of ``batch_size`` pixels of
            its own, from the training config).
        clients_per_round: clients sampled per round (seeded, without replacement); ``None``: all of them.
        learning_rate: Adam learning rate of the adapters (a fresh optimizer every client round, as in the
            federated runtime).
        method_kwargs: hyperparameters of the strategy (e.g. ``{"zeta": 0.5}``, ``{"num_gradient_batches": 4}``
            or ``{"mu": 0.1}``); unknown names raise ``TypeError`` when the strategy is built.
        seed: seeds the strategy's initial factors, client sampling and every client's batches.
        show_progress: a tqdm bar over rounds.
    """

    method: str = field(default="fedsmoothlora", metadata={"help": "Any registered federated method."})
    rank: int = field(default=4, metadata={"help": "LoRA rank r of the adapted layers (rank_pattern overrides it)."})
    alpha: float = field(default=8.0, metadata={"help": "LoRA alpha; the adapter's scale is alpha / r."})
    target_modules: tuple[str, ...] = DEFAULT_TARGET_MODULES
    rank_pattern: dict[str, int] | None = field(default_factory=lambda: dict(DEFAULT_RANK_PATTERN))
    num_rounds: int = field(default=20, metadata={"help": "Federated rounds."})
    local_steps: int = field(default=25, metadata={"help": "Optimisation steps of each client in each round."})
    clients_per_round: int | None = field(
        default=None, metadata={"help": "Clients sampled per round (seeded, without replacement); none: all."}
    )
    learning_rate: float = field(default=1e-3, metadata={"help": "Adam learning rate of the adapters."})
    method_kwargs: dict[str, Any] = field(default_factory=dict)
    seed: int = 0
    show_progress: bool = True

    def __post_init__(self) -> None:
        self.method = canonical_method_name(self.method)  # ValueError naming the known methods
        if isinstance(self.target_modules, str):
            self.target_modules = (self.target_modules,)
        self.target_modules = tuple(self.target_modules)
        if not self.target_modules:
            raise ValueError("target_modules must name at least one layer of the GAUSS model")
        for name in ("rank", "num_rounds", "local_steps"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"{name} must be an integer >= 1, got {value!r}")
        for pattern, rank in (self.rank_pattern or {}).items():
            if isinstance(rank, bool) or not isinstance(rank, int) or rank < 1:
                raise ValueError(f"rank_pattern[{pattern!r}] must be an integer >= 1, got {rank!r}")
        if self.clients_per_round is not None and (
            isinstance(self.clients_per_round, bool)
            or not isinstance(self.clients_per_round, int)
            or self.clients_per_round < 1
        ):
            raise ValueError(
                f"clients_per_round must be None or an integer >= 1, got {self.clients_per_round!r}"
            )
        if not self.alpha > 0:
            raise ValueError(f"alpha must be > 0, got {self.alpha}")
        if not self.learning_rate > 0:
            raise ValueError(f"learning_rate must be > 0, got {self.learning_rate}")
        self.method_kwargs = dict(self.method_kwargs or {})

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


@dataclass
class AdaptationResult:
    """Outcome of a federated, local-only or centralised adaptation.

    Attributes:
        setting: ``"federated"``, ``"local_only"`` or ``"centralised"``.
        method: the federated method (``None`` for local-only and centralised).
        history: one row per round (``round`` 0 is the source model before any adaptation) with
            ``sad_mean``, ``sad_per_endmember``, ``armse``, ``reconstruction_rmse`` on the whole target scene,
            and the bytes and losses of the round. Local-only rows hold the mean over clients (each client's
            own model scored on the whole scene) and the per-client values.
        final: the last row's metrics.
        model: the adapted model (PEFT-wrapped; the global adapter is loaded); for local-only, the last
            client's model.
        endmembers, abundances, reconstruction: the final model's outputs on the target, ``(bands, p)``,
            ``(rows, cols, p)``, ``(rows, cols, bands)`` (for local-only, the last client's).
        seconds: wall time of the whole adaptation.
        server_state: the federated server's final state (its ``backbone_history`` holds every merged
            update); ``None`` for local-only and centralised runs.
    """

    setting: str
    method: str | None
    history: list[dict[str, Any]]
    final: dict[str, Any]
    model: nn.Module
    endmembers: np.ndarray
    abundances: np.ndarray
    reconstruction: np.ndarray
    seconds: float
    server_state: ServerState | None = None

    def summary(self) -> dict[str, Any]:
        """Everything but the model and the arrays (JSON-ready)."""
        return {
            "setting": self.setting,
            "method": self.method,
            "final": self.final,
            "history": self.history,
            "seconds": self.seconds,
        }


# ---------------------------------------------------------------------------------------- building blocks


def adapt_gauss_model(source_model: nn.Module, config: FederatedUnmixingConfig) -> nn.Module:
    """A LoRA-wrapped deep copy of ``source_model`` (left untouched), with only the adapters trainable.

    FedSmoothLoRA and Subspace-Reg get their own peft_fed config class, which checks the ranks against the
    layer shapes before any layer is replaced (``2 r <= min(in, out)`` for FedSmoothLoRA).
    """
    lora = peft_config_class(config.method)(
        r=config.rank,
        lora_alpha=config.alpha,
        target_modules=list(config.target_modules),
        rank_pattern=dict(config.rank_pattern or {}),
        lora_dropout=0.0,
    )
    base = copy.deepcopy(source_model)
    for param in base.parameters():
        param.requires_grad_(False)
    return get_peft_model(base, lora)


def evaluate_gauss_model(
    model: nn.Module, windows: PixelWindows, scene: HyperspectralScene
) -> tuple[dict[str, Any], dict[str, np.ndarray]]:
    """Metrics of a (wrapped) GAUSS model on a whole scene, and its outputs.

    Returns ``(metrics, outputs)``: ``sad_mean``, ``sad_per_endmember``, ``armse`` (needs the scene's
    reference endmembers / abundances) and ``reconstruction_rmse`` (the MN's reconstruction against the
    cube); ``outputs`` holds ``endmembers`` ``(bands, p)``, ``abundances`` and ``reconstruction`` shaped like
    the image.
    """
    rows, cols, bands = scene.cube.shape
    predicted = predict(model, windows)
    with torch.no_grad():
        endmembers = model.endmembers().double().cpu().numpy()
    abundances = predicted["abundances"].reshape(rows, cols, -1)
    reconstruction = predicted["reconstruction"].reshape(rows, cols, bands)
    metrics = evaluate_unmixing(
        endmembers,
        abundances,
        scene.endmembers,
        scene.abundances,
        cube=scene.cube,
        reconstruction=reconstruction,
    )
    row = {
        "sad_mean": metrics.sad_mean,
        "sad_per_endmember": metrics.sad_per_endmember,
        "armse": metrics.armse,
        "reconstruction_rmse": metrics.reconstruction_rmse,
    }
    return row, {"endmembers": endmembers, "abundances": abundances, "reconstruction": reconstruction}


class _ClientLossOptimizer:
    """Adam on the trainable parameters, adding the strategy's client loss term (if any) before each step.

    ``train_stage`` back-propagates the GAUSS loss and calls ``step``; here the gradient of
    ``strategy.client_loss(live factors, start)`` is accumulated onto it first, so the step follows the
    gradient of the sum, which is what the trainer's ``compute_loss`` does for a transformer.
    """

    def __init__(
        self,
        model: nn.Module,
        learning_rate: float,
        weight_decay: float,
        client_loss: Callable[[], torch.Tensor | None] | None = None,
    ) -> None:
        parameters = [p for p in model.parameters() if p.requires_grad]
        if not parameters:
            raise ValueError("the adapted model has no trainable parameters")
        self.inner = torch.optim.Adam(parameters, lr=learning_rate, weight_decay=weight_decay)
        self.client_loss = client_loss

    def zero_grad(self, set_to_none: bool = True) -> None:
        self.inner.zero_grad(set_to_none=set_to_none)

    def step(self) -> None:
        if self.client_loss is not None:
            extra = self.client_loss()
            if extra is not None:
                extra.backward()
        self.inner.step()


_CENTRAL_STREAM = 2**31 - 1  # client id of the centralised run's batch stream


def _blind_config(training_config: GaussTrainingConfig) -> GaussTrainingConfig:
    if training_config.blind_pseudo_weight > 0:
        raise ValueError(
            "federated unmixing adapts with the blind (reconstruction) loss, which needs no pseudo labels; "
            f"set blind_pseudo_weight=0 (got {training_config.blind_pseudo_weight})"
        )
    if training_config.blind_freeze_mixing:
        raise ValueError(
            "federated unmixing adapts the layers named by target_modules; leave the MN's layers out of "
            "target_modules instead of setting blind_freeze_mixing"
        )
    return dataclasses.replace(training_config, show_progress=False)


def _check_clients(scene: HyperspectralScene, client_pixel_indices: Sequence[np.ndarray]) -> list[np.ndarray]:
    num_pixels = scene.cube.shape[0] * scene.cube.shape[1]
    if len(client_pixel_indices) == 0:
        raise ValueError("client_pixel_indices must hold at least one client")
    clients = []
    for index, pixels in enumerate(client_pixel_indices):
        pixels = np.asarray(pixels, dtype=np.int64).reshape(-1)
        if pixels.size == 0:
            raise ValueError(f"client {index} has no pixels")
        if pixels.min() < 0 or pixels.max() >= num_pixels:
            raise ValueError(f"client {index} has pixel indices outside [0, {num_pixels}) of the scene")
        clients.append(pixels)
    if scene.endmembers is None or scene.abundances is None:
        raise ValueError("the target scene needs reference endmembers and abundances to be scored")
    return clients


def _prepare(
    source_model: nn.Module,
    scene: HyperspectralScene,
    client_pixel_indices: Sequence[np.ndarray],
    config: FederatedUnmixingConfig | None,
    training_config: GaussTrainingConfig | None,
) -> tuple[FederatedUnmixingConfig, GaussTrainingConfig, list[np.ndarray], int, PixelWindows]:
    """Defaults and checks shared by the three settings: ``(config, training_config, clients, clients per
    round, windows of the scene)``."""
    config = config or FederatedUnmixingConfig()
    training_config = _blind_config(training_config or GaussTrainingConfig())
    clients = _check_clients(scene, client_pixel_indices)
    per_round = config.clients_per_round or len(clients)
    if per_round > len(clients):
        raise ValueError(f"clients_per_round={per_round} is more than the {len(clients)} clients")
    windows = PixelWindows(scene.cube, source_model.config.window_size, device=training_config.device)
    return config, training_config, clients, per_round, windows


def _mean_losses(history: Sequence[Mapping[str, float]]) -> dict[str, float]:
    if not history:
        return {"loss_first": float("nan"), "loss_last": float("nan"), "loss_mean": float("nan")}
    totals = [step["total"] for step in history]
    return {"loss_first": totals[0], "loss_last": totals[-1], "loss_mean": float(np.mean(totals))}


def _blind_loss_fn(
    config: GaussTrainingConfig,
) -> Callable[[nn.Module, Mapping[str, torch.Tensor]], torch.Tensor]:
    def loss_fn(model: nn.Module, batch: Mapping[str, torch.Tensor]) -> torch.Tensor:
        outputs = model(batch["windows"], detach_un_input=config.detach_un_input, detach_mn_input=False)
        scale = float(model.data_scale)
        losses = gauss_losses(
            outputs, batch["centres"], None, config, blind=True, data_scale=scale, mixing=model.mixing
        )
        return losses["total"]

    return loss_fn


def _gradient_batches(
    windows: PixelWindows, pixels: np.ndarray, count: int, batch_size: int, seed: int
) -> Callable[[], list[dict[str, torch.Tensor]]]:
    def batches() -> list[dict[str, torch.Tensor]]:
        generator = torch.Generator().manual_seed(seed)
        size = min(batch_size, len(pixels))
        out = []
        for _ in range(count):
            chosen = pixels[torch.randint(len(pixels), (size,), generator=generator).numpy()]
            out.append({"windows": windows(chosen), "centres": windows.centres(chosen)})
        return out

    return batches


def _initial_factors(model: nn.Module, seed: int) -> dict:
    """The adapter every non-federated run starts from: the FedAvg-style methods' initial global factors
    (PEFT's default LoRA init, ``B = 0``, seeded), so that a one-client, one-round FedIT run and a local-only run
    coincide."""
    return default_initial_factors(peft_bridge.layer_specs(model), seed)


# ---------------------------------------------------------------------------------------- the three settings


def run_federated_unmixing(
    source_model: nn.Module,
    scene: HyperspectralScene,
    client_pixel_indices: Sequence[np.ndarray],
    config: FederatedUnmixingConfig | None = None,
    training_config: GaussTrainingConfig | None = None,
    strategy: Strategy | None = None,
) -> AdaptationResult:
    """Adapt ``source_model`` to ``scene`` with federated LoRA; client ``i`` holds ``client_pixel_indices[i]``.

    Args:
        source_model: a trained :class:`~peft_fed.unmixing.GaussModel` (copied, never modified).
        scene: the target scene with reference endmembers and abundances (for the metrics only; training
            sees the cube of each client's pixels alone).
        client_pixel_indices: row-major pixel indices of each client (e.g. ``tile_pixel_indices(...)``).
        config: the federated setting (method, rank, rounds, local steps...).
        training_config: GAUSS loss weights and ``batch_size`` (``blind_pseudo_weight`` must be 0).
        strategy: a built strategy to use instead of ``config.method`` (its layers must match the adapter).

    Returns:
        an :class:`AdaptationResult` whose ``history`` has one row per round (plus round 0, the source
        model) with the global model's metrics on the whole scene, the uplink and downlink bytes of the round,
        the sampled clients and their mean local losses.
    """
    config, training_config, clients, per_round, windows = _prepare(
        source_model, scene, client_pixel_indices, config, training_config
    )
    tic = time.perf_counter()
    model = adapt_gauss_model(source_model, config)
    specs = peft_bridge.layer_specs(model)
    if strategy is None:
        strategy = build_strategy(config.method, specs, overrides=config.method_kwargs, seed=config.seed,
                                  num_rounds=config.num_rounds)
    elif set(strategy.specs) != set(specs):
        raise ValueError(f"the strategy adapts {sorted(strategy.specs)}, the model {sorted(specs)}")
    executor = _GaussClientExecutor(model, strategy, windows, clients, config, training_config)
    engine = RoundEngine(strategy, executor, num_clients=len(clients), clients_per_round=per_round, seed=config.seed)
    engine.initialize(base_weights=peft_bridge.base_weights(model))
    hooks = _UnmixingHooks(model, engine, windows, scene)
    engine.run(config.num_rounds, hooks, show_progress=config.show_progress)
    history = [hooks.source_row, *(hooks.rows)]
    result = _finish("federated", strategy.name, history, model, windows, scene, tic)
    result.server_state = engine.server_state
    return result


class _GaussClientExecutor:
    """The engine's client executor for GAUSS: each sampled client adapts the one model with ``train_stage``
    (the blind objective) on its own pixels, plus the strategy's client loss term."""

    def __init__(self, model, strategy, windows, clients, config, training_config) -> None:
        self.model, self.strategy, self.windows, self.clients = model, strategy, windows, clients
        self.config, self.training_config = config, training_config
        self.loss_fn = _blind_loss_fn(training_config)

    def train_clients(self, round_index: int, tasks: Sequence[ClientTask]) -> list[ClientRecord]:
        return [self._train(round_index, task) for task in tasks]

    def apply_backbone_update(self, update: Mapping[str, LowRank]) -> None:
        peft_bridge.add_to_base_weights(self.model, update)

    def _train(self, round_index: int, task: ClientTask) -> ClientRecord:
        pixels = self.clients[int(task.client_id)]
        seed = client_seed(self.config.seed, round_index, int(task.client_id))
        model, strategy = self.model, self.strategy

        def local_train(start):
            client_loss = None
            if strategy.has_client_loss:

                def client_loss():
                    return strategy.client_loss(peft_bridge.live_factors(model), start)

            optimizer = _ClientLossOptimizer(
                model, self.config.learning_rate, self.training_config.weight_decay, client_loss
            )
            return train_stage(
                model,
                self.windows,
                self.config.local_steps,
                self.training_config,
                pixel_indices=pixels,
                blind=True,
                optimizer=optimizer,
                generator=torch.Generator().manual_seed(seed),
            )

        gradient_batches = None
        if strategy.needs_gradient:
            gradient_batches = _gradient_batches(
                self.windows, pixels, strategy.gradient_batches(), self.training_config.batch_size, seed + 1
            )
        return run_client(
            model,
            strategy,
            task,
            train=local_train,
            step_losses=lambda steps: [step["total"] for step in steps],
            num_samples=len(pixels),
            gradient_batches=gradient_batches,
            loss_fn=self.loss_fn,
        )


class _UnmixingHooks(RoundHooks):
    """Scores the global model on the whole scene after every round (and once before the first)."""

    def __init__(self, model, engine: RoundEngine, windows, scene) -> None:
        self.model, self.engine, self.windows, self.scene = model, engine, windows, scene
        self._load_global()
        metrics, _ = evaluate_gauss_model(model, windows, scene)
        self.source_row = {"round": 0, **metrics, "uplink_bytes": 0, "downlink_bytes": 0}
        self.rows: list[dict[str, Any]] = []
        self._tic = time.perf_counter()

    def _load_global(self) -> None:
        peft_bridge.set_factors(self.model, self.engine.global_factors())

    def round_metrics(self, round_index: int) -> dict[str, Any]:
        self._load_global()
        metrics, _ = evaluate_gauss_model(self.model, self.windows, self.scene)
        return metrics

    def record(self, row) -> None:
        losses_first = [v for v in row["client_loss_first"].values() if v == v]
        losses_last = [v for v in row["client_loss_last"].values() if v == v]
        self.rows.append(
            {
                **row,
                "train_loss_first": float(np.mean(losses_first)) if losses_first else float("nan"),
                "train_loss_last": float(np.mean(losses_last)) if losses_last else float("nan"),
                "seconds": time.perf_counter() - self._tic,
            }
        )
        self._tic = time.perf_counter()


def _finish(setting, method, history, model, windows, scene, tic) -> AdaptationResult:
    _, outputs = evaluate_gauss_model(model, windows, scene)
    final = {
        key: history[-1][key] for key in ("sad_mean", "sad_per_endmember", "armse", "reconstruction_rmse")
    }
    if setting == "federated":
        final["uplink_bytes_total"] = int(sum(row["uplink_bytes"] for row in history))
        final["downlink_bytes_total"] = int(sum(row["downlink_bytes"] for row in history))
    return AdaptationResult(
        setting=setting,
        method=method,
        history=history,
        final=final,
        model=model,
        endmembers=outputs["endmembers"],
        abundances=outputs["abundances"],
        reconstruction=outputs["reconstruction"],
        seconds=time.perf_counter() - tic,
    )


def _adapt_alone(
    source_model: nn.Module,
    scene: HyperspectralScene,
    windows: PixelWindows,
    pixels: np.ndarray,
    steps_per_round: int,
    seed: int,
    config: FederatedUnmixingConfig,
    training_config: GaussTrainingConfig,
) -> tuple[nn.Module, list[dict[str, Any]]]:
    """One adapter trained continuously (one Adam, one batch stream) on ``pixels``, scored every
    ``steps_per_round`` steps on the whole scene."""
    model = adapt_gauss_model(source_model, config)
    peft_bridge.set_factors(model, _initial_factors(model, config.seed))
    optimizer = _ClientLossOptimizer(model, config.learning_rate, training_config.weight_decay)
    generator = torch.Generator().manual_seed(seed)
    metrics, _ = evaluate_gauss_model(model, windows, scene)
    history = [{"round": 0, **metrics}]
    for round_index in range(config.num_rounds):
        steps = train_stage(
            model,
            windows,
            steps_per_round,
            training_config,
            pixel_indices=pixels,
            blind=True,
            optimizer=optimizer,
            generator=generator,
        )
        metrics, _ = evaluate_gauss_model(model, windows, scene)
        losses = _mean_losses(steps)
        history.append(
            {
                "round": round_index + 1,
                **metrics,
                "train_loss_first": losses["loss_first"],
                "train_loss_last": losses["loss_last"],
            }
        )
    return model, history


def run_local_only(
    source_model: nn.Module,
    scene: HyperspectralScene,
    client_pixel_indices: Sequence[np.ndarray],
    config: FederatedUnmixingConfig | None = None,
    training_config: GaussTrainingConfig | None = None,
) -> AdaptationResult:
    """Every client adapts the source model alone, on its own pixels, with the same adapter.

    Each client trains one LoRA adapter (same rank, alpha and layers, initialised like FedIT's global
    adapter) for ``num_rounds * local_steps`` steps (what it trains in the federation when it takes part in
    every round), with one Adam throughout; its batch stream is the one it uses in the federation's first
    round. Each client's model is scored on the **whole** target scene after every ``local_steps`` steps;
    the history rows hold the mean over clients (``sad_mean``, ``armse``, ``reconstruction_rmse``) and the
    per-client values (``per_client``).
    """
    config, training_config, clients, _, windows = _prepare(
        source_model, scene, client_pixel_indices, config, training_config
    )
    tic = time.perf_counter()
    histories = []
    progress = tqdm(clients, desc="local-only clients", disable=not config.show_progress)
    for client, pixels in enumerate(progress):
        model, history = _adapt_alone(
            source_model,
            scene,
            windows,
            pixels,
            config.local_steps,
            client_seed(config.seed, 0, client),
            config,
            training_config,
        )
        histories.append(history)
    rows = []
    for round_index in range(config.num_rounds + 1):
        per_client = [history[round_index] for history in histories]
        row: dict[str, Any] = {"round": round_index}
        for key in ("sad_mean", "armse", "reconstruction_rmse"):
            row[key] = float(np.mean([entry[key] for entry in per_client]))
        row["sad_per_endmember"] = np.mean(
            [entry["sad_per_endmember"] for entry in per_client], axis=0
        ).tolist()
        row["per_client"] = {
            str(client): {key: entry[key] for key in ("sad_mean", "armse", "reconstruction_rmse")}
            for client, entry in enumerate(per_client)
        }
        rows.append(row)
    return _finish("local_only", None, rows, model, windows, scene, tic)


def run_centralised(
    source_model: nn.Module,
    scene: HyperspectralScene,
    client_pixel_indices: Sequence[np.ndarray] | None = None,
    config: FederatedUnmixingConfig | None = None,
    training_config: GaussTrainingConfig | None = None,
) -> AdaptationResult:
    """One adapter trained on the pooled pixels of all clients (every pixel when ``None``).

    Same adapter, initialisation and learning rate as the other settings, and the federation's total compute:
    ``clients_per_round * local_steps`` steps per round-equivalent, ``num_rounds`` of them, one Adam
    throughout; scored on the whole scene after each round-equivalent.
    """
    if client_pixel_indices is None:
        client_pixel_indices = [np.arange(scene.cube.shape[0] * scene.cube.shape[1])]
    config, training_config, clients, per_round, windows = _prepare(
        source_model, scene, client_pixel_indices, config, training_config
    )
    tic = time.perf_counter()
    model, history = _adapt_alone(
        source_model,
        scene,
        windows,
        np.unique(np.concatenate(clients)),
        per_round * config.local_steps,
        client_seed(config.seed, 0, _CENTRAL_STREAM),
        config,
        training_config,
    )
    return _finish("centralised", None, history, model, windows, scene, tic)
