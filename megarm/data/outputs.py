"""The files of one preprocessing run: written under temporary names, promoted to
their final names (``stats.json`` last) only when the run is accepted, discarded
otherwise; a failed write becomes one line naming the directory and the fix."""

from __future__ import annotations

import contextlib
import errno
import glob
import json
import os
from pathlib import Path
from typing import Any, NoReturn

import numpy as np

from megarm.data.blend import PACKED_RE, PRM_KEYS, RANKED_KEYS, REGRESSION_KEYS, SFT_KEYS
from megarm.data.dataset import (
    IGNORE_INDEX,
    MARGIN_KEY,
    PAIR_KEYS,
    megatron_indexed_dataset,
    packed_path,
    rejects_path,
    stats_path,
)


class PreprocessError(RuntimeError):
    """A run that cannot produce output; the message says what to fix."""


def existing_outputs(prefix: str) -> list[str]:
    """The final files of an earlier run under ``prefix``: its stats.json, rejects and
    every ``<prefix>_packed_<key>_document.{bin,idx}`` (whatever the key)."""
    found = [path for path in (stats_path(prefix), rejects_path(prefix)) if os.path.exists(path)]
    for path in sorted(glob.glob(glob.escape(prefix) + "_packed_*_document.*")):
        rest = path[len(prefix) :]
        if path.endswith((".bin", ".idx")) and PACKED_RE.fullmatch(rest[:-4]) is not None:
            found.append(path)
    return found


_NO_SPACE = (errno.ENOSPC, errno.EFBIG, errno.EDQUOT)
_NOT_WRITABLE = (errno.EROFS, errno.EACCES, errno.EPERM)


def write_error(exc: OSError, prefix: str) -> PreprocessError | None:
    """The one-line error for a failed write under ``prefix`` (``None``: not a write
    problem, e.g. an unreadable input)."""
    where = os.path.dirname(os.path.abspath(prefix))
    name = f" ({exc.filename})" if exc.filename else ""
    if exc.errno in _NO_SPACE:
        return PreprocessError(
            f"no space left on {where} (or a file-size limit) while writing the output"
            f"{name}: {exc.strerror}; nothing was written. Free space or choose another "
            "--output-prefix"
        )
    if exc.errno in _NOT_WRITABLE and (
        exc.filename is None or os.path.abspath(str(exc.filename)).startswith(where)
    ):
        return PreprocessError(
            f"--output-prefix {prefix}: cannot write to {where}{name}: {exc.strerror}; choose "
            "a writable --output-prefix"
        )
    return None


def _raise_write_error(exc: OSError, prefix: str) -> NoReturn:
    error = write_error(exc, prefix)
    if error is None:
        raise exc
    raise error from exc


