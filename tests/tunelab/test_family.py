"""Family lookup: entry points in group ``tunelab.families``, and ``module:ATTR`` specs."""

from __future__ import annotations

import importlib
import sys
import textwrap
from collections.abc import Iterator
from pathlib import Path

import pytest

import tunelab
from tests.conftest import TOY
from tunelab import FAMILY_GROUP, Family, FamilyConflictError, family_names, get_family, parse_spec

SHIPPED = ("flow_policy", "ouroboros", "recursive_reasoner")

# A user's own family module, outside this repository (no torch needed).
USER_MODULE = "my_lab_family"
USER_MODULE_SRC = """
from pydantic import ConfigDict
from pydantic.dataclasses import dataclass

from tunelab import Family


@dataclass(config=ConfigDict(extra="forbid"))
class Config:
    hidden: int = 16  # width
    lr: float = 1e-2  # learning rate


class Exp:
    def train_iteration(self):
        return {"val/score": 0.0}

    def state_dict(self):
        return {}

    def load_state_dict(self, state):
        pass

    def export(self, out_dir):
        return {}


def build(cfg, seed, data_root):
    return Exp()


FAMILY = Family(name="my_family", config_cls=Config, build=build, metrics=("val/score",))
NOT_A_FAMILY = object()
"""


def _seed_cull(family: str) -> dict[str, object]:
    """A minimal valid seed_cull spec (the shape of tests/tunelab/test_spec.py's VALID)."""
    return {
        "kind": "seed_cull",
        "name": "user-cull",
        "family": family,
        "config": {"hidden": 8},
        "seeds": 4,
        "budget": 6,
        "metric": {"name": "val/score", "mode": "max"},
        "cull": {"at": 0.5, "keep": 2, "scheduler": "sync"},
        "select": {"metric": "val/score", "mode": "max"},
    }


def _install(root: Path, dist: str, entries: dict[str, str]) -> None:
    """Write an installed distribution's metadata: ``<dist>-0.1.dist-info`` under ``root``.

    The folder name escapes ``-`` to ``_`` as installers do (importlib.metadata reads
    the name up to the first ``-``, and counts two folders of one name once).
    """
    info = root / f"{dist.replace('-', '_')}-0.1.dist-info"
    info.mkdir()
    (info / "METADATA").write_text(f"Metadata-Version: 2.1\nName: {dist}\nVersion: 0.1\n")
    lines = "".join(f"{name} = {value}\n" for name, value in entries.items())
    (info / "entry_points.txt").write_text(f"[{FAMILY_GROUP}]\n{lines}")


