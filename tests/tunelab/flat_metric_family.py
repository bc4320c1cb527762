"""A tiny family whose metric names have no ``group/`` prefix: ``score`` and ``aux``.

Its values are known in advance, so a test knows which seed must be selected:
``score`` is ``-(seed - 7) ** 2 + iteration / 100`` (seed 7 is best under
``mode: max``) and ``aux`` is the seed (the tie-break).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from pydantic import ConfigDict
from pydantic.dataclasses import dataclass

from tunelab import Family


@dataclass(config=ConfigDict(extra="forbid"))
class Config:
    best_seed: int = 7  # the seed whose score is highest


class Flat:
    def __init__(self, cfg: Config, seed: int) -> None:
        self.cfg, self.seed, self.it = cfg, seed, 0

    def train_iteration(self) -> dict[str, float]:
        self.it += 1
        return {
            "score": -float((self.seed - self.cfg.best_seed) ** 2) + self.it / 100,
            "aux": self.seed,
        }

    def state_dict(self) -> dict[str, Any]:
        return {"it": self.it}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.it = int(state["it"])

    def export(self, out_dir: Path) -> dict[str, Any]:
        out_dir.mkdir(parents=True, exist_ok=True)
        (out_dir / "flat.json").write_text(json.dumps({"seed": self.seed, "it": self.it}))
        return {"test/score": -float((self.seed - self.cfg.best_seed) ** 2)}


def build(cfg: Config, seed: int, data_root: Path) -> Flat:
    return Flat(cfg, seed)


FAMILY = Family(name="flat", config_cls=Config, build=build, metrics=("score", "aux"))
