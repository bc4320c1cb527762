"""`ray stop` scoped to one cluster.

Ray's own `ray stop` kills every Ray process of the user on the machine: on a
shared login node (or a CI machine) that includes other clusters and other
sessions' `ray.init()`. This stops only the process trees that belong to one
cluster: processes whose command line names the cluster's Ray temp dir or its
GCS port (`--address=HOST:PORT`, `--gcs-address=HOST:PORT`), processes whose
pid is in a `<temp_dir>/*.pid` file (e.g. the MLflow server), and all their
descendants (Ray workers rename themselves `ray::...` and lose their arguments).
Linux only (reads /proc).
"""

from __future__ import annotations

import contextlib
import glob
import os
import re
import signal
import time
from collections.abc import Iterable

_PROC = "/proc"


def stop_cluster_processes(
    temp_dir: str, gcs_port: int | None = None, *, grace_s: float = 5.0
) -> list[int]:
    """SIGTERM the cluster's processes, SIGKILL what is left after `grace_s`.

    Args:
        temp_dir: The cluster's Ray temp dir (`ray start --temp-dir`).
        gcs_port: The cluster's GCS port; matches processes that only name the
            GCS address (Ray's client server, `ray start --address` workers).
        grace_s: Seconds to wait after SIGTERM before SIGKILL.

    Returns:
        The pids that were signalled.
    """
    temp_dir = os.path.abspath(temp_dir)
    procs = _process_table()
    spare = _ancestors(os.getpid(), procs)
    roots = {pid for pid, (_, _, args) in procs.items() if _belongs(args, temp_dir, gcs_port)}
    roots |= _pid_files(temp_dir)
    targets = _with_descendants(roots, procs) - spare
    _signal(targets, signal.SIGTERM)
    deadline = time.monotonic() + grace_s
    while time.monotonic() < deadline and _alive(targets):
        time.sleep(0.1)
    _signal(_alive(targets), signal.SIGKILL)
    for path in glob.glob(os.path.join(temp_dir, "*.pid")):
        os.remove(path)  # a stale pid could name an unrelated process next time
    return sorted(targets)


def cluster_processes(temp_dir: str, gcs_port: int | None = None) -> list[tuple[int, str]]:
    """Live (non-zombie) processes of the cluster as (pid, command line); for checks."""
    temp_dir = os.path.abspath(temp_dir)
    procs = _process_table()
    roots = {pid for pid, (_, _, args) in procs.items() if _belongs(args, temp_dir, gcs_port)}
    pids = _with_descendants(roots | _pid_files(temp_dir), procs) - _ancestors(os.getpid(), procs)
    return [(pid, " ".join(procs[pid][2])[:200]) for pid in sorted(_alive(pids)) if pid in procs]


# ---------------------------------------------------------------------------
# private helpers
# ---------------------------------------------------------------------------


def _process_table() -> dict[int, tuple[int, str, list[str]]]:
    """{pid: (ppid, state, argv)} of the current user's processes."""
    uid = os.getuid()
    table = {}
    for entry in os.listdir(_PROC):
        if not entry.isdigit():
            continue
        try:
            if os.stat(f"{_PROC}/{entry}").st_uid != uid:
                continue
            with open(f"{_PROC}/{entry}/stat") as f:
                stat = f.read()
            with open(f"{_PROC}/{entry}/cmdline", "rb") as f:
                argv = [a.decode(errors="replace") for a in f.read().split(b"\0") if a]
        except OSError:
            continue
        # stat is "pid (comm) state ppid ..."; comm may contain spaces and parens.
        state, ppid = stat[stat.rindex(")") + 2 :].split()[:2]
        table[int(entry)] = (int(ppid), state, argv)
    return table


def _belongs(args: list[str], temp_dir: str, gcs_port: int | None) -> bool:
    line = " ".join(args)
    if re.search(re.escape(temp_dir) + r"(?=/|$|[\s,\"'])", line):
        return True
    if gcs_port is None:
        return False
    return re.search(rf"--(?:gcs[-_])?address[= ]\S*:{gcs_port}(?![0-9])", line) is not None


def _pid_files(temp_dir: str) -> set[int]:
    pids = set()
    for path in glob.glob(os.path.join(temp_dir, "*.pid")):
        try:
            with open(path) as f:
                pids.add(int(f.read().strip()))
        except (OSError, ValueError):
            continue
    return pids


def _ancestors(pid: int, procs: dict[int, tuple[int, str, list[str]]]) -> set[int]:
    out = set()
    while pid in procs and pid not in out:
        out.add(pid)
        pid = procs[pid][0]
    return out


def _with_descendants(
    roots: Iterable[int], procs: dict[int, tuple[int, str, list[str]]]
) -> set[int]:
    children: dict[int, list[int]] = {}
    for pid, (ppid, _, _) in procs.items():
        children.setdefault(ppid, []).append(pid)
    out: set[int] = set()
    todo = [p for p in roots if p in procs]
    while todo:
        pid = todo.pop()
        if pid not in out:
            out.add(pid)
            todo.extend(children.get(pid, []))
    return out


def _signal(pids: Iterable[int], sig: signal.Signals) -> None:
    for pid in pids:
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.kill(pid, sig)


def _alive(pids: Iterable[int]) -> set[int]:
    """Pids still running; zombies (never reaped when PID 1 does not reap) count as gone."""
    out = set()
    for pid in pids:
        try:
            with open(f"{_PROC}/{pid}/stat") as f:
                stat = f.read()
        except OSError:
            continue
        if stat[stat.rindex(")") + 2] not in "ZX":
            out.add(pid)
    return out


def _main(argv: list[str] | None = None) -> int:
    """`python _stop.py --temp-dir DIR [--gcs-port P] [--grace-period S] [--force]`."""
    import argparse

    parser = argparse.ArgumentParser(description="Stop one Ray cluster's processes only.")
    parser.add_argument("--temp-dir", required=True, help="the cluster's Ray temp dir")
    parser.add_argument("--gcs-port", type=int, default=None, help="the cluster's GCS port")
    parser.add_argument("--grace-period", type=float, default=5.0, help="seconds before SIGKILL")
    parser.add_argument("-f", "--force", action="store_true", help="SIGKILL at once")
    args, _ = parser.parse_known_args(argv)  # accept whatever else `ray stop` takes
    grace = 0.0 if args.force else args.grace_period
    pids = stop_cluster_processes(args.temp_dir, args.gcs_port, grace_s=grace)
    print(f"Stopped {len(pids)} processes of the Ray cluster in {args.temp_dir}.")
    return 0


if __name__ == "__main__":  # run as a file, so that stopping never imports tunelab (torch)
    raise SystemExit(_main())