@pytest.fixture
def site(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[Path]:
    """A fresh directory on ``sys.path`` holding the user's module; caches cleared around it."""
    (tmp_path / f"{USER_MODULE}.py").write_text(textwrap.dedent(USER_MODULE_SRC))
    sys.modules.pop(USER_MODULE, None)
    monkeypatch.syspath_prepend(str(tmp_path))  # also invalidates import caches
    yield tmp_path
    sys.modules.pop(USER_MODULE, None)
    monkeypatch.undo()  # sys.path back first, then drop caches that saw tmp_path
    importlib.invalidate_caches()


def test_shipped_families_are_listed_and_load_by_name() -> None:
    names = family_names()
    assert set(SHIPPED) <= set(names)
    assert names == sorted(names)
    assert tunelab.family_names is family_names
    for name in SHIPPED:
        family = get_family(name)
        assert isinstance(family, Family)
        assert family.name == name
        assert family is importlib.import_module(f"trainables.{name}").FAMILY


def test_trainables_has_no_registry() -> None:
    import trainables

    assert not hasattr(trainables, "FAMILIES")


def test_user_package_registers_a_family_through_an_entry_point(site: Path) -> None:
    assert "my_family" not in family_names()
    _install(site, "my-lab", {"my_family": f"{USER_MODULE}:FAMILY"})
    importlib.invalidate_caches()

    assert "my_family" in family_names()
    assert set(SHIPPED) <= set(family_names())
    assert USER_MODULE not in sys.modules  # listing imports no family module

    family = get_family("my_family")
    assert family is sys.modules[USER_MODULE].FAMILY
    assert family.name == "my_family"

    spec = parse_spec(_seed_cull("my_family"))
    assert spec.family == "my_family"
    with pytest.raises(tunelab.SpecError, match="config"):
        parse_spec({**_seed_cull("my_family"), "config": {"no_such_key": 1}})


def test_user_family_is_gone_once_its_path_is() -> None:
    # The previous test's tmp_path registration must not leak into this one.
    assert "my_family" not in family_names()
    with pytest.raises(KeyError):
        get_family("my_family")


def test_module_attr_spec_still_works(site: Path) -> None:
    family = get_family(f"{USER_MODULE}:FAMILY")
    assert family.name == "my_family"
    assert get_family(TOY).name == "toy"
    assert parse_spec(_seed_cull(TOY)).family == TOY
    with pytest.raises(TypeError, match=r"does not name a tunelab\.Family"):
        get_family(f"{USER_MODULE}:NOT_A_FAMILY")
    with pytest.raises(ImportError):
        get_family("no_such_module_xyz:FAMILY")
    with pytest.raises(AttributeError):
        get_family(f"{USER_MODULE}:MISSING")


def test_unknown_name_lists_the_known_ones() -> None:
    with pytest.raises(KeyError) as err:
        get_family("no_such_family")
    msg = err.value.args[0]
    known = ", ".join(family_names())
    assert msg == f"unknown family 'no_such_family'; known families: {known}"
    assert all(name in msg for name in SHIPPED)
    with pytest.raises(tunelab.SpecError, match="no_such_family"):
        parse_spec(_seed_cull("no_such_family"))


def test_duplicate_registration_is_a_clear_error(site: Path) -> None:
    _install(site, "lab-a", {"my_family": f"{USER_MODULE}:FAMILY"})
    _install(site, "lab-b", {"my_family": "other_lab.family:FAMILY"})
    importlib.invalidate_caches()

    assert family_names().count("my_family") == 1
    with pytest.raises(FamilyConflictError) as err:
        get_family("my_family")
    msg = str(err.value)
    assert "'my_family'" in msg and FAMILY_GROUP in msg
    assert f"{USER_MODULE}:FAMILY" in msg and "other_lab.family:FAMILY" in msg
    assert "lab-a" in msg and "lab-b" in msg
    assert USER_MODULE not in sys.modules  # neither candidate was imported
    # a spec using it fails validation with the same explanation
    with pytest.raises(tunelab.SpecError, match="registered more than once"):
        parse_spec(_seed_cull("my_family"))
    # the other families are unaffected
    assert get_family("ouroboros").name == "ouroboros"


def test_identical_registrations_count_once(site: Path) -> None:
    _install(site, "lab-a", {"my_family": f"{USER_MODULE}:FAMILY"})
    _install(site, "lab-b", {"my_family": f"{USER_MODULE}:FAMILY"})
    importlib.invalidate_caches()
    assert get_family("my_family").name == "my_family"


def test_registered_object_must_be_a_family_of_that_name(site: Path) -> None:
    _install(
        site,
        "my-lab",
        {"not_a_family": f"{USER_MODULE}:NOT_A_FAMILY", "alias": f"{USER_MODULE}:FAMILY"},
    )
    importlib.invalidate_caches()
    with pytest.raises(TypeError, match=r"does not name a tunelab\.Family"):
        get_family("not_a_family")
    with pytest.raises(TypeError, match="named 'my_family'"):
        get_family("alias")


def test_no_registered_family_says_why(monkeypatch: pytest.MonkeyPatch) -> None:
    import importlib.metadata

    monkeypatch.setattr(importlib.metadata, "entry_points", lambda **kw: [])
    assert family_names() == []
    with pytest.raises(KeyError, match="known families: none") as err:
        get_family("ouroboros")
    assert "pip install -e" in err.value.args[0]
