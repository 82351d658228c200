"""What a checkpoint must prove before any of it is used: that its files are the
ones written at save (sizes and xxh3 checksums in ``megarm_integrity.json``), that
nothing in it can run code when read, and that the weights it yields are finite.

Reading a torch_dist checkpoint unpickles three kinds of data: DCP's ``.metadata``
(``pickle.load`` in torch's reader), each ShardedObject (RNG states, TE extra
state: ``torch.load(weights_only=False)`` in DCP's planner) and ``common.pt``
(``torch.load``, weights-only in torch >= 2.6). :func:`check_safe_to_read` parses
the first two with restricted unpicklers (DCP's metadata classes; plain data,
tensors and numpy arrays) before megatron-core or torch read them unrestricted,
so a crafted checkpoint is refused instead of executing code.
"""

from __future__ import annotations

import io
import json
import os
import pickle
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
import xxhash

MANIFEST = "megarm_integrity.json"
_CHUNK = 64 * 2**20


class CheckpointCorruptError(ValueError):
    """A checkpoint's files are not what its save wrote, or hold unsafe or
    non-finite data; the message names the file or tensor."""


# --------------------------------------------------------------------------- manifest


def file_digest(path: Path) -> tuple[int, str]:
    """(size, xxh3_64 hex) of a file, read in 64 MiB pieces."""
    digest = xxhash.xxh3_64()
    size = 0
    with open(path, "rb") as handle:
        while piece := handle.read(_CHUNK):
            digest.update(piece)
            size += len(piece)
    return size, digest.hexdigest()


def describe_files(directory: Path, names: list[str]) -> dict[str, dict[str, Any]]:
    """Manifest entries for ``names`` (files of ``directory``)."""
    out = {}
    for name in names:
        size, digest = file_digest(directory / name)
        out[name] = {"size": size, "xxh3_64": digest}
    return out


def write_manifest(directory: Path, files: dict[str, dict[str, Any]]) -> None:
    """Write ``megarm_integrity.json`` listing every file of the checkpoint."""
    body = {"version": 1, "algorithm": "xxh3_64", "files": dict(sorted(files.items()))}
    (directory / MANIFEST).write_text(json.dumps(body, indent=1) + "\n")


def read_manifest(directory: Path) -> dict[str, dict[str, Any]] | None:
    """The files a checkpoint's manifest lists, or ``None`` for a checkpoint written
    without one (by an older megarm or another tool)."""
    path = directory / MANIFEST
    if not path.is_file():
        return None
    try:
        body = json.loads(path.read_text())
        files = body["files"]
        assert isinstance(files, dict)
    except (ValueError, KeyError, AssertionError) as exc:
        raise CheckpointCorruptError(f"{path} is not a valid integrity manifest: {exc}") from exc
    return files


def manifest_problems(
    directory: Path, files: dict[str, dict[str, Any]], names: list[str], checksums: bool
) -> list[str]:
    """What differs from the manifest for the files ``names`` (a share of them, when
    several ranks verify one checkpoint)."""
    problems = []
    for name in names:
        path = directory / name
        want = files[name]
        if not path.is_file():
            problems.append(f"{path} is missing")
            continue
        size = path.stat().st_size
        if size != want["size"]:
            problems.append(f"{path} has {size} bytes, the save wrote {want['size']}")
        elif checksums and file_digest(path)[1] != want["xxh3_64"]:
            problems.append(f"{path} does not have the checksum written at save (its bytes changed)")
    return problems


# --------------------------------------------------------------------------- safe reading

# The globals a DCP .metadata pickle may name (torch 2.4-2.13 write these).
_METADATA_CLASSES = {
    "torch.distributed.checkpoint.metadata": {
        "Metadata", "MetadataIndex", "ChunkStorageMetadata", "TensorProperties",
        "TensorStorageMetadata", "BytesStorageMetadata", "StorageMeta", "_MEM_FORMAT_ENCODING",
    },
    "torch.distributed.checkpoint.filesystem": {"_StorageInfo"},
    "torch.distributed.checkpoint.planner": {
        "SavePlan", "WriteItem", "WriteItemType", "TensorWriteData", "LoadPlan", "ReadItem",
        "LoadItemType",
    },
    "torch.serialization": {"_get_layout"},
    "torch": {"Size"},
    "pathlib": {"PosixPath", "WindowsPath", "PurePosixPath", "Path"},
    "collections": {"OrderedDict"},
    "builtins": {"set", "frozenset", "slice", "range", "complex"},
}


class _MetadataUnpickler(pickle.Unpickler):
    """Admits only DCP's metadata classes, torch dtypes and a few plain builtins."""

    def find_class(self, module: str, name: str) -> Any:
        if name in _METADATA_CLASSES.get(module, ()):
            return super().find_class(module, name)
        if module == "torch" and isinstance(getattr(torch, name, None), torch.dtype):
            return getattr(torch, name)
        raise pickle.UnpicklingError(f"{module}.{name} is not allowed in DCP metadata")


def read_dcp_metadata(checkpoint: Path) -> Any:
    """DCP's ``.metadata`` of a checkpoint, unpickled with the restricted unpickler."""
    path = checkpoint / ".metadata"
    try:
        with open(path, "rb") as handle:
            return _MetadataUnpickler(handle).load()
    except FileNotFoundError:
        raise CheckpointCorruptError(f"{path} is missing: not a torch_dist checkpoint") from None
    except Exception as exc:  # noqa: BLE001 - any failure means: do not trust the file
        raise CheckpointCorruptError(
            f"{path} was refused: {exc}. A torch_dist .metadata holds only DCP's metadata "
            "classes; this one is corrupt or crafted, and loading it could run code"
        ) from exc


