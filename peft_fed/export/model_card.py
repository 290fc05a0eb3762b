"""The model card (``README.md``) of an export: the federated run, the export's fidelity and how to load it."""

from __future__ import annotations

import json
import os
from pathlib import Path

from huggingface_hub import ModelCard, ModelCardData
from huggingface_hub.errors import HFValidationError
from huggingface_hub.utils import validate_repo_id

from .report import REPORT_FILE, ExportReport

# Base classes the model card's loading snippet falls back to when the model's own class is not importable
# from transformers (e.g. remote code), keyed by PEFT task type.
_AUTO_CLASS_BY_TASK = {
    "SEQ_CLS": "AutoModelForSequenceClassification",
    "TOKEN_CLS": "AutoModelForTokenClassification",
    "CAUSAL_LM": "AutoModelForCausalLM",
    "SEQ_2_SEQ_LM": "AutoModelForSeq2SeqLM",
    "QUESTION_ANS": "AutoModelForQuestionAnswering",
    "FEATURE_EXTRACTION": "AutoModel",
}
# Task heads whose size is not in every base checkpoint (a sentence encoder has no classifier): the snippet
# passes num_labels so the base model builds a head of the right shape for the adapter's saved head.
_TASKS_WITH_LABELS = ("SEQ_CLS", "TOKEN_CLS")




# The key of FederatedRunInfo.extra that holds a differentially private run's guarantee
# (peft_fed.privacy.PrivacyGuarantee.to_dict()); the card gives it its own section.
PRIVACY_KEY = "differential_privacy"


def _privacy_section(guarantee: dict) -> list[str]:
    epsilon = guarantee["epsilon"]
    epsilon_text = f"{epsilon:.3g}" if epsilon is not None and epsilon != float("inf") else "infinite (no noise)"
    covered = (
        "the server's state after every round, hence every broadcast and this adapter"
        if guarantee["covers_global_model"]
        else "the shared tensors the server aggregated (its state after every round, every broadcast); NOT this "
        "adapter as a whole: the method's global model also averages factors the clients kept private, which "
        "were never noised"
    )
    noise_by = guarantee.get("noise_added_by", "server")
    server_note = (
        "the server itself (it saw every client's upload before clipping and noise), "
        if noise_by == "server"
        else "a server that colludes with clients (it learns only the sum of the clipped, noised updates of at least "
        "SecAgg+'s reconstruction threshold of clients, each adding its share of the noise), "
    )
    return [
        "## Privacy",
        "",
        f"Client-level differential privacy: **(epsilon = {epsilon_text}, delta = {guarantee['delta']:.3g})** after "
        f"{guarantee['rounds']} rounds. The unit of privacy is {guarantee['unit']}.",
        "",
        f"- Mechanism: each client's update clipped to L2 norm {guarantee['clip']:g}; the unweighted mean over the "
        f"{guarantee['clients_per_round']} clients sampled (without replacement) from {guarantee['num_clients']} each "
        f"round, plus Gaussian noise of std {guarantee['noise_multiplier']:.4g} x clip / "
        f"{guarantee['clients_per_round']}",
        f"- Noise added by: {noise_by}",
        f"- Accountant: {guarantee['accountant']}",
        f"- Covers: {covered}",
        f"- Does not cover: {server_note}which clients took part in which round, their sample counts, and anything "
        "outside the model (logs, metrics)",
        "",
    ]


def _hub_id_or_none(name: str | None) -> str | None:
    """``name`` if it can be a Hub model id (the card's ``base_model`` metadata must be one), else ``None``."""
    if not name or os.path.exists(name):
        return None
    try:
        validate_repo_id(name)
    except HFValidationError:
        return None
    return name


def _fmt(value: float) -> str:
    return "0" if value == 0 else f"{value:.3g}"


def _loading_snippet(
    report: ExportReport,
    base_model: str | None,
    model_class: str,
    task_type: str | None,
    num_labels: int | None,
) -> str:
    import transformers

    if not hasattr(transformers, model_class):
        model_class = _AUTO_CLASS_BY_TASK.get(task_type or "", "AutoModel")
    location = json.dumps(report.output_dir)
    if report.kind == "merged":
        return "\n".join(
            [
                f"from transformers import {model_class}",
                "",
                f"model = {model_class}.from_pretrained({location})",
            ]
        )
    label_arg = f", num_labels={num_labels}" if task_type in _TASKS_WITH_LABELS and num_labels else ""
    lines = [
        "from peft import PeftModel",
        f"from transformers import {model_class}",
        "",
        f"base = {model_class}.from_pretrained({json.dumps(base_model or '<base model>')}{label_arg})",
    ]
    initial = report.run_info.initial_adapter if report.run_info is not None else None
    if initial:
        lines += [
            "# the federated run started from this adapter merged into the base model",
            f"base = PeftModel.from_pretrained(base, {json.dumps(initial)}).merge_and_unload()",
        ]
    lines += [f"model = PeftModel.from_pretrained(base, {location})", "model.eval()"]
    return "\n".join(lines)


