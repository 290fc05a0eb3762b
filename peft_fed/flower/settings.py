"""The deployment's own settings, declared once (no Flower import: the CLI reads them to make its flags)."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field


@dataclass
class DeploymentArguments:
    """How the server treats its nodes (``[tool.flwr.app.config]`` keys of the Flower app, ``--run-config``)."""

    round_timeout: float = field(default=600.0, metadata={"help": "Seconds a round waits for its nodes' replies."})
    min_replies: int = field(
        default=1, metadata={"help": "Fewest good replies a round needs; below it the round is retried, then the run stops."}
    )
    round_retries: int = field(default=1, metadata={"help": "Times a round with too few replies is sent again."})
    node_wait: float = field(
        default=120.0, metadata={"help": "Seconds the server waits at start for every client's node to connect."}
    )
    min_nodes: int = field(default=1, metadata={"help": "Fewest connected nodes the run starts with after node_wait."})
    secure_aggregation: bool = field(
        default=False,
        metadata={"help": "Flower's SecAgg+: the server learns only the weighted mean of the uploads (FedIT, FFA-LoRA, "
                          "FedSA-LoRA; docs/deployment.md)."},
    )  # fmt: skip
    secagg_num_shares: float = field(
        default=1.0, metadata={"help": "SecAgg+ shares per client: a fraction of the round's clients, or a count > 2."}
    )
    secagg_reconstruction_threshold: float = field(
        default=0.5, metadata={"help": "SecAgg+ shares needed to unmask: a fraction of the shares, or a count."}
    )
    secagg_clipping_range: float = field(
        default=8.0, metadata={"help": "SecAgg+ clips every uploaded value to [-range, range] before quantising."}
    )
    secagg_quantization_range: int = field(default=2**22, metadata={"help": "SecAgg+ quantisation levels."})
    secagg_modulus_range: int = field(default=2**32, metadata={"help": "SecAgg+ modulus (a power of 2)."})

    def __post_init__(self) -> None:
        problems = [
            f"{name} must be > 0, got {getattr(self, name)}"
            for name in ("round_timeout", "node_wait")
            if not getattr(self, name) > 0
        ]
        problems += [
            f"{name} must be >= {low}, got {getattr(self, name)}"
            for name, low in (("min_replies", 1), ("round_retries", 0), ("min_nodes", 1))
            if getattr(self, name) < low
        ]
        if self.secure_aggregation:
            problems += [
                f"{name} must be > 0, got {getattr(self, name)}"
                for name in ("secagg_num_shares", "secagg_reconstruction_threshold", "secagg_clipping_range",
                             "secagg_quantization_range")
                if not getattr(self, name) > 0
            ]  # fmt: skip
            if self.secagg_modulus_range <= self.secagg_quantization_range or self.secagg_modulus_range & (
                self.secagg_modulus_range - 1
            ):
                problems.append("secagg_modulus_range must be a power of 2 above secagg_quantization_range")
        if problems:
            raise ValueError("; ".join(problems))


def deployment_field_names() -> set[str]:
    return {f.name for f in dataclasses.fields(DeploymentArguments)}
