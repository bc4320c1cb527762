"""``platform report`` on a real seed cull and a real sweep: each kind gets its own page.

One small seed cull (4 seeds, one diverging at the cull point) and one small
sweep (a grid with a diverging config) run through the real CLI, Ray and
MLflow with the toy family, side by side; ``platform report`` writes their
pages and headless Chromium builds the DOM the assertions read.
"""

from __future__ import annotations

import base64
import json
import math
import re
import shutil
import wave
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import numpy as np
import pytest

import tunelab.report_seed_cull as report_seed_cull
from tests.conftest import TOY, cli_json, run_cli, write_spec
from tests.tunelab.test_report import CHROMIUM, Node, chromium_dom, parse
from tunelab.layout import ExperimentLayout
from tunelab.report import experiment_kind, load_experiment, render_report

pytestmark = pytest.mark.slow

CULL_AT, BUDGET, NAN_SEED = 2, 4, 1

CULL_SPEC = f"""
kind: seed_cull
name: toy-report-cull
family: "{TOY}"
config: {{hidden: 8, steps_per_iter: 5, nan_at: {CULL_AT}, nan_seed: {NAN_SEED}}}
seeds: 4
budget: {BUDGET}
metric: {{name: val/score, mode: max}}
cull: {{at: {CULL_AT}, keep: 2, scheduler: sync}}
select: {{metric: val/score, mode: max}}
failure: {{retries: 0, tolerate: 0}}
"""

SWEEP_SPEC = f"""
kind: sweep
name: toy-report-sweep
family: "{TOY}"
config: {{hidden: 8, steps_per_iter: 5}}
budget: 3
metric: {{name: val/score, mode: max}}
search: {{lr: {{grid: [0.003, 0.05]}}, nan_at: {{grid: [0, 2]}}}}
failure: {{retries: 0, tolerate: 0}}
"""


@pytest.fixture(scope="module")
def runs(tmp_path_factory: pytest.TempPathFactory) -> dict[str, dict[str, Any]]:
    """The summaries of one real seed cull and one real sweep, run side by side."""
    tmp = tmp_path_factory.mktemp("report_kinds")
    specs = {
        "cull": write_spec(tmp / "cull.yaml", CULL_SPEC),
        "sweep": write_spec(tmp / "sweep.yaml", SWEEP_SPEC),
    }
    with ThreadPoolExecutor(2) as pool:
        futures = {
            k: pool.submit(cli_json, "sweep", str(p), "--storage", str(tmp / f"res-{k}"))
            for k, p in specs.items()
        }
        return {k: f.result() for k, f in futures.items()}


