"""Family config domains: every shipped family refuses out-of-domain values, naming the field.

Positive sizes, positive learning rates, finite floats, sane upper bounds (issue 10, item 4).
Refused at spec validation (exit 2) because specs build each config through pydantic.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import pydantic
import pytest

from tunelab import SpecError, get_family, load_spec

FAMILIES = ("ouroboros", "flow_policy", "recursive_reasoner")
SPECS = sorted(Path(__file__).resolve().parents[2].glob("search_spaces/*.yaml"))

BAD: list[tuple[str, Any, str]] = [
    ("lr", -0.002, "greater than 0"),
    ("lr", 0.0, "greater than 0"),
    ("lr", math.nan, "finite number"),
    ("lr", math.inf, "finite number"),
    ("lr", 5.0, "less than or equal"),
    ("hidden", -16, "greater than or equal"),
    ("hidden", 0, "greater than or equal"),
    ("hidden", 1e9, "less than or equal"),
    ("hidden", 2.5, "fractional part"),
    ("batch_size", 0, "greater than or equal"),
    ("batch_size", 10**9, "less than or equal"),
    ("steps_per_iter", -1, "greater than or equal"),
    ("weight_decay", -0.1, "greater than or equal"),
    ("grad_clip", math.nan, "finite number"),
    ("n_layers", 10**6, "less than or equal"),
]


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize(("field", "value", "why"), BAD)
def test_out_of_domain_values_are_refused_naming_the_field(
    family: str, field: str, value: Any, why: str
) -> None:
    with pytest.raises(pydantic.ValidationError) as err:
        get_family(family).make_config({field: value})
    first = err.value.errors()[0]
    assert first["loc"][0] == field
    assert why in first["msg"]


@pytest.mark.parametrize(
    ("family", "values"),
    [
        ("ouroboros", {"syllable_ms": (90.0, math.nan)}),
        ("ouroboros", {"syllable_ms": (130.0, 90.0)}),
        ("ouroboros", {"mrstft_ffts": ()}),
        ("ouroboros", {"mrstft_ffts": (64, -128)}),
        ("ouroboros", {"sample_rate": 10**9}),
        ("ouroboros", {"ic_noise_rms": math.inf}),
        ("ouroboros", {"f0_start_hz": -650.0}),
        ("ouroboros", {"n_train_files": 0}),  # the synthetic corpus needs training files
        ("ouroboros", {"data_seed": -1}),
        ("flow_policy", {"maneuver_amp": (2.0, math.inf)}),
        ("flow_policy", {"time_ln_mean": math.nan}),
        ("flow_policy", {"n_train": 10**12}),
        ("recursive_reasoner", {"sigma": math.nan}),
        ("recursive_reasoner", {"maze_size": 10**6}),
        ("recursive_reasoner", {"n_train": 10**12}),
    ],
)
def test_family_specific_domains(family: str, values: dict[str, Any]) -> None:
    with pytest.raises(pydantic.ValidationError, match=next(iter(values))):
        get_family(family).make_config(values)


def test_seed_document_sizes_are_in_domain() -> None:
    # the A100 size the ouroboros module docstring documents, and a real-folder cap of 0
    get_family("ouroboros").make_config(
        {
            "sample_rate": 44100,
            "hidden": 64,
            "n_layers": 2,
            "H_min": 512,
            "H_max": 2048,
            "h_schedule": "pow2",
            "lr": 1.0e-4,
            "batch_size": 32,
            "steps_per_iter": 200,
            "curriculum_epochs": 50,
            "n_train_files": 500,
            "silence_prefix_ms": 10,
        }
    )
    get_family("ouroboros").make_config({"data_dir": "/some/folder", "n_train_files": 0})
    get_family("recursive_reasoner").make_config(
        {"maze_size": 30, "hidden": 512, "n_train": 100_000}
    )


@pytest.mark.parametrize("quick", [False, True])
@pytest.mark.parametrize("spec", SPECS, ids=lambda p: p.name)
def test_shipped_specs_validate(spec: Path, quick: bool) -> None:
    load_spec(spec, quick=quick)


@pytest.mark.parametrize(
    ("spec", "override", "key"),
    [
        ("seed_cull.yaml", "config.lr=-0.002", "config.lr"),
        ("seed_cull.yaml", "config.hidden=-16", "config.hidden"),
        ("seed_cull.yaml", "config.hidden=1e9", "config.hidden"),
        ("seed_cull.yaml", "config.lr=.nan", "config.lr"),
        ("lever.yaml", "control.lr=.nan", "control.lr"),
        ("sigma_ramp.yaml", "config.hidden=1000000000", "config.hidden"),
    ],
)
def test_specs_with_out_of_domain_config_exit_2(spec: str, override: str, key: str) -> None:
    path = next(p for p in SPECS if p.name == spec)
    with pytest.raises(SpecError) as err:
        load_spec(path, overrides=[override])
    assert err.value.exit_code == 2
    assert err.value.key == key


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize(
    ("field", "value"), [("hidden", True), ("lr", False), ("batch_size", True)]
)
def test_booleans_are_not_numbers(family: str, field: str, value: bool) -> None:
    with pytest.raises(pydantic.ValidationError) as err:
        get_family(family).make_config({field: value})
    assert err.value.errors()[0]["loc"] == (field,)


def test_boolean_fields_still_take_booleans() -> None:
    assert get_family("ouroboros").make_config({"osc_init": False}).osc_init is False
    assert get_family("flow_policy").make_config({"gaussianize": True}).gaussianize is True
    assert get_family("recursive_reasoner").make_config({"act": True}).act is True


def test_spec_with_a_boolean_size_exits_2() -> None:
    path = next(p for p in SPECS if p.name == "seed_cull.yaml")
    with pytest.raises(SpecError, match=r"config\.hidden: Input should be a valid integer"):
        load_spec(path, overrides=["config.hidden=true"])
