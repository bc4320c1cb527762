"""Bad data is refused before any trial starts, naming the file and the reason (issue 10, item 5).

``tunelab.family.check_family_data(family, data_root, configs)`` runs each family's ``data_check``
hook; a bad file raises :class:`tunelab.errors.DataError` (exit code 2). The families' loaders
raise the same error inside a trial, so a missing annotation never silently changes the split
and a truncated WAV never loads.
"""

from __future__ import annotations

import pickle
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import soundfile as sf

from trainables import ouroboros as O
from trainables import recursive_reasoner as R
from tunelab.errors import EXIT_INVALID, DataError
from tunelab.family import Family, check_family_data, get_family

# A small corpus: 6 recordings of 2 syllables at 8 kHz (about 0.2 s each).
TINY: dict[str, Any] = {
    "sample_rate": 8000,
    "hidden": 8,
    "n_layers": 1,
    "ssm_state": 4,
    "n_train_files": 6,
    "n_val_files": 1,
    "n_test_files": 1,
    "syllables_per_file": 2,
    "syllable_ms": (40.0, 60.0),
    "lead_silence_ms": (20.0, 30.0),
    "gap_ms": (20.0, 30.0),
    "silence_prefix_ms": 5.0,
    "silence_suffix_ms": 5.0,
    "max_segs": 20,
    "H_min": 64,
    "H_max": 128,
    "mrstft_ffts": (32, 64),
    "batch_size": 2,
    "steps_per_iter": 1,
    "n_eval_windows": 2,
    "eval_lead_ms": 10.0,
    "eval_voc_ms": 30.0,
}
N_FILES = 6


def _folder(tmp_path: Path) -> Path:
    """A real-format corpus folder ({stem}.wav + {stem}.txt) that passes the check."""
    cfg = O.FAMILY.make_config(TINY)
    folder = tmp_path / "corpus"
    folder.mkdir()
    for i in range(N_FILES):
        x, syl = O.synth_syllable_file(cfg, i)
        O.write_recording(folder, f"bird{i}", x, cfg.sample_rate, syl)
    return folder


def _config(folder: Path, **over: Any) -> dict[str, Any]:
    return {**TINY, "data_dir": str(folder), "n_train_files": 0, **over}


def _check(folder: Path, data_root: Path, **over: Any) -> None:
    check_family_data("ouroboros", data_root, [_config(folder, **over)])


