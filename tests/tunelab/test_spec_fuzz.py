"""Fuzzing spec validation: no mutant of a shipped spec crashes or hangs.

Each mutant of ``search_spaces/*.yaml`` (seeded, so the same on every run)
either validates or raises :class:`SpecError` whose message names the file
(exit 2 on the command line), within :data:`TIME_LIMIT_S`; no other exception
type, no traceback. A valid mutant also survives the JSON round trip that
``platform resume`` makes (the driver stores ``model_dump(mode="json")``).
"""

from __future__ import annotations

import copy
import math
import random
import re
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import yaml
from typer.testing import CliRunner

from cli import app
from tests.conftest import ROOT
from tunelab import SpecError, load_spec, parse_spec

SHIPPED = sorted((ROOT / "search_spaces").glob("*.yaml"))
N_MUTANTS = 160
FUZZ_SEED = 20261130
#: Seconds one mutant may take to validate (full and --quick); the largest legal file takes ~2 s.
TIME_LIMIT_S = 5.0

#: Values a careless edit, a typo or a hostile file may put anywhere.
NASTY: list[Any] = [
    True,
    False,
    None,
    0,
    -1,
    1,
    3,
    2.5,
    -0.0,
    1e9,
    10**12,
    2**64,
    math.nan,
    math.inf,
    -math.inf,
    "",
    "x@y",
    "val/autonomy",
    "1e6",
    "seeds",
    "optuna_tpe",
    "asha",
    [],
    {},
    [1, 1],
    [0, 1, 2],
    {"a": 1},
    {"loguniform": [0.1, 0.01]},
    [[[]]],
    "a" * 300,
]
#: Keys to add: known ones in the wrong place, and unknown ones.
KEYS = ["seeds", "budget", "quick", "search_alg", "num_samples", "cull", "kind", "zzz", "1", "<<"]
#: Billion laughs: 9**10 strings once expanded, in a few hundred bytes.
BOMB = "".join(
    f"b{i}: &b{i} [" + ", ".join([f"*b{i - 1}" if i else '"lol"'] * 9) + "]\n" for i in range(10)
)


def _paths(node: Any, prefix: tuple[Any, ...] = ()) -> list[tuple[Any, ...]]:
    """Every key path in a parsed spec (mapping keys and list indices)."""
    out = [prefix] if prefix else []
    if isinstance(node, dict):
        for k, v in node.items():
            out += _paths(v, (*prefix, k))
    elif isinstance(node, list):
        for i, v in enumerate(node):
            out += _paths(v, (*prefix, i))
    return out


def _parent(doc: Any, path: tuple[Any, ...]) -> Any:
    for p in path[:-1]:
        doc = doc[p]
    return doc


def _tree_mutant(doc: dict[str, Any], rng: random.Random) -> str:
    doc = copy.deepcopy(doc)
    paths = _paths(doc)
    op = rng.choice(["set", "set", "set", "delete", "add", "graft"])
    path = rng.choice(paths)
    parent = _parent(doc, path)
    if op == "set":
        parent[path[-1]] = copy.deepcopy(rng.choice(NASTY))
    elif op == "delete":
        del parent[path[-1]]
    elif op == "add":
        target = rng.choice([n for n in (doc, parent, parent[path[-1]]) if isinstance(n, dict)])
        target[rng.choice(KEYS)] = copy.deepcopy(rng.choice(NASTY))
    else:  # graft a copy of another subtree (the node at a random path) here
        parent[path[-1]] = copy.deepcopy(_parent(doc, (*rng.choice(paths), None)))
    return yaml.safe_dump(doc, sort_keys=False)


def _text_mutant(text: str, rng: random.Random) -> str:
    op = rng.choice(["truncate", "insert", "duplicate-line", "number", "bomb", "bytes"])
    if op == "truncate":
        return text[: rng.randrange(len(text))]
    if op == "insert":
        at = rng.randrange(len(text))
        return (
            text[:at]
            + rng.choice(["{", "[", ":", "&a ", "*a", "!!python/none ", "\t", "- "])
            + text[at:]
        )
    lines = text.splitlines(keepends=True)
    if op == "duplicate-line":
        i = rng.randrange(len(lines))
        return "".join([*lines[: i + 1], lines[i], *lines[i + 1 :]])
    if op == "number":
        numbers = list(re.finditer(r"(?<![\w.])\d+(\.\d+)?(e-?\d+)?(?![\w.])", text))
        m = rng.choice(numbers)
        new = rng.choice(["1e6", "1e12", ".nan", "-.inf", "true", "0", "-3", "1" * 5000, "0x10"])
        return text[: m.start()] + new + text[m.end() :]
    if op == "bomb":
        return text + BOMB + "description: *b9\n"
    return text.replace("\n", "\n\udcff", 1)  # not UTF-8 once encoded (surrogateescape)


