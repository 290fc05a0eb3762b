"""Federated LoRA across real machines with Flower (``pip install 'peft-fed[flower]'``).

The very same strategies and client round as the simulation, with Flower for transport, TLS, node
authentication and message chunking: see ``docs/deployment.md``.

* :mod:`~peft_fed.flower.records`: peft-fed's messages <-> Flower records (one layout, versioned);
* :mod:`~peft_fed.flower.server`: :class:`FlowerClientExecutor` (the round engine's executor when clients are
  nodes), :func:`serve` (the ServerApp's main) and :class:`FederatedLoraStrategy` (a Flower ``Strategy``);
* :mod:`~peft_fed.flower.node`: a node's model, data and on-disk state;
* :mod:`~peft_fed.flower.app`: ``server_app`` and ``client_app``;
* :mod:`~peft_fed.flower.local`: certificates, node keys and a local deployment on loopback (``peft-fed deploy``).
"""

from .._lazy import lazy_module_attributes

# lazy: ``peft-fed deploy --help`` reads the settings without importing Flower
_LAZY = {
    "PROTOCOL": ".records",
    "MalformedMessageError": ".records",
    "ProtocolMismatchError": ".records",
    "FederatedLoraStrategy": ".server",
    "FlowerClientExecutor": ".server",
    "TooFewRepliesError": ".server",
    "serve": ".server",
    "DeploymentArguments": ".settings",
}
__getattr__, __dir__ = lazy_module_attributes(__name__, globals(), _LAZY)

__all__ = sorted(_LAZY)
