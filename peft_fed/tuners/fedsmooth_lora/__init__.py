from .config import FedSmoothLoraConfig, validate_fedsmooth_ranks

__all__ = ["FedSmoothLoraConfig", "validate_fedsmooth_ranks"]
