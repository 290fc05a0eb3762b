"""Checks of an adapter folder on disk before it is loaded: a cut-short ``adapter_model.safetensors`` is named
as such instead of safetensors' "invalid header length"."""

from __future__ import annotations

import json
import os
import struct
from pathlib import Path

ADAPTER_WEIGHT_FILES = ("adapter_model.safetensors", "adapter_model.bin")


def check_safetensors_file(path: str | os.PathLike) -> None:
    """Check that a ``.safetensors`` file is whole: its 8-byte header length, its JSON header and the tensor data
    the header describes all fit the file's size. A one-line ``ValueError`` naming the file otherwise."""
    path = Path(path)
    size = path.stat().st_size

    def bad(detail: str) -> ValueError:
        return ValueError(f"{path} is truncated or corrupt ({detail}); copy or export it again")

    with open(path, "rb") as handle:
        if size < 8:
            raise bad(f"{size} bytes, shorter than the 8-byte header length")
        (header_length,) = struct.unpack("<Q", handle.read(8))
        if header_length == 0 or 8 + header_length > size:
            raise bad(f"its header claims {header_length} bytes but the file has {size}")
        try:
            header = json.loads(handle.read(header_length).decode("utf-8"))
        except (UnicodeDecodeError, json.JSONDecodeError):
            raise bad("its header is not valid JSON") from None
    if not isinstance(header, dict):
        raise bad("its header is not a mapping")
    ends = [
        entry["data_offsets"][1]
        for key, entry in header.items()
        if key != "__metadata__" and isinstance(entry, dict) and len(entry.get("data_offsets", ())) == 2
    ]
    data_size = size - 8 - header_length
    needed = max(ends, default=0)
    if needed != data_size:
        raise bad(f"its tensors need {needed} bytes of data, the file holds {data_size}")


def check_adapter_files(folder: str | os.PathLike) -> None:
    """Check a saved PEFT adapter folder before loading it: ``adapter_config.json`` is JSON, the weights file is
    there and (``.safetensors``) whole. One-line ``ValueError``/``FileNotFoundError`` naming the file."""
    folder = Path(folder)
    config = folder / "adapter_config.json"
    if not config.is_file():
        raise FileNotFoundError(f"{config} does not exist: {folder} is not a saved adapter")
    try:
        json.loads(config.read_text())
    except (UnicodeDecodeError, json.JSONDecodeError) as error:
        raise ValueError(f"{config} is truncated or corrupt (not valid JSON: {error})") from None
    weights = [folder / name for name in ADAPTER_WEIGHT_FILES if (folder / name).is_file()]
    if not weights:
        raise FileNotFoundError(f"{folder} holds no adapter weights ({' or '.join(ADAPTER_WEIGHT_FILES)})")
    if weights[0].suffix == ".safetensors":
        check_safetensors_file(weights[0])
