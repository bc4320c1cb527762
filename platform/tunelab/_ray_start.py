"""Ray start-up and the driver's stop signals.

:func:`init_ray` connects to a Ray cluster or starts a local Ray (token
authentication, the dashboard, the metrics export port).
:class:`StopSignals` turns SIGINT and SIGTERM into Tune's graceful stop (or
a preemption) while the driver runs; :func:`ray_keeps_sigterm` keeps that
handler through ``ray.init`` and :func:`stdout_to_stderr` keeps stdout clean
for ``--json``. Used by :mod:`tunelab._driver`; ``init_ray`` is public as
:func:`tunelab.init_ray`.
"""

from __future__ import annotations

import contextlib
import os
import sys
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from tunelab import _preemption as preemption
from tunelab.errors import ExperimentInterrupted
from tunelab.layout import ExperimentLayout

__all__ = [
    "DASHBOARD_PORT",
    "StopSignals",
    "init_ray",
    "ray_keeps_sigterm",
    "stdout_to_stderr",
    "stop_requested",
]

_stop_requested = threading.Event()  # set by a stop signal while this driver runs


def init_ray(address: str | None, *, dashboard: bool | None = None) -> str | None:
    """Connect to ``address`` (or ``$RAY_ADDRESS``), else start a local Ray with one CPU per core.

    The local Ray starts the Ray dashboard on 127.0.0.1, port 8265 or the
    next free one, unless ``dashboard`` is False (None: unless
    ``$TUNELAB_NO_DASHBOARD`` is 1). Ray's state API, which frees the workers of a culled multi-worker
    trial, needs it. Ray Train's controller polls its workers every
    ``$RAY_TRAIN_HEALTH_CHECK_INTERVAL_S`` (0.5 s here unless set; each
    report waits for a poll).

    Returns:
        The dashboard's URL, or None (no dashboard, or a cluster's own).

    Ray's token authentication is on unless ``RAY_AUTH_MODE=disabled``. The
    local Ray listens on 127.0.0.1 only; its token file (``$RAY_AUTH_TOKEN_PATH``,
    default ``~/.ray/auth_token``) is created user-only (0600) where Ray would
    create it readable by everyone. A driver connecting to ``address`` sends a
    token when one is available (Ray itself does so only for ``address="auto"``).

    ``TUNELAB_METRICS_EXPORT_PORT`` serves Ray's and tunelab's metrics to
    Prometheus from the local Ray (dashboards/README.md).
    """
    import secrets

    import ray
    from ray._private import ray_constants
    from ray._private.authentication.authentication_token_setup import (
        maybe_enable_token_auth_if_token_available,
    )
    from ray._raylet import Config  # type: ignore[attr-defined]

    if ray.is_initialized():
        return None
    address = address or os.environ.get("RAY_ADDRESS")
    if address:
        maybe_enable_token_auth_if_token_available(warn_if_disabled=False)
        ray.init(address=address, log_to_driver=False)
        return None
    if "RAY_AUTH_MODE" not in os.environ:  # Ray's own default, set here without its warning
        os.environ["RAY_AUTH_MODE"] = "token"
        Config.initialize("")
    if os.environ["RAY_AUTH_MODE"].lower() == "token" and not os.environ.get("RAY_AUTH_TOKEN"):
        token = Path(os.environ.get("RAY_AUTH_TOKEN_PATH") or Path.home() / ".ray" / "auth_token")
        token.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
        flags = os.O_WRONLY | os.O_CREAT | os.O_EXCL
        with contextlib.suppress(FileExistsError), open(os.open(token, flags, 0o600), "w") as f:
            f.write(secrets.token_hex(32))
        if token.stat().st_mode & 0o077 and token.stat().st_uid == os.getuid():
            token.chmod(0o600)
    port = os.environ.get("TUNELAB_METRICS_EXPORT_PORT")
    extra: dict[str, Any] = {"_metrics_export_port": int(port)} if port else {}
    if dashboard is None:
        dashboard = os.environ.get("TUNELAB_NO_DASHBOARD", "") not in ("1", "true")
    if dashboard:
        extra.update(dashboard_host="127.0.0.1", dashboard_port=_free_port(DASHBOARD_PORT))
    os.environ.setdefault("RAY_TRAIN_HEALTH_CHECK_INTERVAL_S", "0.5")
    # Ray binds its servers to 127.0.0.1 when that is the node's address, which it
    # picks only where it does not expect a multi-node cluster (ENABLE_RAY_CLUSTER).
    on_network, ray_constants.ENABLE_RAY_CLUSTER = ray_constants.ENABLE_RAY_CLUSTER, False
    try:
        context = ray.init(
            num_cpus=os.cpu_count() or 1, log_to_driver=False, include_dashboard=dashboard, **extra
        )
    finally:
        ray_constants.ENABLE_RAY_CLUSTER = on_network
    url = getattr(context, "dashboard_url", None) if dashboard else None
    return f"http://{url}" if url and "://" not in url else url or None


def stop_requested() -> bool:
    """Whether a stop signal reached this driver since its :class:`StopSignals` was entered.

    Tune callbacks run in the driver and ask it: once the driver is stopping,
    the statuses Tune gives trials during its stop say nothing about them (a
    trial stopped mid-run ends TERMINATED, like a culled one).
    """
    return _stop_requested.is_set()


#: The Ray dashboard's usual port; the next free one is taken when it is in use.
DASHBOARD_PORT = 8265


