"""Atomic checkpoints of the whole federated state, and their verification on resume.

A checkpoint is a folder ``OUTPUT_DIR/checkpoints/round-XXXXXX`` (XXXXXX = completed rounds) holding

* ``server.safetensors``: the strategy's server state (global factors, averaged heads, merge history);
* ``clients.safetensors``: every client's state (FedSmoothLoRA's last uploads, FedSA-LoRA's own ``B``...);
* ``backbone.safetensors``: the current frozen weights of the adapted layers (merges included);
* ``meta.json``: round, method, number of clients, the metrics history and the run's record
  (``fingerprint``: every setting that changes the result; ``settings``: those that do not; ``versions``);
* ``manifest.json``: SHA-256 and size of every other file, written last.

It is written into a hidden temporary folder ``.tmp-round-XXXXXX-PID`` and renamed into place, so a run killed
mid-write leaves no half checkpoint under a real name. Re-saving a round moves the old copy aside
(``.old-round-XXXXXX-PID``) before the new one is renamed in, so a valid copy exists at every moment; old
checkpoints beyond ``keep_last`` are renamed to ``.del-...`` before they are deleted. :func:`clean_stale_files`
removes the leftovers of a killed writer (a dead process's ``.tmp-``/``.del-`` folders; an ``.old-`` copy is put
back when its round is missing). A folder with a real name whose manifest is missing or does not match is refused
with :class:`CorruptCheckpointError`, never skipped.

The run folder itself records what made it: ``OUTPUT_DIR/run_fingerprint.json`` (written by the trainer after its
checks, see :func:`check_output_dir` and :func:`fingerprint_differences`).

No RNG state is stored because none is needed: every random stream of a run (client sampling, each client's
batches, dropout and initialisation) is seeded from ``(seed, round, client id)``, so a resumed run replays
the streams of an uninterrupted one (tested bit-for-bit in ``tests/runtime/test_trainer.py``).
"""

from __future__ import annotations

import enum
import hashlib
import json
import logging
import os
import re
import shutil
import sys
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from ..state import ClientState, ServerState

logger = logging.getLogger(__name__)

CHECKPOINT_PATTERN = re.compile(r"^round-(\d{6})$")
# leftovers of a checkpoint write: .tmp- (being written), .old- (the previous copy of a re-saved round), .del- (an
# old checkpoint being deleted); the last number is the writer's process id
_LEFTOVER_PATTERN = re.compile(r"^\.(tmp|old|del)-(round-\d{6})-(\d+)$")
_TEMP_FILE_PATTERN = re.compile(r"^\.(.+)\.tmp-(\d+)$")  # of write_text_atomic
_FILES = ("server.safetensors", "clients.safetensors", "backbone.safetensors", "meta.json")
RUN_FINGERPRINT_FILE = "run_fingerprint.json"
# what makes a folder hold a run (refused as the output_dir of a new run unless overwrite_output_dir)
RUN_FILES = ("metrics.jsonl", "checkpoints", "final", "run_config.json", RUN_FINGERPRINT_FILE, "convergence.png", "client_states")


class CorruptCheckpointError(RuntimeError):
    """A checkpoint folder that is incomplete or whose files do not match their manifest."""


class OutputDirInUseError(ValueError):
    """A new (not resumed) run into a folder that already holds a run, without ``overwrite_output_dir``."""


class ResumeMismatchError(ValueError):
    """A resume whose settings or model differ from the checkpoint's in a way that changes the result."""


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
    clean_stale_files(output_dir)
    tmp = final.parent / f".tmp-{final.name}-{os.getpid()}"
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
    (tmp / "meta.json").write_text(json.dumps({"round": round_index, **meta}, indent=1, default=_json_default))
    manifest = {name: {"sha256": _sha256(tmp / name), "bytes": (tmp / name).stat().st_size} for name in _FILES}
    (tmp / "manifest.json").write_text(json.dumps(manifest, indent=1))
    for name in (*_FILES, "manifest.json"):
        with open(tmp / name, "rb") as handle:
            os.fsync(handle.fileno())
    _fsync_dir(tmp)
    if final.exists():
        # a valid copy of the round exists at every moment: the old one moves aside, the new one comes in
        aside = final.parent / f".old-{final.name}-{os.getpid()}"
        os.replace(final, aside)
        os.replace(tmp, final)
        _fsync_dir(final.parent)
        shutil.rmtree(aside)
    else:
        os.replace(tmp, final)
    _fsync_dir(final.parent)
    if keep_last:
        for old in list_checkpoints(output_dir)[:-keep_last]:
            _remove_checkpoint(old)
    return final