def _page(summary: dict[str, Any], tmp: Path) -> tuple[Path, Node]:
    """``platform report`` through the real CLI, then the DOM headless Chromium builds."""
    out = tmp / "report.html"
    proc = run_cli("report", summary["experiment_dir"], "--out", str(out), timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert proc.stdout.strip() == f"report: {out}"
    return out, parse(chromium_dom(out, tmp))


needs_chromium = pytest.mark.skipif(
    not CHROMIUM.exists(), reason="needs Debian chromium at /usr/bin/chromium"
)


@pytest.fixture(scope="module")
def cull_page(
    runs: dict[str, dict[str, Any]], tmp_path_factory: pytest.TempPathFactory
) -> tuple[Path, Node]:
    if not CHROMIUM.exists():
        pytest.skip("needs Debian chromium at /usr/bin/chromium")
    return _page(runs["cull"], tmp_path_factory.mktemp("cull_page"))


@pytest.fixture(scope="module")
def sweep_page(
    runs: dict[str, dict[str, Any]], tmp_path_factory: pytest.TempPathFactory
) -> tuple[Path, Node]:
    if not CHROMIUM.exists():
        pytest.skip("needs Debian chromium at /usr/bin/chromium")
    return _page(runs["sweep"], tmp_path_factory.mktemp("sweep_page"))


def _by_seed(summary: dict[str, Any]) -> dict[int, dict[str, Any]]:
    return {t["seed"]: t for t in summary["trials"]}


def _panel(dom: Node, cls: str) -> Node:
    panels = dom.find_all("svg", cls=cls)
    assert panels, f"no svg.{cls}"
    return panels[0]


def _n_points(curve: Node) -> int:
    """Points drawn in a curve's path (``M x,y L x,y ...``; a break starts a new ``M``)."""
    d = curve.find_all("path", cls="line")[0].attrs["d"]
    return len(re.findall(r"[ML]", d))


def _styles(curve: Node) -> dict[str, str]:
    return curve.find_all("path", cls="line")[0].attrs


# ----------------------------------------------------------------------------
# Seed cull
# ----------------------------------------------------------------------------


def test_kinds_are_read_from_the_folders(runs: dict[str, dict[str, Any]]) -> None:
    assert experiment_kind(runs["cull"]["experiment_dir"]) == "seed_cull"
    assert experiment_kind(runs["sweep"]["experiment_dir"]) == "sweep"


@pytest.mark.browser
@needs_chromium
def test_seed_cull_page_is_its_own_and_self_contained(cull_page: tuple[Path, Node]) -> None:
    out, dom = cull_page
    text = out.read_text()
    assert "seed cull report" in dom.find_all("title")[0].text()
    assert "No verdicts yet" not in text and not dom.find_all("section", cls="lever-card")
    assert not re.search(r"<script|<link|@import|(?:src|href)=\"(?:https?:)?//", text, flags=re.I)


@pytest.mark.browser
@needs_chromium
def test_seed_cull_page_draws_a_curve_per_seed_with_the_cull_marked(
    runs: dict[str, dict[str, Any]], cull_page: tuple[Path, Node]
) -> None:
    summary, (_, dom) = runs["cull"], cull_page
    panel = _panel(dom, "seed-curves")
    curves = panel.find_all("g", cls="curve")
    assert sorted(int(c.attrs["data-seed"]) for c in curves) == [0, 1, 2, 3]
    marks = panel.find_all("line", cls="mark")
    assert [m.attrs["data-iteration"] for m in marks] == [str(summary["cull"]["at"])] == ["2"]
    # every seed that reported a finite value at the cull point has its dot there
    at_mark = [c for c in curves if c.find_all("circle", cls="at-mark")]
    assert sorted(int(c.attrs["data-seed"]) for c in at_mark) == [0, 2, 3]
    # kept seeds are drawn over the whole budget, a paused-and-restored one included
    for c in curves:
        expected = BUDGET if c.attrs["data-status"] in ("kept", "selected") else CULL_AT
        if c.attrs["data-seed"] != str(NAN_SEED):
            assert _n_points(c) == expected, c.attrs


@pytest.mark.browser
@needs_chromium
def test_seed_cull_page_marks_the_selected_and_the_culled(
    runs: dict[str, dict[str, Any]], cull_page: tuple[Path, Node]
) -> None:
    summary, (_, dom) = runs["cull"], cull_page
    selected = summary["selected"]["seed"]
    by_seed = _by_seed(summary)
    culled = {s for s, t in by_seed.items() if t["status"] == "culled"}
    assert len(culled) == 2 and NAN_SEED in culled and selected not in culled
    panel = _panel(dom, "seed-curves")
    sel = panel.find_all("g", cls="selected")
    assert [int(c.attrs["data-seed"]) for c in sel] == [selected]
    assert float(_styles(sel[0])["stroke-width"]) > max(
        float(_styles(c)["stroke-width"])
        for c in panel.find_all("g", cls="curve")
        if c is not sel[0]
    )
    drawn_culled = {int(c.attrs["data-seed"]) for c in panel.find_all("g", cls="culled")}
    assert drawn_culled == culled
    assert all(
        "stroke-dasharray" in _styles(c) for c in panel.find_all("g", cls="culled")
    )  # culled: dashed
    rows = {int(r.attrs["data-seed"]): r for r in dom.find_all("tr", cls="seed-row")}
    assert sorted(rows) == [0, 1, 2, 3]
    assert {s for s, r in rows.items() if r.attrs["data-status"] == "culled"} == culled
    assert [s for s, r in rows.items() if "selected" in r.classes] == [selected]
    header = " ".join(dom.find_all("header", cls="top")[0].text().split())
    assert f"seed {selected}" in header and "iteration 2 of 4" in header


@pytest.mark.browser
@needs_chromium
def test_seed_cull_page_shows_each_seeds_value_at_the_cull_point(
    runs: dict[str, dict[str, Any]], cull_page: tuple[Path, Node]
) -> None:
    # The value at the cull point is what the cull decided on (tunelab_cull.json's arrivals).
    summary, (_, dom) = runs["cull"], cull_page
    cull_state = json.loads(
        ExperimentLayout(Path(summary["experiment_dir"])).cull_state_file.read_text()
    )
    arrived = {tid: v[0] for tid, v in cull_state["arrived"].items()}
    for row in dom.find_all("tr", cls="seed-row"):
        value = arrived[row.attrs["data-trial"]]
        cell = row.find_all("td")[2].text()
        if value is None:  # the diverged seed: NaN shown, not dropped
            assert row.attrs["data-seed"] == str(NAN_SEED)
            assert cell == "NaN" and row.attrs["data-at-cull"] == "nan"
        else:
            assert float(row.attrs["data-at-cull"]) == pytest.approx(value)
            assert float(cell.replace("−", "-")) == pytest.approx(value, rel=1e-3)


@pytest.mark.browser
@needs_chromium
def test_seed_cull_page_marks_where_a_seed_diverged(cull_page: tuple[Path, Node]) -> None:
    _, dom = cull_page
    curve = _panel(dom, "seed-curves").find_all("g", cls="curve", data_seed=str(NAN_SEED))[0]
    assert "diverged" in curve.classes
    assert [n.attrs["data-iteration"] for n in curve.find_all("path", cls="nonfinite")] == ["2"]
    assert _n_points(curve) == CULL_AT - 1  # the line ends at the last finite value
    row = dom.find_all("tr", cls="seed-row", data_seed=str(NAN_SEED))[0]
    assert "diverged @ 2" in row.text()


@pytest.mark.browser
@needs_chromium
def test_seed_cull_page_shows_the_selected_seeds_artifacts(
    runs: dict[str, dict[str, Any]], cull_page: tuple[Path, Node]
) -> None:
    # The toy family exports prediction.json only: it is listed and shown.
    summary, (_, dom) = runs["cull"], cull_page
    (section,) = dom.find_all("section", cls="artifacts")
    assert section.attrs["data-seed"] == str(summary["selected"]["seed"])
    selected_dir = Path(summary["experiment_dir"]) / "selected"
    files = sorted(p.name for p in selected_dir.iterdir())
    assert files == ["prediction.json"]
    assert [li.attrs["data-name"] for li in section.find_all("li", cls="artifact")] == files
    shown = json.loads(section.find_all("pre")[0].text())
    assert shown == json.loads((selected_dir / "prediction.json").read_text())
    assert summary["selected"]["trial_id"] in section.text()


def _wav(path: Path, seconds: float = 0.2, sr: int = 8000) -> None:
    t = np.arange(int(seconds * sr)) / sr
    samples = (0.3 * np.sin(2 * np.pi * 440 * t) * 32767).astype("<i2")
    with wave.open(str(path), "wb") as w:
        w.setnchannels(1)
        w.setsampwidth(2)
        w.setframerate(sr)
        w.writeframes(samples.tobytes())


def _png(path: Path) -> None:
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(2, 1))
    FigureCanvasAgg(fig)
    fig.subplots().specgram(np.sin(np.arange(2048) / 3.0), Fs=8000)
    fig.savefig(path)