def _card_text(
    report: ExportReport,
    base_model: str | None,
    model_class: str,
    task_type: str | None,
    num_labels: int | None,
    changed_backbone: bool,
) -> str:
    info = report.run_info
    method = info.method if info is not None else "federated LoRA"
    what = "LoRA adapter" if report.kind == "adapter" else "merged model"
    lines = [
        f"# {method}: federated {what} of `{base_model or 'the base model'}`",
        "",
        "Trained with federated learning by peft-fed, a federated extension of "
        "[PEFT](https://github.com/huggingface/peft). "
        + (
            "This is a standard PEFT LoRA adapter (`peft_type: LORA`): loading it needs only `transformers` "
            "and `peft`."
            if report.kind == "adapter"
            else "This is a plain transformers model with the federated update merged in."
        ),
        "",
        "## Federated run",
        "",
        "| | |",
        "|---|---|",
        f"| Method | {method} |",
        f"| Base model | {base_model or 'not recorded'} |",
    ]
    if info is not None:
        lines += [
            f"| Rounds | {info.rounds} |",
            f"| Clients | {info.participation} |",
            f"| Seed | {info.seed if info.seed is not None else 'not recorded'} |",
        ]
        if info.dataset:
            lines.append(f"| Data | {info.dataset} |")
        if info.training_rank is not None:
            lines.append(f"| LoRA rank during training | {info.training_rank} |")
        if info.initial_adapter:
            lines.append(f"| Started from adapter | {info.initial_adapter} |")
        lines += [f"| {key} | {value} |" for key, value in info.extra.items() if key != PRIVACY_KEY]
    lines.append("")
    if report.kind == "adapter":
        ranks = sorted(set(report.layer_ranks.values()))
        rank_text = (
            str(ranks[0]) if len(ranks) == 1 else f"{ranks[0]} to {ranks[-1]} (per layer, `rank_pattern`)"
        )
        origin = (
            "The method merged updates into the backbone during training, so this adapter holds the "
            "*cumulative* change of each adapted layer, `(W_T + s B A) - W_0`, relative to the original base "
            "model, compressed by a truncated SVD."
            if changed_backbone
            else "Each adapted layer's change `s B A` is stored as the factors of its truncated SVD."
        )
        lines += [
            "## Export",
            "",
            origin,
            "",
            f"- Rank: {rank_text}; {len(report.layer_ranks)} adapted layers, {report.num_parameters:,} LoRA parameters",
            f"- Relative reconstruction error `||Delta - B A||_F / ||Delta||_F`: {_fmt(report.relative_error)} "
            f"overall, {_fmt(report.max_layer_error)} on the worst layer",
        ]
        if report.max_relative_error is not None:
            lines.append(
                f"- Rank chosen as the smallest meeting a per-layer error bound of {report.max_relative_error}"
            )
        if info is not None and info.initial_adapter:
            lines.append(
                f"- The run started from `{info.initial_adapter}` merged into the base model; this adapter applies "
                "on top of that merged model (see below)"
            )
        lines.append("")
    if info is not None and info.extra.get(PRIVACY_KEY):
        lines += _privacy_section(info.extra[PRIVACY_KEY])
    lines += [
        "## How to load",
        "",
        "```python",
        _loading_snippet(report, base_model, model_class, task_type, num_labels),
        "```",
        "",
    ]
    return "\n".join(lines)


def write_card_and_report(
    path: Path,
    report: ExportReport,
    *,
    base_model: str | None,
    model_class: str,
    task_type: str | None,
    num_labels: int | None,
    changed_backbone: bool,
) -> None:
    info = report.run_info
    tags = ["peft-fed", "federated-learning", "lora"]
    if info is not None:
        tags.append(info.method)
    if report.kind == "adapter":
        tags.append("peft")
    data = ModelCardData(
        library_name="peft" if report.kind == "adapter" else "transformers",
        base_model=_hub_id_or_none(base_model),
        datasets=[info.dataset] if info is not None and _hub_id_or_none(info.dataset) else None,
        tags=tags,
    )
    text = _card_text(report, base_model, model_class, task_type, num_labels, changed_backbone)
    # PEFT's save_pretrained wrote its own template card; this replaces it with the federated record.
    ModelCard(f"---\n{data.to_yaml()}\n---\n\n{text}").save(path / "README.md")
    (path / REPORT_FILE).write_text(json.dumps(report.to_dict(), indent=2) + "\n")
