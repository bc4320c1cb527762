"""The base of tunelab's driver-side Tune callbacks."""

from __future__ import annotations

from typing import Any

from ray.tune import Callback

__all__ = ["DriverCallback"]


class DriverCallback(Callback):
    """A Tune callback whose ``_private`` attributes are runtime state.

    ``Tuner`` pickles its callbacks into the experiment (``tuner.pkl``) and
    ``Tuner.restore`` unpickles them: only the public configuration travels;
    the runtime state (clients, threads, timers) is rebuilt by
    :meth:`_init_runtime` in the restored driver.
    """

    def _init_runtime(self) -> None:
        """Create the runtime state; called at construction and after unpickling."""

    def __getstate__(self) -> dict[str, Any]:
        return {k: v for k, v in self.__dict__.items() if not k.startswith("_")}

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__dict__.update(state)
        self._init_runtime()