def _mutants() -> list[tuple[str, Path, str]]:
    rng = random.Random(FUZZ_SEED)
    out = []
    for i in range(N_MUTANTS):
        shipped = SHIPPED[i % len(SHIPPED)]
        text = shipped.read_text()
        if rng.random() < 0.7:
            mutant = _tree_mutant(yaml.safe_load(text), rng)
        else:
            mutant = _text_mutant(text, rng)
        out.append((f"{i:03d}-{shipped.stem}", shipped, mutant))
    return out


MUTANTS = _mutants()


def _write(path: Path, text: str) -> Path:
    path.write_bytes(text.encode("utf-8", "surrogateescape"))
    return path


def _assert_clean(err: SpecError, spec: Path) -> None:
    """A message names the file, a well-formed key path and what to do."""
    text = str(err)
    assert text.startswith(f"{spec}: ") and err.message.strip(), text
    assert not err.key.startswith(".") and not err.key.endswith("."), text
    assert ".:" not in text.removeprefix(str(spec)) and ": :" not in text, text
    assert "Traceback" not in text and len(text) < 2000, text


def _validate(spec: Path, quick: bool) -> str:
    """``"ok"`` or ``"invalid"``; anything else (another exception) fails the test."""
    try:
        parsed = load_spec(spec, quick=quick)
    except SpecError as err:
        _assert_clean(err, spec)
        return "invalid"
    # the driver stores model_dump(mode="json") and `platform resume` re-validates it
    again = parse_spec(parsed.model_dump(mode="json"), source=spec)
    assert again == parsed
    return "ok"


def test_mutants_of_the_shipped_specs_validate_or_fail_cleanly(tmp_path: Path) -> None:
    outcomes: dict[str, int] = {}
    for name, _, text in MUTANTS:
        spec = _write(tmp_path / f"{name}.yaml", text)
        for quick in (False, True):
            start = time.perf_counter()
            outcome = _validate(spec, quick)
            took = time.perf_counter() - start
            assert took < TIME_LIMIT_S, f"{name} (quick={quick}) took {took:.1f} s"
            outcomes[outcome] = outcomes.get(outcome, 0) + 1
    # the mutants reach both sides: some stay valid, most are refused
    assert outcomes.get("ok", 0) >= 10 and outcomes.get("invalid", 0) >= 100, outcomes


def _refused(tmp_path: Path, n: int) -> list[tuple[Path, SpecError]]:
    """The first ``n`` mutants validation refuses, written to ``tmp_path``, with their errors."""
    out = []
    for name, _, text in MUTANTS:
        spec = _write(tmp_path / f"{name}.yaml", text)
        try:
            load_spec(spec)
        except SpecError as err:
            out.append((spec, err))
        if len(out) == n:
            break
    return out


def test_refused_mutants_exit_2_on_the_command_line(tmp_path: Path) -> None:
    # the command line maps each refusal to exit 2 with the same message, and starts nothing
    storage = tmp_path / "results"
    for spec, err in _refused(tmp_path, 12):
        result = CliRunner().invoke(app, ["sweep", str(spec), "--storage", str(storage)])
        assert result.exit_code == 2, result.output
        assert str(err) in result.output and "Traceback" not in result.output
    assert not storage.exists() or not any(storage.iterdir())


def test_bad_specs_exit_2_in_a_real_process(tmp_path: Path) -> None:
    # the console entry point, in fresh processes (run side by side: each pays the imports)
    seed_cull = (ROOT / "search_spaces" / "seed_cull.yaml").read_text()
    specs = {
        "bomb": seed_cull + BOMB,
        "seeds": seed_cull.replace("seeds: 4", "seeds: 1000000000"),
        "mutant": _refused(tmp_path, 1)[0][0].read_text(),
    }
    procs = {}
    for name, text in specs.items():
        spec = _write(tmp_path / f"{name}-cli.yaml", text)
        procs[name] = subprocess.Popen(
            [sys.executable, "-m", "cli", "sweep", str(spec), "--storage", str(tmp_path / "res")],
            cwd=ROOT,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
    with ThreadPoolExecutor(len(procs)) as pool:
        outs = dict(
            zip(procs, pool.map(lambda p: p.communicate(timeout=120), procs.values()), strict=True)
        )
    for name, proc in procs.items():
        stderr = outs[name][1]
        assert proc.returncode == 2, (name, stderr)
        assert stderr.startswith("error: ") and "Traceback" not in stderr, (name, stderr)
    assert "MAX_YAML_NODES" in outs["bomb"][1]
    assert "seeds: at most 10000 seeds" in outs["seeds"][1]
