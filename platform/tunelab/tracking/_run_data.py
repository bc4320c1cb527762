"""What tunelab writes on runs besides trial results.

Which tags a decision becomes (:func:`verdict_tags`, from :mod:`tunelab.names`;
the statistics in :mod:`tunelab.verdicts` know no tags), an experiment's
decision as summary metrics of its parent run (:func:`log_summary`), a trial
config as flat params (:func:`flatten`) and the code's :func:`git_commit`.
"""

from __future__ import annotations

import math
import subprocess
import time
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from tunelab.names import (
    OUTCOME_OF_VERDICT,
    TAG_CI_HIGH,
    TAG_CI_LOW,
    TAG_EFFECT,
    TAG_GUARDRAIL_PREFIX,
    TAG_LEVER,
    TAG_N_PAIRS,
    TAG_OUTCOME,
    TAG_P_VALUE,
    TAG_VERDICT,
    is_number,
)
from tunelab.tracking._protocol import MetricPoint, Tracker

__all__ = ["flatten", "git_commit", "log_summary", "verdict_tags"]


def flatten(d: Mapping[str, Any], prefix: str = "") -> dict[str, Any]:
    """Flatten nested mappings into dotted keys."""
    out: dict[str, Any] = {}
    for k, v in d.items():
        key = f"{prefix}{k}"
        if isinstance(v, Mapping):
            out.update(flatten(v, key + "."))
        else:
            out[key] = v
    return out


def git_commit(cwd: Path | None = None) -> str:
    """The current git commit of ``cwd`` (``unknown`` outside a repository)."""
    try:
        out = subprocess.run(
            ["git", "rev-parse", "HEAD"],
            cwd=cwd,
            capture_output=True,
            text=True,
            timeout=5,
            check=False,
        )
    except (OSError, subprocess.SubprocessError):
        return "unknown"
    return out.stdout.strip() or "unknown"


def verdict_tags(record: Mapping[str, Any]) -> dict[str, str]:
    """Tags of a lever's verdict record (:func:`tunelab.verdicts.verdict_to_dict`).

    ``tunelab.lever``, ``tunelab.verdict``, ``tunelab.effect``,
    ``tunelab.ci_low``, ``tunelab.ci_high``, ``tunelab.p_value``,
    ``tunelab.n_pairs``, ``tunelab.outcome`` (``win`` | ``negative`` |
    ``null`` | ``inconclusive`` | ``crashed-early``) and
    ``guardrail.<name>`` = ``pass`` | ``fail`` | ``inconclusive``.
    """
    tags = {
        TAG_LEVER: str(record["lever"]),
        TAG_VERDICT: str(record["verdict"]),
        TAG_EFFECT: _fmt(record.get("effect")),
        TAG_CI_LOW: _fmt(record.get("ci_low")),
        TAG_CI_HIGH: _fmt(record.get("ci_high")),
        TAG_P_VALUE: _fmt(record.get("p_value")),
        TAG_N_PAIRS: str(int(record.get("n_pairs") or 0)),
        TAG_OUTCOME: OUTCOME_OF_VERDICT[record["verdict"]].value,
    }
    for name, g in (record.get("guardrails") or {}).items():
        tags[TAG_GUARDRAIL_PREFIX + name] = str(g["status"])
    return tags


def log_summary(tracker: Tracker, run_id: str, values: Mapping[str, float | None]) -> None:
    """Log an experiment's decision as metrics of its parent run (step 0), so that the
    MLflow experiment list sorts and reads by it (the selected value, per-lever effects).
    Non-numbers are skipped; NaN is logged as it is.
    """
    from tunelab.spec import metric_name_problem

    ts = int(time.time() * 1000)
    points = [
        MetricPoint(k, float(v), 0, ts)
        for k, v in values.items()
        if is_number(v) and metric_name_problem(k) is None  # a lever named so MLflow refuses it
    ]
    if points:
        tracker.log_metrics(run_id, points)


def _fmt(x: Any) -> str:
    return "nan" if x is None or (isinstance(x, float) and math.isnan(x)) else f"{float(x):.6g}"
