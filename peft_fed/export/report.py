"""The records of an export: the federated run it comes from and what was written (`export_report.json`)."""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any, Literal

REPORT_FILE = "export_report.json"
"""Machine-readable record of an export (ranks, errors, run facts), written next to the model card."""


@dataclass
class FederatedRunInfo:
    """The facts of a federated run that the model card records.

    Args:
        method: the federated method (``"fedsmoothlora"``, ``"flora"``, ...).
        rounds: number of completed rounds.
        num_clients: number of clients in the federation.
        clients_per_round: clients sampled per round (``None``: all, full participation).
        seed: the run's seed.
        base_model: Hub id or path of the original base model; also written as the adapter's
            ``base_model_name_or_path``.
        initial_adapter: the adapter the run started from (see :func:`peft_fed.modeling.load_initial_adapter`), if any.
        dataset: the training data, free text (a Hub dataset id is linked in the card's metadata).
        training_rank: the LoRA rank used during training.
        extra: any other fact to list in the card (``{"zeta": 1.0, "local_steps": 200}``).

    Example:

    ```python
    >>> from peft_fed.export import FederatedRunInfo
    >>> info = FederatedRunInfo(method="fedsmoothlora", rounds=10, num_clients=5, clients_per_round=3, seed=42)
    >>> info.participation
    '5 in total, 3 per round'

    ```
    """

    method: str
    rounds: int
    num_clients: int
    clients_per_round: int | None = None
    seed: int | None = None
    base_model: str | None = None
    initial_adapter: str | None = None
    dataset: str | None = None
    training_rank: int | None = None
    extra: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if not isinstance(self.method, str) or not self.method:
            raise ValueError(f"method must be a non-empty string, got {self.method!r}")
        if self.rounds < 0:
            raise ValueError(f"rounds must be >= 0, got {self.rounds}")
        if self.num_clients < 1:
            raise ValueError(f"num_clients must be >= 1, got {self.num_clients}")
        if self.clients_per_round is not None and not 1 <= self.clients_per_round <= self.num_clients:
            raise ValueError(
                f"clients_per_round must be between 1 and num_clients={self.num_clients}, got {self.clients_per_round}"
            )

    @property
    def participation(self) -> str:
        if self.clients_per_round is None or self.clients_per_round == self.num_clients:
            return f"{self.num_clients} in total, all every round"
        return f"{self.num_clients} in total, {self.clients_per_round} per round"

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


@dataclass
class ExportReport:
    """What an export wrote and how faithful it is.

    Attributes:
        output_dir: the folder written.
        kind: ``"adapter"`` (a LoRA adapter of the original base model) or ``"merged"`` (a full model).
        rank: the largest rank of any exported layer (``None`` for a merged model).
        layer_ranks: the rank of every exported layer.
        layer_errors: per layer, the relative Frobenius error ``||Delta - B A|| / ||Delta||`` of the factors
            as stored (so the storage dtype's rounding is included); ``0`` for a layer whose change is exactly 0.
        relative_error: the same over all layers together, ``sqrt(sum ||Delta_i - B_i A_i||^2 / sum ||Delta_i||^2)``.
        max_relative_error: the bound the ranks were chosen for, if one was given.
        num_parameters: parameters in the exported LoRA factors.
        run_info: the federated run, as recorded in the card.
    """

    output_dir: str
    kind: Literal["adapter", "merged"]
    rank: int | None = None
    layer_ranks: dict[str, int] = field(default_factory=dict)
    layer_errors: dict[str, float] = field(default_factory=dict)
    relative_error: float = 0.0
    max_relative_error: float | None = None
    num_parameters: int = 0
    run_info: FederatedRunInfo | None = None

    @property
    def max_layer_error(self) -> float:
        return max(self.layer_errors.values(), default=0.0)

    def to_dict(self) -> dict[str, Any]:
        out = asdict(self)
        out["run_info"] = self.run_info.to_dict() if self.run_info is not None else None
        return out
