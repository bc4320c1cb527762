"""Command runners of the SLURM provider: no SSH anywhere.

The head is the machine that runs `ray up` (a login node), so its commands run
locally through `bash -c`. A worker is a SLURM job; a command on it runs as a
job step (`srun --jobid=ID --overlap`). Both export the cluster's variables
(ProviderSettings.exports) and run the site's env_setup lines first, and both
define a shell function `ray` that turns `ray stop` (which Ray runs in
`ray down`, and which cluster.yaml's head commands call) into a stop of this
cluster's processes only.
"""

from __future__ import annotations

import os
import shlex
import shutil
import subprocess
import sys
from types import ModuleType
from typing import Any

import click
from ray.autoscaler._private.command_runner import _with_environment_variables
from ray.autoscaler._private.subprocess_output_util import ProcessRunnerError
from ray.autoscaler.command_runner import CommandRunnerInterface

from tunelab.slurm import _stop
from tunelab.slurm._settings import ProviderSettings

BOOTSTRAP_CONFIG = "~/ray_bootstrap_config.yaml"
# Appended by `ray exec --stop`; never shut a login node down.
_SHUTDOWN_SUFFIX = "; sudo shutdown -h now"


class LocalCommandRunner(CommandRunnerInterface):
    """Runs the head's commands on this machine (`bash -c` through `process_runner`).

    `~/ray_bootstrap_config.yaml` is redirected to the cluster's state dir so two
    clusters of one user on one login node do not overwrite each other's copy.
    """

    def __init__(self, settings: ProviderSettings, process_runner: ModuleType = subprocess) -> None:
        self.settings = settings
        self.process_runner = process_runner

    def run(
        self,
        cmd: str | None = None,
        timeout: int = 120,
        exit_on_fail: bool = False,
        port_forward: Any = None,
        with_output: bool = False,
        environment_variables: dict[str, object] | None = None,
        run_env: str = "auto",
        ssh_options_override_ssh_key: str = "",
        shutdown_after_run: bool = False,
        silent: bool = False,
    ) -> Any:
        """Run `cmd` in bash; `timeout`, `port_forward` and `shutdown_after_run` do not apply."""
        script = _script(self.settings, cmd or "exec bash -l", environment_variables)
        return _call(self.process_runner, ["bash", "-c", script], cmd, with_output, exit_on_fail)

    def run_rsync_up(self, source: str, target: str, options: dict[str, Any] | None = None) -> None:
        """Copy a local path to a local path (rsync if installed, else cp)."""
        _copy(source, _redirect(self.settings, target), options or {})

    def run_rsync_down(
        self, source: str, target: str, options: dict[str, Any] | None = None
    ) -> None:
        """Copy a local path to a local path (rsync if installed, else cp)."""
        _copy(_redirect(self.settings, source), target, options or {})

    def remote_shell_command_str(self) -> str:
        """The head is this machine: a shell is just a shell."""
        return "bash -l\n"


class SrunCommandRunner(CommandRunnerInterface):
    """Runs commands inside a worker job's allocation as a job step.

    Only `run` is supported: workers see the head's files through the shared
    filesystem, so there is nothing to rsync.
    """

    def __init__(
        self, settings: ProviderSettings, job_id: str, process_runner: ModuleType = subprocess
    ) -> None:
        self.settings = settings
        self.job_id = job_id
        self.process_runner = process_runner

    def run(
        self,
        cmd: str | None = None,
        timeout: int = 120,
        exit_on_fail: bool = False,
        port_forward: Any = None,
        with_output: bool = False,
        environment_variables: dict[str, object] | None = None,
        run_env: str = "auto",
        ssh_options_override_ssh_key: str = "",
        shutdown_after_run: bool = False,
        silent: bool = False,
    ) -> Any:
        """Run `cmd` in bash as a step of the worker's job."""
        script = _script(self.settings, cmd or "exec bash -l", environment_variables)
        argv = ["srun", f"--jobid={self.job_id}", "--overlap", "--ntasks=1", "--nodes=1"]
        if cmd is None:
            argv.append("--pty")
        return _call(
            self.process_runner, [*argv, "bash", "-c", script], cmd, with_output, exit_on_fail
        )

    def run_rsync_up(self, source: str, target: str, options: dict[str, Any] | None = None) -> None:
        """Not supported: put files on the shared filesystem instead."""
        raise NotImplementedError(
            "file mounts to SLURM workers are not supported; put the files under "
            "provider.shared_dir, which every worker sees."
        )

    def run_rsync_down(
        self, source: str, target: str, options: dict[str, Any] | None = None
    ) -> None:
        """Not supported: workers write to the shared filesystem."""
        raise NotImplementedError(
            "copying from SLURM workers is not supported; read the files from provider.shared_dir."
        )

    def remote_shell_command_str(self) -> str:
        """A shell inside the worker's allocation."""
        return f"srun --jobid={self.job_id} --overlap --pty bash -l\n"