@pytest.fixture
def cull_with_media(runs: dict[str, dict[str, Any]], tmp_path: Path) -> Iterator[Path]:
    """A copy of the real seed cull whose ``selected/`` also holds a spectrogram and a WAV."""
    exp = tmp_path / "exp"
    shutil.copytree(runs["cull"]["experiment_dir"], exp)
    _png(exp / "selected" / "spectrogram.png")
    _wav(exp / "selected" / "generated.wav")
    yield exp


def test_selected_spectrogram_and_audio_are_embedded(cull_with_media: Path) -> None:
    dom = parse(render_report(cull_with_media))
    (section,) = dom.find_all("section", cls="artifacts")
    selected = cull_with_media / "selected"
    (img,) = section.find_all("img", cls="artifact-image")
    assert img.attrs["data-name"] == "spectrogram.png"
    prefix = "data:image/png;base64,"
    assert img.attrs["src"].startswith(prefix)
    assert (
        base64.b64decode(img.attrs["src"][len(prefix) :])
        == (selected / "spectrogram.png").read_bytes()
    )
    (audio,) = section.find_all("audio", cls="artifact-audio")
    prefix = "data:audio/wav;base64,"
    assert audio.attrs["src"].startswith(prefix) and "controls" in audio.attrs
    assert (
        base64.b64decode(audio.attrs["src"][len(prefix) :])
        == (selected / "generated.wav").read_bytes()
    )
    names = [li.attrs["data-name"] for li in section.find_all("li", cls="artifact")]
    assert names == ["generated.wav", "prediction.json", "spectrogram.png"]


