"""Shared fixtures: the repo root on every Ray worker's path, isolated storage, CLI runner."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
TOY = "tests.tunelab.toy_family:FAMILY"

# Ray workers inherit the driver's environment: make the test families importable there.
os.environ["PYTHONPATH"] = os.pathsep.join(
    p for p in (str(ROOT), os.environ.get("PYTHONPATH", "")) if p
)
os.environ.setdefault("RAY_AUTH_MODE", "disabled")
os.environ.setdefault("MPLBACKEND", "Agg")
# The Ray dashboard costs every local Ray seconds of start-up: on only where a test needs it
# (multi-worker trials: Ray's state API frees a culled trial's workers).
os.environ.setdefault("TUNELAB_NO_DASHBOARD", "1")

#: Waits poll a condition; their limit only matters when it never holds. A loaded machine
#: (CI beside other jobs) can be several times slower than a quiet one: limits are scaled.
WAIT_SCALE = float(os.environ.get("TUNELAB_TEST_WAIT_SCALE", "4"))


def generous(seconds: float) -> float:
    """A wait limit for a condition that usually holds within ``seconds`` on a quiet machine."""
    return seconds * WAIT_SCALE


def wait_for(
    predicate: Callable[[], Any],
    timeout: float,
    what: str,
    diagnostics: Callable[[], str] | None = None,
    every: float = 0.2,
) -> Any:
    """Poll ``predicate`` every ``every`` s until it returns something truthy (returned).

    On timeout, fail naming ``what`` (and the text of ``diagnostics()``, if given).
    ``timeout`` is scaled by :func:`generous`: it only matters when the condition never holds.
    """
    timeout = generous(timeout)
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(every)
    extra = f"\n{diagnostics()}" if diagnostics is not None else ""
    raise AssertionError(f"timed out after {timeout} s waiting for {what}{extra}")


def run_cli(
    *args: str, cwd: Path | None = None, timeout: float = 900, env: dict[str, str] | None = None
) -> subprocess.CompletedProcess[str]:
    """Run the real ``platform`` command line in a fresh process."""
    return subprocess.run(
        [sys.executable, "-m", "cli", *args],
        cwd=cwd or ROOT,
        capture_output=True,
        text=True,
        timeout=timeout,
        env={**os.environ, **(env or {})},
    )


def cli_json(*args: str, **kw: Any) -> dict[str, Any]:
    """Run ``platform ... --json`` and parse stdout; fails the test with stderr on error."""
    proc = run_cli(*args, "--json", **kw)
    assert proc.returncode == 0, (
        f"exit {proc.returncode}\nSTDOUT:\n{proc.stdout[-3000:]}\nSTDERR:\n{proc.stderr[-5000:]}"
    )
    return json.loads(proc.stdout)


def start_cli(*args: str, logs: Path, env: dict[str, str] | None = None) -> subprocess.Popen[bytes]:
    """Start ``platform ...`` in the background; stdout and stderr go to ``logs/stdout|stderr``.

    Files, not pipes: an unread pipe could block the driver.
    """
    out_file, err_file = (logs / "stdout").open("w"), (logs / "stderr").open("w")
    return subprocess.Popen(
        [sys.executable, "-m", "cli", *args],
        cwd=ROOT,
        stdout=out_file,
        stderr=err_file,
        env={**os.environ, **(env or {})},
    )


def write_spec(path: Path, text: str) -> Path:
    path.write_text(text)
    return path