def _remove_checkpoint(path: Path) -> None:
    """Delete a checkpoint folder; renamed first, so a kill mid-delete leaves no half folder under a real name."""
    doomed = path.parent / f".del-{path.name}-{os.getpid()}"
    os.replace(path, doomed)
    shutil.rmtree(doomed)


def _fsync_dir(path: Path) -> None:
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def _pid_alive(pid: int) -> bool:
    if pid == os.getpid():
        return False  # one writer per process, and it writes one thing at a time: ours are stale
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def clean_stale_files(output_dir: str | os.PathLike) -> list[Path]:
    """Remove what killed writes left in ``output_dir`` (temporary files) and its ``checkpoints/`` (temporary and
    half-deleted checkpoint folders); put back the aside copy of a re-saved round whose new copy never arrived.
    Leftovers of a process that is still alive are left alone. Returns what was removed or restored."""
    done: list[Path] = []
    root = Path(output_dir)
    ckpts = root / "checkpoints"
    if ckpts.is_dir():
        for entry in sorted(ckpts.iterdir()):
            match = _LEFTOVER_PATTERN.match(entry.name)
            if not match or _pid_alive(int(match.group(3))):
                continue
            kind, name = match.group(1), match.group(2)
            if kind == "old" and not (ckpts / name).exists():
                os.replace(entry, ckpts / name)  # the new copy never arrived: the old one is the valid one
                logger.warning("restored checkpoint %s from its copy %s (a re-save was interrupted)", ckpts / name, entry.name)
            else:
                shutil.rmtree(entry, ignore_errors=True)
            done.append(entry)
    if root.is_dir():
        for entry in root.iterdir():
            match = _TEMP_FILE_PATTERN.match(entry.name)
            if match and entry.is_file() and not _pid_alive(int(match.group(2))):
                entry.unlink(missing_ok=True)
                done.append(entry)
    return done


