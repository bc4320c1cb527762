"""Every shipped spec runs through the real CLI and Ray at a tiny budget (family smoke tests)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from tests.conftest import ROOT, cli_json, run_cli

pytestmark = pytest.mark.slow

SPECS = ROOT / "search_spaces"

# tiny budgets on top of each spec's quick block
# sigma_ramp.yaml runs at --quick through `ray up` on SLURM (tests/slurm/test_ray_up.py);
# sigma_ramp_ab.yaml is left to its spec and family tests (CI time: the lever_ab kind runs
# end to end here with lever.yaml and cascade_health.yaml)
TINY = {
    "lever.yaml": [
        "--set",
        "budget=2",
        "--set",
        "seeds=[1, 2]",
        "--set",
        "decision.looks=null",
        "--set",
        "control.steps_per_iter=10",
    ],
}


@pytest.mark.parametrize("name", sorted(TINY))
def test_shipped_spec_smoke(tmp_path: Path, name: str) -> None:
    summary = cli_json(
        "sweep", str(SPECS / name), "--quick", *TINY[name], "--storage", str(tmp_path / "res")
    )
    assert summary["trials"] and all(t["status"] != "error" for t in summary["trials"])
    if summary["kind"] == "lever_ab":
        assert {v["lever"] for v in summary["verdicts"]} == set(
            t["arm"] for t in summary["trials"] if t["arm"] != "control"
        )
    else:
        assert summary["best"]["run_id"]


def test_seed_cull_quick_selects_a_bounded_seed_and_reloads_it(tmp_path: Path) -> None:
    # the README's main job: the shipped seed cull at --quick size
    import soundfile as sf
    from mlflow import MlflowClient

    summary = cli_json(
        "sweep", str(SPECS / "seed_cull.yaml"), "--quick", "--storage", str(tmp_path / "res")
    )
    trials = summary["trials"]
    finished = [t for t in trials if t["status"] == "finished"]
    assert len(trials) == 4 and len(finished) == 2  # exactly k reach the budget
    sel = summary["selected"]
    best = max(finished, key=lambda t: t["metrics"]["val/autonomy"])
    assert sel["seed"] == best["seed"]
    assert best["metrics"]["val/autonomy"] > -5.0 and best["metrics"]["val/bounded_frac"] >= 0.9
    client = MlflowClient(summary["tracking_uri"])
    children = client.search_runs(
        [client.get_experiment_by_name(summary["mlflow_experiment"]).experiment_id],
        filter_string=f"tags.mlflow.parentRunId = '{summary['parent_run_id']}'",
    )
    assert len(children) == 4
    assert sorted(r.data.tags.get("tunelab.culled_at", "-") for r in children) == [
        "-",
        "-",
        "3",
        "3",
    ]
    winner = next(r for r in children if r.info.run_id == sel["run_id"])
    assert {"generated.wav", "spectrogram.png", "manifest.json"} <= {
        a.path for a in client.list_artifacts(winner.info.run_id)
    }
    # the selected checkpoint reloads and regenerates exactly the WAV the trial wrote
    exp_dir = Path(summary["experiment_dir"])
    regenerated = exp_dir / "selected" / "generated.wav"
    original = exp_dir / "trial_artifacts" / sel["trial_id"] / "generated.wav"
    assert regenerated.read_bytes() == original.read_bytes()
    audio, rate = sf.read(regenerated)
    assert rate == 8000 and len(audio) > 0
    manifest = json.loads(Path(sel["manifest"]).read_text())
    assert manifest["selected_seed"] == sel["seed"] and manifest["sample_rate"] == 8000
    assert manifest["test"]["test/bounded_frac"] >= 0.9 and "hidden" in manifest["hyperparameters"]


def test_the_a100_overrides_in_a_spec_comment_validate() -> None:
    """The full-size command a shipped spec documents in its comment is a valid spec."""
    import re
    import shlex

    from tunelab.spec import load_spec

    for path in sorted((ROOT / "search_spaces").glob("*.yaml")):
        lines = path.read_text().splitlines()
        comment = " ".join(ln.lstrip("# ") for ln in lines if ln.startswith("#"))
        match = re.search(r"A100 size[^:]*:(.*?--set [^#]*)", comment)
        if not match:
            continue
        words = shlex.split(match.group(1))
        overrides = [words[i + 1] for i, w in enumerate(words) if w == "--set"]
        assert overrides, path
        load_spec(path, overrides=overrides)  # raises SpecError if the documented size is invalid


def test_cascade_health_ab_ends_the_unclamped_arm_diverged_with_its_diagnosis(
    tmp_path: Path,
) -> None:
    # issue 11: PowerMuse's unclamped weak-residual cascade explodes; the monitor names the
    # stage and the loss term, ends those trials and the lever is crashed; the others get verdicts
    storage = tmp_path / "res"
    summary = cli_json(
        "sweep",
        str(SPECS / "cascade_health.yaml"),
        "--quick",
        "--set",
        "budget=4",
        "--set",
        "seeds=[1001, 1002]",
        "--storage",
        str(storage),
    )
    bad = [t for t in summary["trials"] if t["arm"] == "unclamped_3stage"]
    assert bad and all(t["status"] == "diverged" for t in bad), bad
    for t in bad:
        assert "sustained gradient growth" in t["diagnosis"]
        assert "term recon" in t["diagnosis"] and "layer mixer.stages.2" in t["diagnosis"]
    verdicts = {v["lever"]: v["verdict"] for v in summary["verdicts"]}
    assert verdicts.pop("unclamped_3stage") == "crashed"
    assert verdicts and "crashed" not in verdicts.values(), verdicts
    others = [t for t in summary["trials"] if t["arm"] != "unclamped_3stage"]
    assert all(t["status"] == "finished" for t in others)
    page = tmp_path / "report.html"
    proc = run_cli("report", summary["experiment_dir"], "--out", str(page))
    assert proc.returncode == 0, proc.stderr[-2000:]
    html = page.read_text()
    for t in bad:  # the report shows every diverged trial's diagnosis
        assert f'data-trial="{t["trial_id"]}"' in html