def scoped_ray_function(settings: ProviderSettings) -> str:
    """Bash definition of `ray` whose `stop` stops only this cluster."""
    stop = " ".join(
        shlex.quote(a)
        for a in (
            sys.executable,
            os.path.abspath(_stop.__file__),
            "--temp-dir",
            settings.ray_temp_dir,
            "--gcs-port",
            str(settings.gcs_port),
        )
    )
    return (
        'ray() { if [ "${1-}" = stop ]; then shift; '
        + stop
        + ' "$@"; else command ray "$@"; fi; }; export -f ray'
    )


def job_path() -> str:
    """PATH for batch jobs: this Python's bin folder first, then the current PATH, no repeats."""
    parts = [os.path.dirname(sys.executable), *os.environ.get("PATH", "").split(os.pathsep)]
    return os.pathsep.join(dict.fromkeys(p for p in parts if p))


def export_lines(variables: dict[str, str]) -> list[str]:
    """`export NAME='value'` lines, safely quoted."""
    return [f"export {name}={shlex.quote(value)}" for name, value in variables.items()]


# ---------------------------------------------------------------------------
# private helpers
# ---------------------------------------------------------------------------


def _script(
    settings: ProviderSettings, cmd: str, environment_variables: dict[str, object] | None
) -> str:
    cmd = cmd.replace(_SHUTDOWN_SUFFIX, "").replace(
        BOOTSTRAP_CONFIG, shlex.quote(settings.bootstrap_config_path)
    )
    if environment_variables:
        cmd = _with_environment_variables(cmd, environment_variables)
    lines = [
        scoped_ray_function(settings),
        *export_lines(settings.exports()),
        *settings.secret_env_lines(),
    ]
    if settings.env_setup:
        lines += ["set -e", *settings.env_setup, "set +e"]
    return "\n".join([*lines, cmd])


def _call(
    runner: ModuleType, argv: list[str], cmd: str | None, with_output: bool, exit_on_fail: bool
) -> Any:
    try:
        if with_output:
            return runner.check_output(argv)
        runner.check_call(argv)
        return ""
    except subprocess.CalledProcessError as e:
        if exit_on_fail:
            raise click.ClickException(
                f"Command failed (exit {e.returncode}):\n\n  {cmd}\n"
            ) from None
        raise ProcessRunnerError(
            "Command failed", "ssh_command_failed", code=e.returncode, command=cmd
        ) from None
    finally:
        sys.stdout.flush()
        sys.stderr.flush()


def _redirect(settings: ProviderSettings, path: str) -> str:
    if path == BOOTSTRAP_CONFIG:
        return settings.bootstrap_config_path
    return os.path.expanduser(path)


def _copy(source: str, target: str, options: dict[str, Any]) -> None:
    source = os.path.expanduser(source)
    if os.path.realpath(source.rstrip("/") or "/") == os.path.realpath(target.rstrip("/") or "/"):
        return  # same path on the same machine: nothing to copy
    os.makedirs(os.path.dirname(target.rstrip("/")) or ".", exist_ok=True)
    if shutil.which("rsync"):
        argv = ["rsync", "-a"]
        for pattern in options.get("rsync_exclude") or []:
            argv += ["--exclude", pattern]
        for rule in options.get("rsync_filter") or []:
            argv += ["--filter", f"dir-merge,- {rule}"]
        subprocess.check_call([*argv, source, target])
    elif os.path.isdir(source):
        shutil.copytree(source, target, dirs_exist_ok=True, symlinks=True)
    else:
        shutil.copy2(source, target)