def test_large_media_is_listed_not_embedded(
    cull_with_media: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(report_seed_cull, "EMBED_MAX_BYTES", 100)
    dom = parse(render_report(cull_with_media))
    (section,) = dom.find_all("section", cls="artifacts")
    assert not section.find_all("img") and not section.find_all("audio")
    wav = section.find_all("li", cls="artifact", data_name="generated.wav")[0]
    assert "too large to embed" in wav.text()


# ----------------------------------------------------------------------------
# Sweep
# ----------------------------------------------------------------------------


def _final(trial: dict[str, Any]) -> float:
    v = trial["metrics"].get("val/score")
    return math.nan if v is None else float(v)


@pytest.mark.browser
@needs_chromium
def test_sweep_page_lists_the_best_configs(
    runs: dict[str, dict[str, Any]], sweep_page: tuple[Path, Node]
) -> None:
    summary, (out, dom) = runs["sweep"], sweep_page
    assert "sweep report" in dom.find_all("title")[0].text()
    assert "No verdicts yet" not in out.read_text()
    table = dom.find_all("table", cls="best-configs")[0]
    head = [th.text() for th in table.find_all("th")]
    assert head[:4] == ["rank", "val/score", "lr", "nan_at"]
    rows = table.find_all("tr", cls="config-row")
    trials = {t["trial_id"]: t for t in summary["trials"]}
    assert len(rows) == len(trials) == 4
    assert [r.attrs["data-rank"] for r in rows] == ["1", "2", "3", "4"]
    assert rows[0].attrs["data-trial"] == summary["best"]["trial_id"] and "best" in rows[0].classes
    assert [r for r in rows if "best" in r.classes] == [rows[0]]
    finite = [_final(trials[r.attrs["data-trial"]]) for r in rows[:2]]
    assert finite == sorted(finite, reverse=True) and all(math.isfinite(v) for v in finite)
    assert float(rows[0].attrs["data-value"]) == pytest.approx(summary["best"]["value"])
    # the diverged configs (nan_at 2) rank last and read NaN
    for r in rows[2:]:
        cells = [td.text() for td in r.find_all("td")]
        assert cells[1] == "NaN" and cells[3] == "2"


@pytest.mark.browser
@needs_chromium
def test_sweep_page_draws_the_best_configs_curves(
    runs: dict[str, dict[str, Any]], sweep_page: tuple[Path, Node]
) -> None:
    summary, (_, dom) = runs["sweep"], sweep_page
    panel = _panel(dom, "sweep-curves")
    curves = panel.find_all("g", cls="curve")
    assert sorted(c.attrs["data-trial"] for c in curves) == sorted(
        t["trial_id"] for t in summary["trials"]
    )
    (best,) = panel.find_all("g", cls="best")
    assert (
        best.attrs["data-trial"] == summary["best"]["trial_id"] and best.attrs["data-rank"] == "1"
    )
    assert _n_points(best) == 3
    diverged = {t["trial_id"] for t in summary["trials"] if math.isnan(_final(t))}
    assert len(diverged) == 2
    marked = {c.attrs["data-trial"] for c in curves if c.find_all("path", cls="nonfinite")}
    assert marked == diverged


@pytest.mark.parametrize("kind", ["cull", "sweep"])
def test_a_running_experiment_renders_from_its_curves(
    runs: dict[str, dict[str, Any]], tmp_path: Path, kind: str
) -> None:
    # Before finalizing there is no results table, summary or selection: the trials come
    # from their result.json, every curve is drawn and the page says nothing is chosen yet.
    exp = tmp_path / "exp"
    shutil.copytree(runs[kind]["experiment_dir"], exp)
    for name in ("results.csv", "results.parquet", "summary.json", "selected_model.json"):
        (exp / name).unlink(missing_ok=True)
    shutil.rmtree(exp / "selected", ignore_errors=True)
    dom = parse(render_report(exp))
    curves = dom.find_all("g", cls="curve")
    assert len({c.attrs.get("data-trial") for c in curves}) == len(runs[kind]["trials"])
    assert "none yet" in " ".join(dom.find_all("header", cls="top")[0].text().split())
    # each trial's status is the one rule's (Tune's saved state), as `platform status` shows it:
    # the ended trials of this copy are finished / culled / diverged, never "running"
    table = load_experiment(exp).results
    assert dict(zip(table["trial_id"], table["status"], strict=True)) == {
        t["trial_id"]: t["status"] for t in runs[kind]["trials"]
    }
