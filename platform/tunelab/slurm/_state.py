"""Node records of one cluster in a JSON file, shared by `ray up`/`ray down` and
the autoscaler on the head, read and written under an fcntl lock."""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import tempfile
import threading
from collections.abc import Iterator
from typing import Any

NodeRecords = dict[str, dict[str, Any]]


class StateFile:
    """`<state_dir>/nodes.json`: {node_id: {"kind", "node_type", "tags", "created", "terminated"}}.

    Every read-modify-write holds an exclusive `flock` on `nodes.json.lock`
    (between processes) and a threading lock (between the autoscaler's threads).
    Writes replace the file atomically, so a reader never sees half a file.
    """

    def __init__(self, state_dir: str) -> None:
        self.path = os.path.join(state_dir, "nodes.json")
        self._lock_path = self.path + ".lock"
        self._thread_lock = threading.RLock()

    def read(self) -> NodeRecords:
        """A snapshot of all node records."""
        with self._locked():
            return self._load()

    @contextlib.contextmanager
    def update(self) -> Iterator[NodeRecords]:
        """Yield the records for in-place changes; saved when the block exits (if changed)."""
        with self._locked():
            records = self._load()
            before = json.dumps(records, sort_keys=True)
            yield records
            if json.dumps(records, sort_keys=True) != before:
                self._save(records)

    # -- private ---------------------------------------------------------

    @contextlib.contextmanager
    def _locked(self) -> Iterator[None]:
        with self._thread_lock:
            os.makedirs(os.path.dirname(self.path), exist_ok=True)
            with open(self._lock_path, "a") as lock:
                fcntl.flock(lock, fcntl.LOCK_EX)
                try:
                    yield
                finally:
                    fcntl.flock(lock, fcntl.LOCK_UN)

    def _load(self) -> NodeRecords:
        try:
            with open(self.path) as f:
                data = json.load(f)
        except FileNotFoundError:
            return {}
        return dict(data.get("nodes", {}))

    def _save(self, records: NodeRecords) -> None:
        fd, tmp = tempfile.mkstemp(dir=os.path.dirname(self.path), prefix=".nodes-")
        with os.fdopen(fd, "w") as f:
            json.dump({"nodes": records}, f, indent=1, sort_keys=True)
        os.replace(tmp, self.path)
