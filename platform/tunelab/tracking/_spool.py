"""The spool: tracking writes not sent yet, on disk in the experiment folder.

:class:`TrackingSpool` is the append-only, fsync'd JSON-lines file (its
records encoded and decoded here); :class:`Backlog` counts what is still
unsent. What goes into the spool and when it is replayed is decided by
:mod:`tunelab.tracking._outbox`.
"""

from __future__ import annotations

import contextlib
import json
import logging
import math
import os
import uuid
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any, NamedTuple

from tunelab.checkpoint import atomic_write_bytes
from tunelab.tracking._protocol import MetricPoint

__all__ = ["Backlog", "TrackingSpool"]

logger = logging.getLogger("tunelab.tracking")  # the package's logger, one for all its modules


class Backlog(NamedTuple):
    """What is still unsent: metric ``points``, other ``records`` (tags, params,
    artifact uploads) and trial ``runs`` not created yet."""

    points: int = 0
    records: int = 0
    runs: int = 0

    @property
    def empty(self) -> bool:
        return not (self.points or self.records or self.runs)


class TrackingSpool:
    """Tracking writes not sent yet: an append-only JSON-lines file in the experiment folder.

    One record per line, strict JSON (``allow_nan=False``; non-finite metric
    values are the strings ``nan`` / ``inf`` / ``-inf``), each append flushed
    and fsync'd before it returns. Records are ``{"id", "op", "trial", ...}``
    with ``op`` one of ``metrics`` (``points``: ``[key, value, step,
    timestamp_ms]``), ``tags``, ``params``, ``artifacts`` (``folder``). A line
    cut short by a crash is skipped when read (and never glued to the next
    append). Once replayed, the file is rewritten atomically with what is left,
    or removed.
    """

    def __init__(self, path: Path) -> None:
        self.path = Path(path)

    def append(self, records: Sequence[Mapping[str, Any]]) -> None:
        if not records:
            return
        data = "".join(
            json.dumps(r, allow_nan=False, separators=(",", ":")) + "\n" for r in records
        ).encode()
        new = not self.path.exists()
        self.path.parent.mkdir(parents=True, exist_ok=True)
        with open(self.path, "a+b") as f:
            size = f.seek(0, os.SEEK_END)
            if size:
                f.seek(size - 1)
                if f.read(1) != b"\n":  # a line cut short by a crash: keep it apart
                    data = b"\n" + data
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        if new:
            _fsync_dir(self.path.parent)

    def read(self) -> list[dict[str, Any]]:
        try:
            text = self.path.read_text(errors="replace")
        except FileNotFoundError:
            return []
        out = []
        for n, line in enumerate(text.splitlines(), 1):
            if not line.strip():
                continue
            try:
                rec = json.loads(line)
            except ValueError:
                logger.warning("%s:%d: unreadable spool line skipped (cut short?)", self.path, n)
                continue
            if isinstance(rec, dict) and "op" in rec:
                out.append(rec)
        return out

    def rewrite(self, records: Sequence[Mapping[str, Any]]) -> None:
        """Replace the spool with ``records`` (atomically), or remove it when there are none."""
        if records:
            data = "".join(
                json.dumps(r, allow_nan=False, separators=(",", ":")) + "\n" for r in records
            )
            atomic_write_bytes(self.path, data.encode())
        elif self.path.exists():
            self.path.unlink()
            _fsync_dir(self.path.parent)

    def backlog(self) -> tuple[int, int]:
        """(metric points, other records) in the spool."""
        points = records = 0
        for rec in self.read():
            if rec["op"] == "metrics":
                points += len(rec.get("points") or ())
            else:
                records += 1
        return points, records


def _encode_value(v: float) -> float | str:
    """Strict JSON has no NaN / inf: they are written as the strings ``nan``, ``inf``, ``-inf``."""
    if math.isfinite(v):
        return v
    return "nan" if math.isnan(v) else ("inf" if v > 0 else "-inf")


def encode_record(op: Mapping[str, Any]) -> dict[str, Any]:
    rec = {k: v for k, v in op.items() if k != "points"}
    rec.setdefault("id", uuid.uuid4().hex)
    if "points" in op:
        rec["points"] = [[m.key, _encode_value(m.value), m.step, m.timestamp] for m in op["points"]]
    return rec


def decode_record(rec: Mapping[str, Any]) -> dict[str, Any]:
    op = dict(rec)
    if "points" in rec:
        op["points"] = [
            MetricPoint(str(k), float(v), int(s), int(t)) for k, v, s, t in rec["points"]
        ]
    return op


def _fsync_dir(folder: Path) -> None:
    with contextlib.suppress(OSError):
        fd = os.open(folder, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)