def write_text_atomic(path: str | os.PathLike, text: str) -> None:
    """Replace ``path`` with ``text`` atomically (temporary file, fsync, ``os.replace``): a reader or a crash sees
    the old file or the new one, never a half one."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    with open(tmp, "w") as handle:
        handle.write(text)
        handle.flush()
        os.fsync(handle.fileno())
    os.replace(tmp, path)
    _fsync_dir(path.parent)


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


# ---------------------------------------------------------------------- what made a run: fingerprint and folder


def _json_default(value: Any) -> Any:
    if isinstance(value, enum.Enum):
        return value.value
    if isinstance(value, Path):
        return str(value)
    if isinstance(value, (set, frozenset)):
        return sorted(value, key=str)
    return str(value)


def jsonable(value: Any) -> Any:
    """``value`` as it reads back from JSON (enums as their values, tuples as lists), so a recorded setting and a
    live one compare equal."""
    return json.loads(json.dumps(value, default=_json_default))


def package_versions() -> dict[str, str]:
    """Versions of what computes a run (recorded with it; a difference on resume is a warning, not an error)."""
    from importlib.metadata import PackageNotFoundError, version

    out = {"python": sys.version.split()[0]}
    for name in ("peft_fed", "peft", "transformers", "torch", "accelerate"):
        try:
            out[name] = version(name.replace("_", "-"))
        except PackageNotFoundError:
            module = sys.modules.get(name)
            out[name] = str(getattr(module, "__version__", "unknown"))
    return out


def digest_tensors(tensors: Mapping[str, torch.Tensor]) -> str:
    """SHA-256 of named tensors (names, dtypes, shapes and bytes), first 16 hex digits."""
    digest = hashlib.sha256()
    for name in sorted(tensors):
        tensor = tensors[name].detach().cpu().contiguous()
        digest.update(f"{name}|{tensor.dtype}|{tuple(tensor.shape)}|".encode())
        digest.update(tensor.reshape(-1).view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()[:16]


def digest_dataset(dataset: Any, samples: int = 16) -> str:
    """Size and a SHA-256 of up to ``samples`` evenly spaced rows of a dataset ("n=120 sha256:..."): cheap for a
    large dataset, and different for another partition, seed or preprocessing in practice."""
    try:
        n = len(dataset)
    except TypeError:
        return "unsized"
    digest = hashlib.sha256()
    try:
        picks = sorted({round(i * (n - 1) / max(1, samples - 1)) for i in range(min(n, samples))}) if n else []
        for i in picks:
            digest.update(json.dumps(dataset[i], sort_keys=True, default=lambda v: getattr(v, "tolist", lambda: str(v))()).encode())
    except Exception:  # a dataset whose rows cannot be read this way: its size alone
        return f"n={n}"
    return f"n={n} sha256:{digest.hexdigest()[:16]}"


def fingerprint_differences(recorded: Mapping[str, Any], current: Mapping[str, Any]) -> list[str]:
    """``"setting: recorded -> current"`` for every setting both record with different values (a setting only one
    side records, e.g. the model name of a pipeline run resumed from Python, cannot be compared and is skipped)."""
    lines = []
    for key in sorted(set(recorded) & set(current)):
        if jsonable(recorded[key]) != jsonable(current[key]):
            lines.append(f"{key}: {_short(recorded[key])} -> {_short(current[key])}")
    return lines


def _short(value: Any, limit: int = 80) -> str:
    text = json.dumps(jsonable(value))
    return text if len(text) <= limit else text[: limit - 3] + "..."


def run_files(output_dir: str | os.PathLike) -> list[str]:
    """The files of a run already in ``output_dir`` (empty when there is none; an empty checkpoints/ is no run)."""
    root = Path(output_dir)
    found = []
    for name in RUN_FILES:
        path = root / name
        if name == "checkpoints":
            if path.is_dir() and any(path.iterdir()):
                found.append(f"checkpoints/{latest_checkpoint(root).name}" if latest_checkpoint(root) else "checkpoints/")
        elif path.exists():
            found.append(name + ("/" if path.is_dir() else ""))
    return found


def check_output_dir(output_dir: str | os.PathLike, *, resume: bool, overwrite: bool) -> list[str]:
    """Refuse (:class:`OutputDirInUseError`, one line) a new run into a folder that holds a run, unless ``resume``
    (continue it) or ``overwrite`` (replace it); returns the run files found. Reads only."""
    found = run_files(output_dir)
    if found and not resume and not overwrite:
        raise OutputDirInUseError(
            f"output_dir {str(output_dir)!r} already holds a run ({', '.join(found)}): continue it with --resume "
            "(resume=True), replace it with --overwrite_output_dir (overwrite_output_dir=True), or choose another "
            "--output_dir"
        )
    return found


def remove_run_files(output_dir: str | os.PathLike) -> list[str]:
    """Delete the run in ``output_dir`` (metrics, checkpoints, final/, run_config.json, its record, the plot);
    other files are left alone. Returns what was removed."""
    root = Path(output_dir)
    removed = []
    for name in RUN_FILES:
        path = root / name
        if path.is_dir():
            shutil.rmtree(path)
            removed.append(name)
        elif path.exists():
            path.unlink()
            removed.append(name)
    clean_stale_files(root)
    return removed


def structure_differences(
    path: str | os.PathLike,
    checkpoint: FederatedCheckpoint,
    backbone: Mapping[str, torch.Tensor],
    server_state: ServerState,
) -> str | None:
    """One line saying how a checkpoint's layers do not fit this run's model (names and shapes of the adapted
    layers' weights, the server's factors and heads), or ``None`` when they fit."""
    problems: list[str] = []

    def compare(what: str, theirs: Mapping[str, Any], ours: Mapping[str, Any]) -> None:
        missing, extra = sorted(set(ours) - set(theirs)), sorted(set(theirs) - set(ours))
        if missing:
            problems.append(f"{what} {_names(missing)} of this model missing from the checkpoint")
        if extra:
            problems.append(f"{what} {_names(extra)} in the checkpoint not in this model")
        for key in sorted(set(theirs) & set(ours)):
            if tuple(theirs[key]) != tuple(ours[key]):
                problems.append(f"{what} {key!r} is {tuple(theirs[key])} in the checkpoint, {tuple(ours[key])} here")

    compare("layer", {k: v.shape for k, v in checkpoint.backbone.items()}, {k: v.shape for k, v in backbone.items()})
    compare(
        "factor",
        {f"{layer}.{n}": t.shape for layer, ts in checkpoint.server_state.layers.items() for n, t in ts.items()},
        {f"{layer}.{n}": t.shape for layer, ts in server_state.layers.items() for n, t in ts.items()},
    )
    compare("head", {k: v.shape for k, v in checkpoint.server_state.extras.items()}, {k: v.shape for k, v in server_state.extras.items()})
    if not problems:
        return None
    more = f" (and {len(problems) - 2} more)" if len(problems) > 2 else ""
    return (
        f"checkpoint {path} does not fit this model: {'; '.join(problems[:2])}{more}; it was written for another "
        "model, r or target_modules: resume with those, or start a new run in another output_dir"
    )


def _names(names: Sequence[str], limit: int = 3) -> str:
    shown = ", ".join(repr(n) for n in names[:limit])
    return shown + (f" and {len(names) - limit} more" if len(names) > limit else "")
