"""A federated result as a plain transformers model: ``W_T + s B A`` merged, heads final."""

from __future__ import annotations

import copy
import os
from typing import Any

from peft import PeftModel

from .adapter import _base_model_id, _prepare_output_dir, _require_peft_model, _task_name
from .model_card import write_card_and_report
from .report import ExportReport, FederatedRunInfo


def export_merged(
    model: PeftModel,
    output_dir: str | os.PathLike,
    *,
    run_info: FederatedRunInfo | None = None,
    adapter_name: str = "default",
    tokenizer: Any = None,
    overwrite: bool = False,
    safe_serialization: bool = True,
) -> ExportReport:
    """Write the federated model as a plain transformers model: ``W_T + s B A`` merged, heads final.

    The model is not modified: a copy is merged (``merge_and_unload``) and saved with ``save_pretrained``,
    with the tokenizer when given and a model card that records the run. Needs the memory of one more model.

    Example:

    ```python
    >>> import tempfile
    >>> from peft import LoraConfig, get_peft_model
    >>> from transformers import BertConfig, BertForSequenceClassification
    >>> from peft_fed.export import export_merged
    >>> config = BertConfig(hidden_size=32, num_hidden_layers=1, num_attention_heads=2, intermediate_size=37, vocab_size=99)
    >>> model = get_peft_model(
    ...     BertForSequenceClassification(config), LoraConfig(r=4, target_modules=["query"], task_type="SEQ_CLS")
    ... )
    >>> export_merged(model, tempfile.mkdtemp()).kind
    'merged'

    ```
    """
    model = _require_peft_model(model, adapter_name)
    path = _prepare_output_dir(output_dir, overwrite)
    # A copy is needed here (unlike export_adapter, which writes tensors): a plain transformers model is saved from
    # PEFT's merge_and_unload, which merges in place *and* replaces every LoRA layer and modules_to_save wrapper by
    # the module it wraps. Undoing that on the caller's model would mean re-wrapping it and restoring W from saved
    # copies (unmerge subtracts, which is not bit-exact), and building the merged state dict ourselves would
    # re-implement PEFT's unloading (LoRA layers, heads, trainable tokens, quantized merges) across the PEFT versions
    # we support. Under ZeRO-3 it runs inside peft_bridge.full_parameters, like every whole-model read.
    work = copy.deepcopy(model)
    if work.active_adapter != adapter_name:
        # unload/merge keep the *active* adapter's modules_to_save copy (its final heads)
        work.set_adapter(adapter_name)
    merged = work.merge_and_unload(adapter_names=[adapter_name])
    merged.save_pretrained(str(path), safe_serialization=safe_serialization)
    if tokenizer is not None:
        tokenizer.save_pretrained(str(path))
    train_config = model.peft_config[adapter_name]
    report = ExportReport(output_dir=str(path), kind="merged", run_info=run_info)
    write_card_and_report(
        path,
        report,
        base_model=_base_model_id(model, adapter_name, run_info),
        model_class=type(merged).__name__,
        task_type=_task_name(train_config.task_type),
        num_labels=None,
        changed_backbone=False,
    )
    return report
