"""A tiny real family for the core's tests: an MLP regressing a noisy sine.

Fast (milliseconds per iteration) so the runner, schedulers, tracking and
resume can be tested end to end through real Ray and MLflow.
"""

from __future__ import annotations

import errno
import json
import math
import os
import signal
from pathlib import Path
from typing import Any

import numpy as np
import torch
from pydantic import ConfigDict
from pydantic.dataclasses import dataclass

from tunelab import Family
from tunelab.devices import rank, shard
from tunelab.health import HealthMonitor
from tunelab.names import HEALTH_METRICS


@dataclass(config=ConfigDict(extra="forbid"))
class Config:
    hidden: int = 16  # MLP width
    lr: float = 1e-2  # Adam learning rate
    steps_per_iter: int = 5  # optimizer steps per iteration
    noise: float = 0.1  # label noise std
    fail_at: int = 0  # raise at this iteration (0 = never), to test failures
    nan_at: int = 0  # report NaN val/score from this iteration on (0 = never)
    nan_seed: int = -1  # with nan_at / nan_loss_at: only this seed diverges (-1 = every seed)
    nan_loss_at: int = 0  # the "aux" loss term is NaN from this iteration on (0 = never)
    crash_once_at: int = 0  # crash once at this iteration (a worker crash Tune retries; 0 = never)
    crash_seed: int = -1  # with crash_once_at: only this seed crashes (-1 = every seed)
    kill_rank: int = -1  # with crash_once_at: that worker's process is SIGKILLed (-1 = raise)
    build_error: str = ""  # building raises ValueError(build_error) (a deterministic setup error)
    export_error: str = ""  # the driver's export of the selected seed raises RuntimeError(this)
    ballast_kb: int = 0  # extra KiB in every checkpoint (fills a small disk)
    disk_full_once_at: int = 0  # this iteration's checkpoint hits ENOSPC once (0 = never)


class Toy:
    def __init__(self, cfg: Config, seed: int, data_root: Path | None = None) -> None:
        self.cfg = cfg
        self.seed = seed
        self.data_root = data_root
        self.net = torch.nn.Sequential(
            torch.nn.Linear(1, cfg.hidden), torch.nn.Tanh(), torch.nn.Linear(cfg.hidden, 1)
        )
        self.opt = torch.optim.Adam(self.net.parameters(), lr=cfg.lr)
        self.health = HealthMonitor(self.net, self.opt)
        self.it = 0
        g = torch.Generator().manual_seed(1234)
        self.xv = torch.rand(64, 1, generator=g) * 6 - 3
        self.yv = torch.sin(self.xv)

    def train_iteration(self) -> dict[str, float]:
        self.it += 1
        if self.cfg.fail_at and self.it == self.cfg.fail_at:
            raise RuntimeError("toy failure")
        if self._crashes_now():
            if self.cfg.kill_rank >= 0:  # the worker process dies (SIGKILL), not the code
                os.kill(os.getpid(), signal.SIGKILL)
            raise RuntimeError("toy worker crash (once)")
        for _ in range(self.cfg.steps_per_iter):
            x = torch.rand(32, 1) * 6 - 3  # global RNG: restored by tunelab
            y = torch.sin(x) + self.cfg.noise * torch.randn(32, 1)
            x, y = shard(x), shard(y)  # this worker's slice of the global batch
            loss = torch.mean((self.net(x) - y) ** 2)
            self.health.step({"mse": loss, "aux": self._aux(loss)})
        with torch.no_grad():
            val = float(torch.mean((self.net(self.xv) - self.yv) ** 2))
        diverged = self.cfg.nan_at and self.it >= self.cfg.nan_at
        diverged = diverged and self.cfg.nan_seed in (-1, self.seed)
        score = math.nan if diverged else -val
        return {
            **self.health.end_iteration(),
            "train/loss": float(loss.detach()),
            "val/mse": val,
            "val/log_mse": math.log(val),
            "val/score": score,
            "val/aux": float(np.float32(self.it)),
        }

    def _aux(self, loss: torch.Tensor) -> torch.Tensor:
        """A zero loss term; NaN from ``nan_loss_at`` on (for ``nan_seed``)."""
        cfg = self.cfg
        bad = cfg.nan_loss_at and self.it >= cfg.nan_loss_at and cfg.nan_seed in (-1, self.seed)
        return loss * (math.nan if bad else 0.0)

    def _crashes_now(self) -> bool:
        """True the first time this seed reaches ``crash_once_at`` (a marker file remembers it)."""
        cfg = self.cfg
        if not cfg.crash_once_at or self.it != cfg.crash_once_at or self.data_root is None:
            return False
        if cfg.crash_seed not in (-1, self.seed):
            return False
        if cfg.kill_rank >= 0 and cfg.kill_rank != rank():
            return False
        marker = Path(self.data_root) / f"toy-crashed-seed{self.seed}"
        if marker.exists():
            return False
        marker.parent.mkdir(parents=True, exist_ok=True)
        marker.touch()
        return True

    def state_dict(self) -> dict[str, Any]:
        if self._disk_full_now():
            raise OSError(errno.ENOSPC, "No space left on device", str(self.data_root))
        state = {"net": self.net.state_dict(), "opt": self.opt.state_dict(), "it": self.it}
        if self.cfg.ballast_kb:
            state["ballast"] = torch.zeros(self.cfg.ballast_kb * 256)
        return state

    def _disk_full_now(self) -> bool:
        """True the first time the checkpoint of ``disk_full_once_at`` is saved (a marker file)."""
        if not self.cfg.disk_full_once_at or self.it != self.cfg.disk_full_once_at:
            return False
        marker = Path(self.data_root or ".") / f"toy-disk-full-seed{self.seed}"
        if marker.exists():
            return False
        marker.parent.mkdir(parents=True, exist_ok=True)
        marker.touch()
        return True

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.net.load_state_dict(state["net"])
        self.opt.load_state_dict(state["opt"])
        self.it = state["it"]

    def export(self, out_dir: Path) -> dict[str, Any]:
        if self.cfg.export_error and out_dir.name == "selected":  # not the trials' own export
            raise RuntimeError(self.cfg.export_error)
        out_dir.mkdir(parents=True, exist_ok=True)
        with torch.no_grad():
            val = float(torch.mean((self.net(self.xv) - self.yv) ** 2))
        (out_dir / "prediction.json").write_text(json.dumps({"val_mse": val}))
        return {"test/mse": val, "sample_rate": 1}


def build(cfg: Config, seed: int, data_root: Path) -> Toy:
    if cfg.build_error:
        if data_root is not None:  # count the attempts: one line per build
            data_root.mkdir(parents=True, exist_ok=True)
            with open(data_root / f"toy-builds-seed{seed}", "a") as f:
                f.write("build\n")
        raise ValueError(cfg.build_error)
    return Toy(cfg, seed, data_root)


FAMILY = Family(
    name="toy",
    config_cls=Config,
    build=build,
    metrics=("train/loss", "val/mse", "val/log_mse", "val/score", "val/aux", *HEALTH_METRICS),
)
