"""Share the result of a federated LoRA run with people who only have stock PEFT.

Methods that merge updates into the backbone during training (FedSmoothLoRA, FLoRA, FedEx-LoRA, FRLoRA)
end with a changed backbone ``W_T`` *and* an adapter ``(B, A)`` on top of it, so the adapter alone means
nothing on the original base model. What is shared instead is the cumulative change of every adapted
layer (SPEC, "Baselines"):

    Delta = (W_T + s * B @ A) - W_0        (out x in, per adapted layer)

either as a standard PEFT LoRA adapter of the *original* base model (``peft_type`` LORA, built from the
truncated SVD of ``Delta`` at a given rank, or at the smallest rank meeting a relative-error bound, the
error reported), or as a merged full model. Methods that never touch the backbone export the same way
(their ``Delta`` is ``s * B @ A``, exact at the training rank).

The adapter is written by PEFT's own ``save_pretrained`` from a plain :class:`~peft.LoraConfig`, so a
process that never imports ``peft_fed`` loads it with ``PeftModel.from_pretrained``. A model card
(``README.md``) records the federated run and shows how to load the result; :func:`push_to_hub` uploads
the folder with huggingface_hub's standard upload. The other direction, starting a federated run from an
existing adapter, is loading: :func:`peft_fed.modeling.load_initial_adapter`.

Modules: ``report`` (:class:`FederatedRunInfo`, :class:`ExportReport`), ``adapter`` (the cumulative change and
its low-rank compression, :func:`export_adapter`), ``merged`` (:func:`export_merged`), ``model_card``, ``hub``
(:func:`push_to_hub`), ``files`` (:func:`check_adapter_files`: a truncated or corrupt saved adapter named before
loading).
"""

from .adapter import cumulative_change, export_adapter
from .files import check_adapter_files, check_safetensors_file
from .hub import push_to_hub
from .merged import export_merged
from .report import REPORT_FILE, ExportReport, FederatedRunInfo

__all__ = [
    "REPORT_FILE",
    "ExportReport",
    "FederatedRunInfo",
    "check_adapter_files",
    "check_safetensors_file",
    "cumulative_change",
    "export_adapter",
    "export_merged",
    "push_to_hub",
]