def _truncate(p: Path) -> None:
    p.write_bytes(p.read_bytes()[: p.stat().st_size // 2])


def _float_wav(value: float) -> Callable[[Path], None]:
    def write(p: Path) -> None:
        x = np.full(1600, value, dtype=np.float32)
        x[:10] = 0.1
        sf.write(p, x, 8000, subtype="FLOAT")

    return write


# (what is done to bird3.wav / bird3.txt, the file the error names, a phrase of the reason)
CORRUPTIONS: list[tuple[str, Callable[[Path], None], str, str]] = [
    ("garbage wav", lambda f: (f / "bird3.wav").write_bytes(b"garbage!" * 200), "wav", "not a WAV"),
    ("truncated wav", lambda f: _truncate(f / "bird3.wav"), "wav", "truncated"),
    (
        "header-only wav",
        lambda f: (f / "bird3.wav").write_bytes((f / "bird3.wav").read_bytes()[:44]),
        "wav",
        "truncated",
    ),
    ("empty wav", lambda f: (f / "bird3.wav").write_bytes(b""), "wav", "empty file"),
    ("nan samples", lambda f: _float_wav(float("nan"))(f / "bird3.wav"), "wav", "non-finite"),
    ("silent wav", lambda f: sf.write(f / "bird3.wav", np.zeros(1600), 8000), "wav", "silent"),
    ("missing txt", lambda f: (f / "bird3.txt").unlink(), "txt", "missing annotation"),
    ("missing wav", lambda f: (f / "bird3.wav").unlink(), "wav", "missing recording"),
    ("empty txt", lambda f: (f / "bird3.txt").write_text(""), "txt", "empty annotation"),
    (
        "comment-only txt",
        lambda f: (f / "bird3.txt").write_text("# nothing\n\n"),
        "txt",
        "empty annotation",
    ),
    ("non-numeric txt", lambda f: (f / "bird3.txt").write_text("onset offset\n"), "txt", "line 1"),
    ("one column", lambda f: (f / "bird3.txt").write_text("0.01 0.05\n0.1\n"), "txt", "line 2"),
    ("nan annotation", lambda f: (f / "bird3.txt").write_text("nan 0.05\n"), "txt", "two numbers"),
    (
        "reversed annotation",
        lambda f: (f / "bird3.txt").write_text("0.05 0.01\n"),
        "txt",
        "onset < offset",
    ),
    ("negative onset", lambda f: (f / "bird3.txt").write_text("-0.01 0.05\n"), "txt", "0 <= onset"),
    ("past the end", lambda f: (f / "bird3.txt").write_text("0.01 9.0\n"), "txt", "past the end"),
    (
        "binary txt",
        lambda f: (f / "bird3.txt").write_bytes(b"\xff\xfe\x00\x81"),
        "txt",
        "not a text",
    ),
]


@pytest.mark.parametrize(
    ("what", "corrupt", "ext", "reason"), CORRUPTIONS, ids=[c[0] for c in CORRUPTIONS]
)
def test_bad_corpus_file_is_refused_naming_it(
    tmp_path: Path, what: str, corrupt: Callable[[Path], None], ext: str, reason: str
) -> None:
    folder = _folder(tmp_path)
    _check(folder, tmp_path / "data")  # the intact folder passes
    corrupt(folder)
    with pytest.raises(DataError) as err:
        _check(folder, tmp_path / "data")
    assert err.value.exit_code == EXIT_INVALID == 2
    assert err.value.file == str(folder / f"bird3.{ext}")
    assert reason in err.value.reason
    assert str(err.value).startswith(str(folder / f"bird3.{ext}") + ": ")


@pytest.mark.parametrize("corruption", ["truncated wav", "missing txt", "non-numeric txt"])
def test_the_trial_loader_refuses_what_the_check_refuses(tmp_path: Path, corruption: str) -> None:
    # inside a trial: a missing .txt no longer drops the file from the split silently, and a
    # truncated WAV no longer loads
    folder = _folder(tmp_path)
    corrupt = next(c[1] for c in CORRUPTIONS if c[0] == corruption)
    corrupt(folder)
    cfg = O.FAMILY.make_config(_config(folder))
    with pytest.raises(DataError, match="bird3"):
        O.load_corpus(cfg, tmp_path / "data")


def test_too_few_files_and_a_missing_folder_are_refused(tmp_path: Path) -> None:
    folder = _folder(tmp_path)
    with pytest.raises(DataError, match="holds 6 annotated recording") as err:
        _check(folder, tmp_path, n_val_files=3, n_test_files=3)
    assert err.value.file == str(folder)
    with pytest.raises(DataError, match="does not exist"):
        _check(tmp_path / "nowhere", tmp_path)


def test_synthetic_corpus_is_checked_once_generated(tmp_path: Path) -> None:
    data_root = tmp_path / "data"
    config = {**TINY, "n_train_files": 2}
    check_family_data("ouroboros", data_root, [config])  # not generated yet: nothing to check
    assert not data_root.exists()
    cfg = O.FAMILY.make_config(config)
    folder = O.ensure_corpus(cfg, data_root)
    check_family_data("ouroboros", data_root, [config])
    _truncate(folder / "syn00001.wav")
    with pytest.raises(DataError, match="truncated") as err:
        check_family_data("ouroboros", data_root, [config])
    assert err.value.file == str(folder / "syn00001.wav")
    assert f"delete {folder}" in err.value.reason  # how to get a sound corpus back


def _mazes(tmp_path: Path) -> tuple[dict[str, Any], Path]:
    config = {"maze_size": 5, "n_train": 8, "n_val": 4, "n_test": 4}
    cfg = R.FAMILY.make_config(config)
    R.load_or_generate_mazes(cfg, tmp_path)
    return config, R.maze_file(cfg, tmp_path)


def _rewrite_npz(path: Path, **change: Any) -> None:
    with np.load(path) as z:
        arrays = {k: z[k] for k in z.files}
    arrays.update(change)
    with path.open("wb") as f:
        np.savez_compressed(f, **arrays)


@pytest.mark.parametrize(
    ("corrupt", "reason"),
    [
        (_truncate, "unreadable maze file"),
        (lambda p: p.write_bytes(b"garbage" * 50), "unreadable maze file"),
        (lambda p: _rewrite_npz(p, val_x=np.zeros((3, 5, 5), np.uint8)), "val_x"),
        (lambda p: _rewrite_npz(p, train_y=np.full((8, 5, 5), 7, np.uint8)), "out of range"),
        (lambda p: _rewrite_npz(p, test_x=np.ones((4, 5, 5), np.uint8)), "single start"),
    ],
    ids=["truncated", "garbage", "wrong shape", "bad labels", "no start"],
)
def test_damaged_maze_cache_is_refused(
    tmp_path: Path, corrupt: Callable[[Path], None], reason: str
) -> None:
    config, path = _mazes(tmp_path)
    check_family_data("recursive_reasoner", tmp_path, [config])  # the generated file passes
    corrupt(path)
    with pytest.raises(DataError, match=reason) as err:
        check_family_data("recursive_reasoner", tmp_path, [config])
    assert err.value.file == str(path) and "delete it" in err.value.reason
    with pytest.raises(DataError, match=reason):  # and a trial refuses it the same way
        R.load_or_generate_mazes(R.FAMILY.make_config(config), tmp_path)


def test_families_without_files_have_nothing_to_check(tmp_path: Path) -> None:
    assert get_family("flow_policy").data_check is None
    check_family_data("flow_policy", tmp_path / "nowhere", [{}, {"lds_alpha": 0.5}])
    check_family_data("recursive_reasoner", tmp_path, [{}])  # nothing cached yet


def test_equal_configs_are_checked_once_and_os_errors_name_the_file(tmp_path: Path) -> None:
    calls: list[Any] = []

    def data_check(cfg: Any, data_root: Path) -> None:
        calls.append(cfg)
        if cfg.lr > 1.0e-2:
            raise PermissionError(13, "Permission denied", str(data_root / "locked.wav"))

    family = Family("probe", O.Config, O.build, (), data_check=data_check)
    check_family_data(family, tmp_path, [{"lr": 1e-3}, {"lr": 1e-3}, O.Config(lr=1e-4)])
    assert [c.lr for c in calls] == [1e-3, 1e-4]
    with pytest.raises(DataError, match="cannot read: Permission denied") as err:
        family.check_data(tmp_path, {"lr": 0.1})
    assert err.value.file == str(tmp_path / "locked.wav")


def test_data_error_survives_pickling() -> None:
    # Ray ships a trial's exception to the driver by pickle
    err = pickle.loads(pickle.dumps(DataError("/d/a.wav", "truncated")))
    assert (err.file, err.reason, err.exit_code, str(err)) == (
        "/d/a.wav",
        "truncated",
        2,
        "/d/a.wav: truncated",
    )


def test_the_cli_refuses_a_truncated_wav_before_anything_starts(tmp_path: Path) -> None:
    import json

    from tests.conftest import run_cli, write_spec

    folder = _folder(tmp_path)
    _truncate(folder / "bird3.wav")
    config = json.dumps(_config(folder))  # JSON is YAML
    spec = write_spec(
        tmp_path / "s.yaml",
        "kind: seed_cull\nname: bad-data\nfamily: ouroboros\n"
        f"config: {config}\nseeds: 2\nbudget: 2\n"
        "metric: {name: val/autonomy, mode: min}\n"
        "cull: {at: 1, keep: 1, scheduler: sync}\n"
        "select: {metric: val/autonomy, mode: min}\n",
    )
    storage = tmp_path / "res"
    proc = run_cli("sweep", str(spec), "--storage", str(storage))
    assert proc.returncode == 2, proc.stderr[-3000:]
    assert f"{folder / 'bird3.wav'}: " in proc.stderr and "truncated" in proc.stderr
    assert "Traceback" not in proc.stderr
    assert not storage.exists()  # no experiment folder, no MLflow store, no trial
