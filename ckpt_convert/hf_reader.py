"""Reading an HF model directory: lazy, file-by-file access to its tensors
(safetensors or ``pytorch_model.bin``, sharded with an index or not), for
``ckpt_convert/hf2mcore.py``."""

from __future__ import annotations

import contextlib
import json
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open


class ConversionError(RuntimeError):
    """The input cannot be converted as asked; the message says why and what to do."""


class HFCheckpoint:
    """Lazy, file-by-file access to the tensors of an HF model directory.

    Construction only looks at file names and index JSON; no weight file is opened
    until :meth:`names` or :meth:`read` needs it. At most one weight file is open at
    a time, so memory stays bounded by the tensors being converted.
    """

    def __init__(self, directory: Path) -> None:
        self.directory = directory
        self.kind: str
        self.weight_map: dict[str, str] | None = None
        self.single: str | None = None
        for index, kind in (
            ("model.safetensors.index.json", "safetensors"),
            ("pytorch_model.bin.index.json", "bin"),
        ):
            path = directory / index
            if path.is_file():
                try:
                    self.weight_map = dict(json.loads(path.read_text())["weight_map"])
                except (ValueError, KeyError, TypeError) as exc:
                    raise ConversionError(f"{path} is not a valid weight index: {exc}") from exc
                self.kind = kind
                break
        else:
            for single, kind in (
                ("model.safetensors", "safetensors"),
                ("pytorch_model.bin", "bin"),
            ):
                if (directory / single).is_file():
                    self.single, self.kind = single, kind
                    break
            else:
                raise ConversionError(
                    f"{directory} holds no model.safetensors(.index.json) or "
                    "pytorch_model.bin(.index.json); point --load-dir at an HF model directory"
                )
        self._open_file: str | None = None
        self._handle: Any = None
        self._stack = contextlib.ExitStack()
        self.files_opened: list[str] = []

    @property
    def files(self) -> list[str]:
        """Weight files in the order their tensors are best read."""
        if self.weight_map is None:
            return [self.single]  # type: ignore[list-item]
        return sorted(set(self.weight_map.values()))

    def check_files(self) -> None:
        """Refuse, before any work, an index that names a weight file that is not there."""
        missing = [f for f in self.files if not (self.directory / f).is_file()]
        if missing:
            raise ConversionError(
                f"{self.directory}'s weight index names {len(missing)} file(s) that do not "
                f"exist, e.g. {missing[0]}; download the missing shard(s)"
            )

    def file_of(self, name: str) -> str:
        """The file holding tensor ``name``."""
        if self.weight_map is None:
            return self.single  # type: ignore[return-value]
        try:
            return self.weight_map[name]
        except KeyError:
            raise ConversionError(
                f"{name} is not in {self.directory}'s weight index; do the weights and "
                "config.json belong together?"
            ) from None

    def where(self, name: str) -> str:
        """``dir/file`` holding ``name`` (for error messages)."""
        return str(self.directory / self.file_of(name))

    def names(self) -> list[str]:
        """Every tensor name in the checkpoint (reads only headers for safetensors)."""
        if self.weight_map is not None:
            return list(self.weight_map)
        self._switch(self.single)  # type: ignore[arg-type]
        return list(self._handle.keys())

    def read(self, name: str) -> torch.Tensor:
        """Tensor ``name`` as stored (dtype unchanged)."""
        file = self.file_of(name)
        self._switch(file)
        if self.kind == "safetensors":
            if name not in self._keys:
                raise ConversionError(f"{name} is missing from {self.directory / file}")
            return self._handle.get_tensor(name)
        if name not in self._handle:
            raise ConversionError(f"{name} is missing from {self.directory / file}")
        return self._handle[name]

    def _switch(self, file: str) -> None:
        if file == self._open_file:
            return
        self.close()
        path = self.directory / file
        if not path.is_file():
            raise ConversionError(f"weight file {path} (named by the index) does not exist")
        self.files_opened.append(file)
        try:
            if self.kind == "safetensors":
                self._handle = self._stack.enter_context(safe_open(str(path), framework="pt"))
                self._keys = set(self._handle.keys())
            else:
                self._handle = _torch_load(path)
        except ConversionError:
            raise
        except Exception as exc:  # corrupt or truncated files raise many types
            raise ConversionError(f"cannot read weight file {path}: {exc}") from exc
        self._open_file = file

    def close(self) -> None:
        """Release the open weight file."""
        self._stack.close()
        self._stack = contextlib.ExitStack()
        self._handle, self._open_file = None, None


def _torch_load(path: Path) -> dict[str, torch.Tensor]:
    """``pytorch_model.bin`` with ``weights_only=True``; memory-mapped when the file is
    in torch's zip format (anything since torch 1.6), so tensors load on access."""
    try:
        return torch.load(path, map_location="cpu", weights_only=True, mmap=True)
    except RuntimeError:
        # Pre-zip (legacy) serialization cannot be memory-mapped.
        return torch.load(path, map_location="cpu", weights_only=True)
