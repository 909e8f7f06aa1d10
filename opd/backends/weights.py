"""A model's weight files: where they are, what dtype they are stored in, and their hash.

The manifest's weight hash is computed from the safetensors files, streamed, so an 8B teacher is
hashed without a second copy in memory and the hash names the files a user can check with
`sha256sum`; a hub model's commit is recorded next to it.
"""

from __future__ import annotations

import hashlib
import json
import struct
from pathlib import Path

SAFETENSORS_DTYPES = {"F32": "float32", "BF16": "bfloat16", "F16": "float16", "F64": "float64"}


def model_folder(source: str, revision: str | None = None) -> Path | None:
    """The folder holding a model's files: the local folder, or the hub cache's snapshot (no network)."""
    path = Path(source).expanduser()
    if path.is_dir():
        return path
    try:
        from huggingface_hub import try_to_load_from_cache

        found = try_to_load_from_cache(source, "config.json", revision=revision)
    except Exception:  # noqa: BLE001 - no cache entry or an old huggingface_hub: nothing to hash
        return None
    return Path(found).parent if isinstance(found, str) else None


def safetensors_files(folder: Path | None) -> list[Path]:
    return sorted(folder.glob("*.safetensors")) if folder is not None else []


def stored_dtype(files: list[Path]) -> str | None:
    """The floating dtype the weights are stored in (read from the first file's header), or None."""
    for file in files[:1]:
        with open(file, "rb") as f:
            (length,) = struct.unpack("<Q", f.read(8))
            header = json.loads(f.read(length))
        dtypes = {v["dtype"] for k, v in header.items() if k != "__metadata__"}
        floats = [SAFETENSORS_DTYPES[d] for d in sorted(dtypes) if d in SAFETENSORS_DTYPES]
        return floats[0] if floats else None
    return None


def files_sha256(files: list[Path], block: int = 1 << 24) -> str | None:
    """sha256 over the files' names and bytes, in name order, read in 16 MiB blocks."""
    if not files:
        return None
    h = hashlib.sha256()
    for file in files:
        h.update(file.name.encode() + b"\0")
        with open(file, "rb") as f:
            while chunk := f.read(block):
                h.update(chunk)
    return h.hexdigest()
