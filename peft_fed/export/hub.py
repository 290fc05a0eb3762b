"""Upload an export folder to the Hugging Face Hub."""

from __future__ import annotations

import json
import os
from pathlib import Path

from huggingface_hub import HfApi

from .report import REPORT_FILE


def push_to_hub(
    output_dir: str | os.PathLike,
    repo_id: str,
    *,
    private: bool = False,
    token: str | None = None,
    commit_message: str = "Upload federated LoRA export (peft-fed)",
    revision: str | None = None,
) -> str:
    """Upload an export folder to the Hub with huggingface_hub's standard ``create_repo`` + ``upload_folder``.

    Before uploading, the model card's loading snippet is pointed at ``repo_id`` instead of the local folder
    (``README.md`` is rewritten in place). Returns the commit URL.

    Example:

    ```python
    >>> from peft_fed.export import push_to_hub
    >>> push_to_hub("exports/fedsmooth-r8", "me/fedsmooth-bert-r8", private=True)  # doctest: +SKIP
    ```
    """
    path = Path(output_dir)
    if not path.is_dir() or not any(
        (path / name).exists() for name in ("adapter_config.json", "config.json")
    ):
        raise ValueError(f"{str(path)!r} is not an export folder (no adapter_config.json or config.json)")
    api = HfApi(token=token)
    repo_url = api.create_repo(repo_id, private=private, exist_ok=True, repo_type="model")
    # create_repo resolves a bare name to the user's namespace; the upload must use the resolved id
    resolved = repo_url.repo_id if isinstance(getattr(repo_url, "repo_id", None), str) else repo_id
    _point_card_at(path, resolved)
    commit = api.upload_folder(
        repo_id=resolved,
        folder_path=str(path),
        commit_message=commit_message,
        repo_type="model",
        revision=revision,
    )
    return str(getattr(commit, "commit_url", commit))


def _point_card_at(path: Path, repo_id: str) -> None:
    card, report = path / "README.md", path / REPORT_FILE
    if not card.exists() or not report.exists():
        return
    local = json.loads(report.read_text()).get("output_dir")
    if local:
        card.write_text(card.read_text().replace(json.dumps(local), json.dumps(repo_id)))