class StopSignals:
    """SIGINT and SIGTERM (Ctrl-C, ``scancel``, SLURM preemption) stop the driver the same way.

    The handler never raises: an exception thrown from a signal handler lands
    wherever the main thread happens to be, and Python drops it silently inside
    fork hooks, finalizers and logging. It only records the signal. Before Tune
    runs, the driver checks the record between phases (Ray start-up, building
    the tuner) and raises :class:`ExperimentInterrupted`. While Tune runs, the
    signal becomes Tune's graceful stop (SIGUSR1: the experiment state is saved
    one last time and ``fit`` returns); a signal that arrives before Tune has
    installed its handler is forwarded as soon as it has. Either way the
    experiment is not finalized and ``platform resume`` continues it. Once
    every trial has ended, a signal no longer interrupts: the few seconds of
    post-processing finish, so a decision is never half written. Tune's own
    SIGINT handler is switched off (``TUNE_DISABLE_SIGINT_HANDLER``) so that
    both signals take this path.
    """

    _SIGNALS = ("SIGINT", "SIGTERM")

    def __init__(self, layout: ExperimentLayout) -> None:
        self.layout = layout
        self.experiment_dir = layout.root
        self.signalled = False
        self.tune_running = False
        self.finalizing = False
        self._forwarded = False
        self._lock = threading.Lock()
        self._previous: dict[int, Any] = {}

    def __enter__(self) -> StopSignals:
        import signal

        _stop_requested.clear()
        if threading.current_thread() is threading.main_thread():
            os.environ["TUNE_DISABLE_SIGINT_HANDLER"] = "1"
            for name in self._SIGNALS:
                sig = getattr(signal, name)
                self._previous[sig] = signal.signal(sig, self._on_signal)
        return self

    def __exit__(self, *exc: object) -> None:
        import signal

        self.tune_running = False
        for sig, previous in self._previous.items():
            signal.signal(sig, previous)

    def reinstall(self) -> None:
        """Put tunelab's handlers back after ``ray.init``.

        Ray's core worker installs a C-level failure handler for SIGTERM (it
        prints "SIGTERM received" and aborts at exit) that Python's
        ``signal.getsignal`` cannot see; ``signal.signal`` replaces it.
        """
        import signal

        for sig in self._previous:
            signal.signal(sig, self._on_signal)

    def raise_if_signalled(self) -> None:
        """Raise :class:`ExperimentInterrupted` if a stop signal arrived (before Tune runs)."""
        if self.signalled:
            raise ExperimentInterrupted(self.experiment_dir, -1)

    def start_tune(self) -> None:
        """Mark Tune as running; from now on a signal becomes Tune's graceful stop."""
        import signal

        if self._previous and hasattr(signal, "SIGUSR1"):
            # A Tune run earlier in this process leaves its SIGUSR1 handler behind
            # (Tune never restores it); ignored until this run's Tune installs its own.
            signal.signal(signal.SIGUSR1, signal.SIG_IGN)
        self.tune_running = True

    def _tune_handler_installed(self) -> bool:
        import signal

        handler = signal.getsignal(signal.SIGUSR1) if hasattr(signal, "SIGUSR1") else None
        return handler not in (signal.SIG_DFL, signal.SIG_IGN, None)

    def _forward_to_tune(self) -> None:
        """Send Tune its stop signal once it listens (polled; Tune installs it within seconds)."""
        import signal
        import time

        while self.tune_running and not self._tune_handler_installed():
            time.sleep(0.05)
        with self._lock:
            if not self.tune_running or self._forwarded:
                return
            self._forwarded = True
        os.kill(os.getpid(), signal.SIGUSR1)

    def _on_signal(self, sig: int, frame: Any) -> None:
        import signal

        first = not self.signalled
        self.signalled = True
        _stop_requested.set()
        if self.finalizing or not self.tune_running:
            return
        if not first and preemption.active() is None:
            return
        grace = preemption.grace_s()
        if first and sig == signal.SIGTERM and grace > 0:
            # preemption: running trials checkpoint their current iteration first
            preemption.Preemption(self.layout.preempt_file, grace, self._forward_to_tune).start()
            return
        if self._tune_handler_installed():
            self._forward_to_tune()
        else:
            threading.Thread(target=self._forward_to_tune, name="tunelab-stop", daemon=True).start()


@contextlib.contextmanager
def ray_keeps_sigterm() -> Iterator[None]:
    """Keep tunelab's SIGTERM handler while ``ray.init`` runs.

    ``ray.init`` installs a SIGTERM handler that calls ``sys.exit`` wherever the
    signal lands; inside a fork hook Python drops that exception, and the stop
    is lost. Ray installs it through ``ray._private.utils.set_sigterm_handler``
    (Ray 2.x), which is skipped here; :meth:`StopSignals.reinstall` puts
    tunelab's back right after start-up whatever Ray installed.
    (``ray.init`` cannot run in a helper thread instead: Ray's daemons are
    started with ``PR_SET_PDEATHSIG`` and die with the thread that started them.)
    """
    import ray._private.utils as ray_utils

    original = getattr(ray_utils, "set_sigterm_handler", None)
    if original is None:
        yield
        return
    ray_utils.set_sigterm_handler = lambda handler: None
    try:
        yield
    finally:
        ray_utils.set_sigterm_handler = original


@contextlib.contextmanager
def stdout_to_stderr() -> Iterator[None]:
    """Keep stdout clean for ``--json``: anything Ray/Tune prints goes to stderr."""
    with contextlib.redirect_stdout(sys.stderr):
        yield


def _free_port(first: int, tries: int = 100) -> int:
    """``first`` or the next port after it that 127.0.0.1 can bind."""
    import socket

    for port in range(first, first + tries):
        with socket.socket() as s:
            try:
                s.bind(("127.0.0.1", port))
            except OSError:
                continue
            return port
    return 0
