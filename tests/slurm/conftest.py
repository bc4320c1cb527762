"""A real single-node SLURM for the tests of tunelab.slurm (shared/SLURM.md).

The session fixture `slurm` runs scripts/start_slurm.sh into a temporary folder,
points SLURM_CONF at it and stops it at the end. `ci_site` turns the repository's
cluster.yaml into a CI variant (unique cluster name, ports and folders,
partition debug, no GPUs, one CPU per node) by replacing values of its site
block only, so the tests exercise the shipped file, not a copy.
"""

from __future__ import annotations

import os
import secrets
import shutil
import socket
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

REPO = Path(__file__).resolve().parents[2]
CLUSTER_YAML = REPO / "cluster.yaml"
VENV_BIN = str(Path(sys.executable).parent)


def _skip_reason() -> str | None:
    if sys.platform != "linux":
        return "SLURM tests need Linux"
    if os.geteuid() != 0:
        return "SLURM tests need root (scripts/start_slurm.sh starts slurmd and munged)"
    if shutil.which("slurmctld") is None and shutil.which("apt-get") is None:
        return "SLURM is not installed and apt-get is unavailable to install it"
    return None


@pytest.fixture(scope="session")
def slurm(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Path]:
    """A running single-node SLURM; yields its folder, SLURM_CONF is set meanwhile."""
    reason = _skip_reason()
    if reason:
        pytest.skip(reason)
    folder = tmp_path_factory.mktemp("slurm")
    old_conf = os.environ.get("SLURM_CONF")
    try:
        proc = subprocess.run(
            [str(REPO / "scripts" / "start_slurm.sh"), str(folder)],
            capture_output=True,
            text=True,
            timeout=300,
            check=False,
        )
        if proc.returncode != 0:
            logs = "\n".join(p.read_text()[-2000:] for p in (folder / "log").glob("*.log"))
            pytest.fail(f"start_slurm.sh failed ({proc.returncode}):\n{proc.stderr}\n{logs}")
        os.environ["SLURM_CONF"] = str(folder / "slurm.conf")
        yield folder
    finally:
        subprocess.run(
            [str(REPO / "scripts" / "stop_slurm.sh"), str(folder)],
            check=False,
            capture_output=True,
            timeout=60,
        )
        if old_conf is None:
            os.environ.pop("SLURM_CONF", None)
        else:
            os.environ["SLURM_CONF"] = old_conf


def free_port() -> int:
    """A TCP port nobody listens on now (the kernel's ephemeral range: outside Ray's 10002-19999)."""
    with socket.socket() as s:
        s.bind(("", 0))
        return int(s.getsockname()[1])


def ci_site(base: Path, *, min_workers: int = 1) -> dict[str, Any]:
    """Site-block values of the CI cluster: names, ports and folders unique to this run.

    Args:
        base: A fresh folder for the state dir and the shared dir.
        min_workers: Workers of type a100x1 kept at all times (a100x4 keeps none).
    """
    tag = secrets.token_hex(3)
    return {
        "cluster_name": f"tlci-{tag}",
        "account": None,
        "qos": None,
        "partition_a100x4": "debug",
        "partition_a100x1": "debug",
        "gpu_type": None,
        "a100x4_cpus": 1,
        "a100x4_gpus": 0,
        "a100x4_mem": None,
        "a100x1_cpus": 1,
        "a100x1_gpus": 0,
        "a100x1_mem": None,
        "time_limit": "00:15:00",
        # Short: a preempted worker (scancel --batch --signal=TERM) drains for 2 s only.
        "preempt_grace_s": 5,
        "a100x4_sbatch_extra": [],
        "a100x1_sbatch_extra": [],
        "a100x4_min_workers": 0,
        "a100x4_max_workers": 1,
        "a100x1_min_workers": min_workers,
        "a100x1_max_workers": 2,
        "max_workers": 2,
        "idle_timeout_minutes": 5,
        "head_ip": "",
        "head_num_cpus": 1,
        "gcs_port": free_port(),
        "dashboard_port": free_port(),
        "client_port": free_port(),
        "mlflow_port": free_port(),
        # Short: Ray's socket paths live below it.
        "ray_temp_dir": f"/tmp/tlci-{tag}",
        "state_dir": str(base / "state"),
        "shared_dir": str(base / "shared"),
        "env_setup": [],
        "env": {
            "TUNELAB_REPO_DIR": str(REPO),
            "RAY_AUTH_MODE": "disabled",
            "RAY_USAGE_STATS_ENABLED": "0",
            "MLFLOW_WORKERS": "1",
        },
        # The CI machine already has tunelab installed (editable): check, do not pip
        # (find_spec does not import tunelab, which would import torch: seconds).
        "setup_commands": [
            "python -c 'import importlib.util as u, sys; sys.exit(u.find_spec(\"tunelab\") is None)'"
        ],
    }