class _Outputs:
    """The temporary files of one run and their promotion to final names."""

    def __init__(
        self, prefix: str, has_margin: bool, sft: bool = False, ranked: bool = False,
        regression: bool = False, prm: bool = False,
    ) -> None:
        IndexedDatasetBuilder = megatron_indexed_dataset().IndexedDatasetBuilder
        self.prefix = prefix
        self.tmp_prefix = f"{prefix}.tmp-{os.getpid()}"
        if ranked:
            self.keys = RANKED_KEYS
        elif regression:
            self.keys = REGRESSION_KEYS
        elif prm:
            self.keys = PRM_KEYS
        else:
            self.keys = SFT_KEYS if sft else PAIR_KEYS + ((MARGIN_KEY,) if has_margin else ())
        self.paths: list[tuple[str, str]] = []  # (temporary, final)
        self.builders = {}
        self.rejects = None
        self.stats = (stats_path(self.tmp_prefix), stats_path(prefix))
        for key in self.keys:
            tmp, final = packed_path(self.tmp_prefix, key), packed_path(prefix, key)
            self.paths += [(tmp + ".bin", final + ".bin"), (tmp + ".idx", final + ".idx")]
        self.paths.append((rejects_path(self.tmp_prefix), rejects_path(prefix)))
        try:
            for key in self.keys:
                dtype = np.float32 if key in (MARGIN_KEY, "scores", "targets", "step_targets") \
                    else np.int32
                tmp = packed_path(self.tmp_prefix, key) + ".bin"
                self.builders[key] = IndexedDatasetBuilder(tmp, dtype=dtype)
            self.rejects = open(rejects_path(self.tmp_prefix), "w", encoding="utf-8")
        except BaseException:
            self.discard()  # the files opened so far
            raise

    def add(
        self,
        prompt: np.ndarray,
        chosen: np.ndarray | list[np.ndarray],
        rejected: np.ndarray | None,
        margin: float | np.ndarray | None,
        supervised: tuple[int, ...] = (0, 0),
    ) -> None:
        """One record: a pair (``chosen`` / ``rejected`` tails after the prompt), an
        SFT record (``chosen`` is its target, ``rejected`` ``None``) or a ranked record
        (``chosen`` the list of its K response tails, ``margin`` its K scores: one
        document of K sequences, and one of K scores), or a regression record (an
        SFT record with its labels as ``margin``), or a step-labelled record (an SFT
        record with ``(step positions, step targets)`` as ``margin``). Labels are -100 over the prompt
        and the first ``supervised[k]`` tokens of tail ``k``."""
        if isinstance(chosen, list):
            rows = [np.concatenate([prompt, tail]) for tail in chosen]
            labels = [row.copy() for row in rows]
            for row in labels:
                row[: len(prompt)] = IGNORE_INDEX
            lengths = [len(row) for row in rows]
            self.builders["ranked_input_ids"].add_document(np.concatenate(rows), lengths)
            self.builders["ranked_labels"].add_document(np.concatenate(labels), lengths)
            scores = np.asarray(margin, dtype=np.float32)
            self.builders["scores"].add_document(scores, [len(scores)])
            return
        if rejected is None:
            sequences = [("", chosen, supervised[0])]
        else:
            sequences = [("chosen_", chosen, supervised[0]), ("rejected_", rejected, supervised[1])]
        for side, tail, start in sequences:
            tokens = np.concatenate([prompt, tail])
            labels = tokens.copy()
            labels[: len(prompt) + start] = IGNORE_INDEX
            self.builders[f"{side}input_ids"].add_document(tokens, [len(tokens)])
            self.builders[f"{side}labels"].add_document(labels, [len(labels)])
        if MARGIN_KEY in self.builders:
            self.builders[MARGIN_KEY].add_document(np.array([margin], dtype=np.float32), [1])
        if "targets" in self.builders:  # a regression record's labels (NaN: missing)
            targets = np.asarray(margin, dtype=np.float32)
            self.builders["targets"].add_document(targets, [len(targets)])
        if "step_targets" in self.builders:  # marker positions in the row, their labels
            positions, targets = margin[0], margin[1]  # type: ignore[index]
            self.builders["step_positions"].add_document(positions, [len(positions)])
            self.builders["step_targets"].add_document(targets, [len(targets)])

    def reject(self, entry: dict[str, Any]) -> None:
        self.rejects.write(json.dumps(entry, ensure_ascii=False, default=repr) + "\n")

    def close(self) -> None:
        """Write the .idx files; the data is complete but still under temporary names."""
        for key in self.keys:
            self.builders[key].finalize(packed_path(self.tmp_prefix, key) + ".idx")
        self.rejects.close()

    def publish(self, stats: dict[str, Any]) -> None:
        """Write stats.json and rename everything to final names, stats.json last so
        its presence means the set is complete. Files of an earlier run under the
        prefix that this run does not write (e.g. an old ``_margin``) are removed, so
        the prefix holds exactly what stats.json lists."""
        tmp_stats, final_stats = self.stats
        Path(tmp_stats).write_text(json.dumps(stats, indent=2, ensure_ascii=False) + "\n")
        if os.path.exists(final_stats):
            os.remove(final_stats)
        ours = {final for _, final in self.paths}
        for stale in existing_outputs(self.prefix):
            if stale not in ours and stale != final_stats:
                os.remove(stale)
        for tmp, final in self.paths:
            os.replace(tmp, final)
        os.replace(tmp_stats, final_stats)

    def discard(self) -> None:
        """Remove every temporary file (on failure or interruption). Closing may fail
        again (the disk that was full still is); the files are removed regardless."""
        handles = [builder.data_file for builder in self.builders.values()]
        for handle in [*handles, self.rejects]:
            if handle is not None:
                with contextlib.suppress(OSError):
                    handle.close()
        for tmp, _ in [*self.paths, self.stats]:
            with contextlib.suppress(FileNotFoundError):
                os.remove(tmp)
