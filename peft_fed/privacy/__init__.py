"""Client-level differential privacy for any runtime: a strategy wrapper, its settings and its accountant.

    strategy = ClientLevelDPStrategy(inner, ClientLevelDPSettings(clip=1.0, target_epsilon=8.0),
                                     num_clients=N, clients_per_round=m, num_rounds=T)

The names load their module on first use, so the run settings can check ``dp_*`` values without importing the
accountant. See docs/privacy.md for the threat model, the per-method table and how to pick the settings.
"""

from __future__ import annotations

from .._lazy import lazy_module_attributes

_LAZY = {
    "ClientLevelDPSettings": ".settings",
    "default_delta": ".settings",
    "settings_from_arguments": ".settings",
    "ClientLevelDPStrategy": ".strategy",
    "ClientLevelDPUnsupportedError": ".strategy",
    "PrivacyGuarantee": ".strategy",
    "client_level_dp_refusal": ".strategy",
    "model_card_facts": ".strategy",
    "calibrate_noise_multiplier": ".accountant",
    "epsilon_after": ".accountant",
    "run_event": ".accountant",
}

__getattr__, __dir__ = lazy_module_attributes(__name__, globals(), _LAZY)

__all__ = sorted(_LAZY)
