"""The toy family that also reports ``health/nan_skipped`` (one skipped step every other iteration).

Lets the Prometheus test see tunelab's NaN-skipped counter move without a
family that really diverges.
"""

from __future__ import annotations

from pathlib import Path

from tests.tunelab.toy_family import Config, Toy
from tunelab import Family

M_NAN_SKIPPED = "health/nan_skipped"


class NanToy(Toy):
    def train_iteration(self) -> dict[str, float]:
        metrics = super().train_iteration()
        metrics[M_NAN_SKIPPED] = float(self.it % 2)  # 1 on odd iterations
        return metrics


def build(cfg: Config, seed: int, data_root: Path) -> NanToy:
    return NanToy(cfg, seed)


FAMILY = Family(
    name="nan_toy",
    config_cls=Config,
    build=build,
    metrics=("train/loss", "val/mse", "val/log_mse", "val/score", "val/aux", M_NAN_SKIPPED),
)
