"""An sbatch script running a whole Ray cluster in one allocation (head as a job).

For sites that forbid long-running processes on login nodes: instead of
`ray up` (head on the login node), submit the rendered script; it starts the
head on the first node of the allocation, the workers on the others, runs the
driver command and ends.
"""

from __future__ import annotations

import os
import shlex
import sys
from collections.abc import Mapping
from typing import Any

from tunelab.slurm import _auth, _stop
from tunelab.slurm._runner import export_lines, job_path
from tunelab.slurm._settings import JobSpec, ProviderSettings
from tunelab.slurm._template import render_template


def render_head_job(
    config: Mapping[str, Any],
    *,
    node_type: str,
    nodes: int,
    command: str,
    job_name: str | None = None,
) -> str:
    """Render head_job.sbatch.tmpl for `nodes` nodes of one worker type of cluster.yaml.

    Args:
        config: A loaded cluster.yaml (see load_cluster_config): the provider
            block gives ports, temp/shared dirs, env_setup and env; the node
            type's node_config gives partition, CPUs, GPUs, memory and time.
        node_type: Worker node type whose node_config every node of the job uses.
        nodes: Number of nodes (>= 1); the first one is the Ray head.
        command: Driver command run on the head once all nodes joined, with
            RAY_ADDRESS and MLFLOW_TRACKING_URI set (e.g. `platform sweep spec.yaml`),
            by `bash -c` in its own process group. The job's end-of-job warning
            (SIGTERM, provider.preempt_grace_s before the end) is forwarded to
            that group; its exit status is the job's.
        job_name: SLURM job name; default `ray-<cluster_name>:<node_type>-allocation`.

    Returns:
        The script text, ready for `sbatch`. The job log goes to
        `<state_dir>/logs/`, which is created here (SLURM does not create it).
    """
    settings = ProviderSettings.from_provider_config(config["provider"], config["cluster_name"])
    types = config.get("available_node_types") or {}
    if node_type not in types or node_type == config.get("head_node_type"):
        workers = [t for t in types if t != config.get("head_node_type")]
        raise ValueError(
            f"node_type is {node_type!r}, but must be one of the worker node types: "
            f"{', '.join(workers)}."
        )
    if isinstance(nodes, bool) or not isinstance(nodes, int) or nodes < 1:
        raise ValueError(f"nodes is {nodes!r}, but must be an integer >= 1.")
    if not command.strip():
        raise ValueError("command is empty; give the driver command, e.g. `platform sweep SPEC`.")
    node = types[node_type]
    spec = JobSpec.from_node_config(
        node_type, node.get("node_config") or {}, node.get("resources") or {}
    )
    os.makedirs(os.path.join(settings.state_dir, "logs"), exist_ok=True)
    exports = settings.exports()
    exports.pop("MLFLOW_TRACKING_URI", None)  # set below, once the head's address is known
    stop = [
        sys.executable,
        os.path.abspath(_stop.__file__),
        *("--temp-dir", settings.ray_temp_dir, "--gcs-port", str(settings.gcs_port)),
    ]
    options = spec.sbatch_options(nodes, preempt_grace_s=settings.preempt_grace_s)
    return render_template(
        "head_job.sbatch.tmpl",
        {
            "cluster_name": settings.cluster_name,
            "node_type": node_type,
            "nodes": str(nodes),
            "job_name": job_name or f"{settings.job_name_prefix}{node_type}-allocation",
            "log_path": os.path.join(settings.state_dir, "logs", "%x-%j.out"),
            "sbatch_lines": "\n".join(f"#SBATCH {o}" for o in options),
            "path": shlex.quote(job_path()),
            "exports": "\n".join(export_lines(exports)),
            "env_setup": "\n".join(settings.env_setup) or "# (provider.env_setup is empty)",
            "stop_command": " ".join(shlex.quote(a) for a in stop).replace("'", "'\\''"),
            "auth_setup": _auth_setup(settings),
            "resource_args": f"--num-cpus={spec.cpus} --num-gpus={spec.gpus}",
            "mlflow_start": _mlflow_start(settings),
            "grace": str(settings.preempt_grace_s),
            "command": shlex.quote(command),
        },
    )


def _auth_setup(settings: ProviderSettings) -> str:
    """Create the auth dir's secrets (Ray's token; MLflow's with mlflow_auth), then read MLflow's."""
    mlflow_auth = settings.mlflow_port is not None and settings.mlflow_auth
    argv = [sys.executable, os.path.abspath(_auth.__file__)]
    create = " ".join(shlex.quote(a) for a in argv) + ' "$TUNELAB_AUTH_DIR"'
    return "\n".join([create + (" --mlflow" if mlflow_auth else ""), *settings.secret_env_lines()])


def _mlflow_start(settings: ProviderSettings) -> str:
    """Start MLflow on the head's cluster address (never 0.0.0.0), with basic-auth if asked.

    --allowed-hosts: MLflow 3 answers 403 to a Host header other than localhost
    or a private IP, e.g. the node's name or public address.
    """
    if settings.mlflow_port is None:
        return "# no MLflow server (provider.mlflow_port is null)"
    app = "--app-name basic-auth " if settings.mlflow_auth else ""
    return "\n".join(
        [
            'export MLFLOW_TRACKING_URI="http://$TUNELAB_HEAD_IP:$TUNELAB_MLFLOW_PORT"',
            'mkdir -p "$TUNELAB_SHARED_DIR/mlartifacts"',
            f"nohup mlflow server {app}"
            '--backend-store-uri "sqlite:///$TUNELAB_SHARED_DIR/mlflow.db" '
            '--artifacts-destination "$TUNELAB_SHARED_DIR/mlartifacts" '
            '--host "$TUNELAB_HEAD_IP" --port "$TUNELAB_MLFLOW_PORT" '
            '--allowed-hosts "$TUNELAB_HEAD_IP:$TUNELAB_MLFLOW_PORT,localhost:*,127.0.0.1:*" '
            '> "$TUNELAB_RAY_TEMP_DIR/mlflow-server.log" 2>&1 &',
            'echo $! > "$TUNELAB_RAY_TEMP_DIR/mlflow-server.pid"',
        ]
    )
