"""The toy family that also reports ``health/nan_skipped`` (one skipped step every other
iteration) and ``health/explosions`` (one, at iteration 2).

Lets the Prometheus test see tunelab's NaN-skipped and explosion counters move
without a family that really explodes; a trial that really diverges (the toy's
``nan_loss_at``) moves the diverged-trials counter.
"""

from __future__ import annotations

from pathlib import Path

from tests.tunelab.toy_family import Config, Toy
from tunelab import Family
from tunelab.names import HEALTH_METRICS

M_NAN_SKIPPED = "health/nan_skipped"
M_EXPLOSIONS = "health/explosions"


class NanToy(Toy):
    def train_iteration(self) -> dict[str, float]:
        metrics = super().train_iteration()
        metrics[M_NAN_SKIPPED] = float(self.it % 2)  # 1 on odd iterations
        metrics[M_EXPLOSIONS] = float(self.it == 2)
        return metrics


def build(cfg: Config, seed: int, data_root: Path) -> NanToy:
    return NanToy(cfg, seed, data_root)


FAMILY = Family(
    name="nan_toy",
    config_cls=Config,
    build=build,
    metrics=("train/loss", "val/mse", "val/log_mse", "val/score", "val/aux", *HEALTH_METRICS),
)
