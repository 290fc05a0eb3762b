from .config import SubspaceRegLoraConfig, validate_subspace_reg_ranks

__all__ = ["SubspaceRegLoraConfig", "validate_subspace_reg_ranks"]
