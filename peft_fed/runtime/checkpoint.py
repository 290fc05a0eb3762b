"""Atomic checkpoints of the whole federated state, and their verification on resume.

A checkpoint is a folder ``OUTPUT_DIR/checkpoints/round-XXXXXX`` (XXXXXX = completed rounds) holding

* ``server.safetensors``: the strategy's server state (global factors, averaged heads, merge history);
* ``clients.safetensors``: every client's state (FedSmoothLoRA's last uploads, FedSA-LoRA's own ``B``...);
* ``backbone.safetensors``: the current frozen weights of the adapted layers (merges included);
* ``meta.json``: round, method, number of clients and the metrics history;
* ``manifest.json``: SHA-256 and size of every other file, written last.

It is written into a hidden temporary folder and renamed into place, so a run killed mid-write
leaves no half checkpoint under a real name. A folder with a real name whose manifest is missing or
does not match is refused with :class:`CorruptCheckpointError`, never skipped.

No RNG state is stored because none is needed: every random stream of a run (client sampling, each client's
batches, dropout and initialisation) is seeded from ``(seed, round, client id)``, so a resumed run replays
the streams of an uninterrupted one (tested bit-for-bit in ``tests/runtime/test_trainer.py``).
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import re
import shutil
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from ..state import ClientState, ServerState

logger = logging.getLogger(__name__)

CHECKPOINT_PATTERN = re.compile(r"^round-(\d{6})$")
_FILES = ("server.safetensors", "clients.safetensors", "backbone.safetensors", "meta.json")


class CorruptCheckpointError(RuntimeError):
    """A checkpoint folder that is incomplete or whose files do not match their manifest."""


@dataclass
class FederatedCheckpoint:
    round: int
    server_state: ServerState
    client_states: dict[str, ClientState]
    backbone: dict[str, torch.Tensor]
    meta: dict[str, Any]


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for chunk in iter(lambda: handle.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def checkpoint_dir(output_dir: str | os.PathLike, round_index: int) -> Path:
    return Path(output_dir) / "checkpoints" / f"round-{round_index:06d}"


def save_checkpoint(
    output_dir: str | os.PathLike,
    round_index: int,
    server_state: ServerState,
    client_states: Mapping[str, ClientState],
    backbone: Mapping[str, torch.Tensor],
    meta: Mapping[str, Any],
    keep_last: int | None = None,
) -> Path:
    """Write the checkpoint of ``round_index`` completed rounds atomically; return its folder."""
    final = checkpoint_dir(output_dir, round_index)
    final.parent.mkdir(parents=True, exist_ok=True)
    tmp = final.parent / f".tmp-{final.name}-{os.getpid()}"
    if tmp.exists():
        shutil.rmtree(tmp)
    tmp.mkdir()
    flat, server_meta = server_state.state_dict()
    save_file(flat, tmp / "server.safetensors", metadata=server_meta)
    client_flat: dict[str, torch.Tensor] = {}
    client_meta: dict[str, dict[str, str]] = {}
    for cid, state in client_states.items():
        tensors, info = state.state_dict()
        client_meta[cid] = info
        for key, tensor in tensors.items():
            client_flat[f"{cid}||{key}"] = tensor
    save_file(client_flat, tmp / "clients.safetensors", metadata={"clients": json.dumps(client_meta)})
    save_file({k: v.detach().contiguous().cpu() for k, v in backbone.items()}, tmp / "backbone.safetensors")
    (tmp / "meta.json").write_text(json.dumps({"round": round_index, **meta}, indent=1, default=str))
    manifest = {name: {"sha256": _sha256(tmp / name), "bytes": (tmp / name).stat().st_size} for name in _FILES}
    (tmp / "manifest.json").write_text(json.dumps(manifest, indent=1))
    for name in (*_FILES, "manifest.json"):
        with open(tmp / name, "rb") as handle:
            os.fsync(handle.fileno())
    if final.exists():
        shutil.rmtree(final)
    os.replace(tmp, final)
    if keep_last:
        for old in list_checkpoints(output_dir)[:-keep_last]:
            shutil.rmtree(old)
    return final


def list_checkpoints(output_dir: str | os.PathLike) -> list[Path]:
    """Committed checkpoint folders, oldest first (temporary folders of interrupted writes are not listed)."""
    root = Path(output_dir) / "checkpoints"
    if not root.is_dir():
        return []
    found = [p for p in root.iterdir() if p.is_dir() and CHECKPOINT_PATTERN.match(p.name)]
    return sorted(found, key=lambda p: int(CHECKPOINT_PATTERN.match(p.name).group(1)))


def verify_checkpoint(path: Path) -> None:
    manifest_path = path / "manifest.json"
    if not manifest_path.is_file():
        raise CorruptCheckpointError(
            f"checkpoint {path} has no manifest.json: it is incomplete or was not written by peft-fed. "
            "Delete it to resume from an earlier checkpoint, or start a new run."
        )
    try:
        manifest = json.loads(manifest_path.read_text())
    except json.JSONDecodeError as error:
        raise CorruptCheckpointError(f"checkpoint {path}: manifest.json is not valid JSON ({error})") from error
    for name in _FILES:
        file = path / name
        if name not in manifest or not file.is_file():
            raise CorruptCheckpointError(f"checkpoint {path} is missing {name}")
        if file.stat().st_size != manifest[name]["bytes"] or _sha256(file) != manifest[name]["sha256"]:
            raise CorruptCheckpointError(
                f"checkpoint {path}: {name} does not match its manifest (truncated or modified). "
                "Delete this checkpoint to resume from an earlier one."
            )


def load_checkpoint(path: str | os.PathLike) -> FederatedCheckpoint:
    """Verify and load one checkpoint folder."""
    path = Path(path)
    verify_checkpoint(path)
    meta = json.loads((path / "meta.json").read_text())
    with safe_open(path / "server.safetensors", framework="pt") as reader:
        server_meta = reader.metadata()
    server_state = ServerState.from_state_dict(load_file(path / "server.safetensors"), server_meta)
    with safe_open(path / "clients.safetensors", framework="pt") as reader:
        client_meta = json.loads(reader.metadata()["clients"])
    grouped: dict[str, dict[str, torch.Tensor]] = {cid: {} for cid in client_meta}
    for key, tensor in load_file(path / "clients.safetensors").items():
        cid, _, rest = key.partition("||")
        grouped[cid][rest] = tensor
    client_states = {cid: ClientState.from_state_dict(grouped[cid], client_meta[cid]) for cid in client_meta}
    return FederatedCheckpoint(
        round=int(meta["round"]),
        server_state=server_state,
        client_states=client_states,
        backbone=load_file(path / "backbone.safetensors"),
        meta=meta,
    )


def latest_checkpoint(output_dir: str | os.PathLike) -> Path | None:
    checkpoints = list_checkpoints(output_dir)
    return checkpoints[-1] if checkpoints else None