def _numpy_globals() -> list[Any]:
    """What an RNG state's numpy arrays need under ``weights_only`` (data only)."""
    from numpy import dtypes

    reconstruct = getattr(np, "_core", np.core).multiarray._reconstruct  # numpy 2 and 1
    return [reconstruct, np.ndarray, np.dtype, *(getattr(dtypes, n) for n in dir(dtypes)
                                                if n.endswith("DType"))]


def _check_objects(checkpoint: Path, metadata: Any) -> None:
    """Load every ShardedObject (BYTE_IO entry) with ``weights_only``: tensors, plain
    data and numpy arrays pass; anything that would construct other objects (and so
    could run code) is refused by name."""
    from torch.distributed.checkpoint.metadata import BytesStorageMetadata

    storage = metadata.storage_data or {}
    for index, info in storage.items():
        if not isinstance(metadata.state_dict_metadata.get(index.fqn), BytesStorageMetadata):
            continue
        path = checkpoint / info.relative_path
        with open(path, "rb") as handle:
            handle.seek(info.offset)
            data = handle.read(info.length)
        try:
            with torch.serialization.safe_globals(_numpy_globals()):
                torch.load(io.BytesIO(data), weights_only=True)
        except Exception as exc:  # noqa: BLE001
            raise CheckpointCorruptError(
                f"{path}: the object {index.fqn!r} was refused by a weights-only load ({exc}). "
                "megarm writes only tensors, numbers and arrays there; this checkpoint is "
                "corrupt or crafted, and loading it could run code"
            ) from exc


def check_safe_to_read(checkpoint: Path) -> Any:
    """Prove nothing in ``checkpoint`` runs code when torch / megatron-core read it;
    returns the DCP metadata."""
    metadata = read_dcp_metadata(checkpoint)
    _check_objects(checkpoint, metadata)
    return metadata


def load_common(checkpoint: Path) -> dict[str, Any]:
    """``common.pt`` (plain data: config, iteration, scheduler, optimizer settings),
    weights-only, with an error that says what is wrong with the file."""
    path = checkpoint / "common.pt"
    if not path.is_file():
        raise CheckpointCorruptError(f"{path} is missing: the checkpoint is incomplete")
    try:
        with torch.serialization.safe_globals(_numpy_globals()):
            common = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as exc:
        raise CheckpointCorruptError(
            f"{path} holds objects a weights-only load refuses ({str(exc).splitlines()[0]}); "
            "megarm writes only plain data there: the file is crafted or from another tool"
        ) from exc
    except Exception as exc:  # noqa: BLE001 - truncated zip, bad bytes...
        raise CheckpointCorruptError(f"{path} cannot be read ({exc}); the file is damaged") from exc
    if not isinstance(common, dict):
        raise CheckpointCorruptError(f"{path} holds a {type(common).__name__}, not a dict")
    return common


# --------------------------------------------------------------------------- values


@dataclass
class NonFinite:
    """A tensor with NaN or inf values."""

    name: str
    count: int
    total: int

    def __str__(self) -> str:
        return f"{self.name} ({self.count} of {self.total} values are NaN or inf)"


def non_finite(named: Any) -> list[NonFinite]:
    """Tensors of ``named`` (name -> tensor pairs) holding NaN or inf."""
    bad = []
    for name, tensor in named:
        if torch.is_tensor(tensor) and tensor.is_floating_point():
            count = int((~torch.isfinite(tensor)).sum())
            if count:
                bad.append(NonFinite(name, count, tensor.numel()))
    return bad


def require_finite(named: Any, source: Path) -> None:
    """Raise naming the first tensors with NaN or inf."""
    bad = non_finite(named)
    if bad:
        listed = "; ".join(str(b) for b in bad[:3]) + (f"; and {len(bad) - 3} more" if len(bad) > 3 else "")
        raise CheckpointCorruptError(
            f"{source} yields non-finite weights: {listed}. The checkpoint is damaged or "
            "was saved after training diverged; load an earlier iteration (checkpoint.ckpt_step)"
        )


def disk_free_bytes(path: Path) -> int:
    """Free bytes on the filesystem holding ``path`` (or its nearest existing parent)."""
    probe = Path(path)
    while not probe.exists() and probe != probe.parent:
        probe = probe.parent
    return int(os.statvfs(probe).f_bavail * os.statvfs(probe).f_frsize)


def human_bytes(n: float) -> str:
    """``1.5 GB``-style sizes for messages."""
    for unit in ("B", "KB", "MB", "GB", "TB"):
        if abs(n) < 1000 or unit == "TB":
            return f"{n:.1f} {unit}" if unit != "B" else f"{int(n)} B"
        n /= 1000
    return f"{n:.1f} TB"


__all__ = [
    "MANIFEST",
    "CheckpointCorruptError",
    "check_safe_to_read",
    "describe_files",
    "disk_free_bytes",
    "file_digest",
    "human_bytes",
    "load_common",
    "manifest_problems",
    "non_finite",
    "read_dcp_metadata",
    "read_manifest",
    "require_finite",
    "write_manifest",
]
