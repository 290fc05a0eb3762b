"""Runtimes that drive the strategies on a PEFT model: the client round (``client.py``), the Accelerate-driven
``FederatedTrainer`` and its arguments, checkpoints, the run pipeline.

The names load their module on first use (PEP 562): the client round (used by federated unmixing),
``peft_fed.runtime.run_arguments`` and the CLI stay free of transformers until a run needs it.
"""

from __future__ import annotations

from .._lazy import lazy_module_attributes

_LAZY = {
    "FederatedTrainingArguments": ".arguments",
    "ClientRoundResult": ".client",
    "run_client": ".client",
    "run_client_round": ".client",
    "FederatedTrainer": ".trainer",
}

__getattr__, __dir__ = lazy_module_attributes(__name__, globals(), _LAZY)

__all__ = sorted(_LAZY)
