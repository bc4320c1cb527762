"""Ray cluster launcher provider whose worker nodes are SLURM jobs.

`ray up cluster.yaml` with

    provider:
      type: external
      module: tunelab.slurm.SlurmNodeProvider

keeps the Ray head on the machine that runs `ray up` (a login node) and makes
every worker an sbatch job running `ray start --address=HEAD:PORT --block`.
Ray's autoscaler (v2, on the head) calls this provider to submit, list and
cancel those jobs; it matches each Ray node to its job through
RAY_CLOUD_INSTANCE_ID=$SLURM_JOB_ID. Nothing uses SSH. See cluster.yaml for
every key and shared/SLURM.md for the traps this design avoids.

Preemption: a worker job asks SLURM for SIGTERM `preempt_grace_s` seconds
before its end and then drains its Ray node as preempted, so Tune retries the
node's trials elsewhere without counting a failure (worker_job.sbatch.tmpl).
"""

from __future__ import annotations

import copy
import dataclasses
import json
import os
import shlex
import socket
import subprocess
import threading
import time
from collections.abc import Mapping
from types import ModuleType
from typing import Any

from ray.autoscaler.command_runner import CommandRunnerInterface
from ray.autoscaler.node_provider import NodeProvider
from ray.autoscaler.tags import (
    NODE_KIND_HEAD,
    NODE_KIND_WORKER,
    STATUS_UP_TO_DATE,
    TAG_RAY_NODE_KIND,
    TAG_RAY_NODE_NAME,
    TAG_RAY_NODE_STATUS,
    TAG_RAY_USER_NODE_TYPE,
)

from tunelab.slurm._runner import LocalCommandRunner, SrunCommandRunner, export_lines, job_path
from tunelab.slurm._settings import JobSpec, ProviderSettings, worker_job_specs
from tunelab.slurm._state import StateFile
from tunelab.slurm._stop import stop_cluster_processes
from tunelab.slurm._template import render_template

# squeue states in which a job still is (or will be) a node.
_PENDING_STATES = frozenset(
    {"PENDING", "CONFIGURING", "REQUEUED", "REQUEUE_HOLD", "REQUEUE_FED", "RESIZING", "SUSPENDED"}
)
_RUNNING_STATES = frozenset({"RUNNING"})
# A job that left squeue this long ago is forgotten (its tags are dropped).
_FORGET_AFTER_S = 60.0
# Minimum seconds between two squeue calls caused by lookups of unknown ids.
_REFRESH_S = 1.0
# Ray resources that have their own `ray start` flag.
_FLAG_RESOURCES = {"CPU": "--num-cpus", "GPU": "--num-gpus", "memory": "--memory"}


class SlurmNodeProvider(NodeProvider):
    """Ray NodeProvider: head = this machine, workers = sbatch jobs.

    Node ids: the head is `<cluster_name>-head`; a worker is its SLURM job id.
    Jobs of this cluster are the user's jobs named `ray-<cluster_name>:<type>`.
    Tags live in `<state_dir>/nodes.json` under an fcntl lock, shared by the
    `ray up`/`ray down` process and the autoscaler on the head.

    Args:
        provider_config: cluster.yaml's `provider:` block (validated by
            ProviderSettings: keys head_ip, gcs_port, dashboard_port,
            client_port, mlflow_port, ray_temp_dir, shared_dir, state_dir,
            env_setup, env, preempt_grace_s).
        cluster_name: cluster.yaml's `cluster_name`.
    """

    def __init__(self, provider_config: dict[str, Any], cluster_name: str) -> None:
        super().__init__(provider_config, cluster_name)
        self.settings = ProviderSettings.from_provider_config(provider_config, cluster_name)
        self._state = StateFile(self.settings.state_dir)
        self._lock = threading.RLock()
        self._jobs: dict[str, _Job] = {}
        self._jobs_time = 0.0
        self._hosts: dict[str, str] = {}

    # -- config --------------------------------------------------------------

    @staticmethod
    def bootstrap_config(cluster_config: dict[str, Any]) -> dict[str, Any]:
        """Validate the whole cluster config before anything starts; pin head_ip and paths.

        Ray calls this in `ray up`/`ray down`/`ray exec` before any node exists,
        so a bad key fails there, with a message naming it.
        """
        config = copy.deepcopy(cluster_config)
        settings = ProviderSettings.from_provider_config(
            config["provider"], config.get("cluster_name", "")
        )
        head_type = config.get("head_node_type")
        types = config.get("available_node_types") or {}
        if head_type not in types:
            raise ValueError(
                f"head_node_type is {head_type!r}, but must name one of "
                f"available_node_types ({', '.join(types)})."
            )
        if types[head_type].get("node_config"):
            raise ValueError(
                f"available_node_types.{head_type}.node_config must be empty: the head "
                "is the machine that runs `ray up`, not a SLURM job."
            )
        worker_job_specs(config)
        # Pinned, so the autoscaler on the head sees what `ray up` saw.
        config["provider"].update(
            head_ip=settings.head_ip,
            ray_temp_dir=settings.ray_temp_dir,
            state_dir=settings.state_dir,
            shared_dir=settings.shared_dir,
        )
        for key, default in (
            ("cluster_synced_files", []),
            ("file_mounts_sync_continuously", False),
            ("rsync_exclude", []),
            ("rsync_filter", []),
        ):
            config.setdefault(key, default)
        return config

    # -- listing -------------------------------------------------------------

    def non_terminated_nodes(self, tag_filters: dict[str, str]) -> list[str]:
        """The head (unless terminated) and this cluster's queued or running jobs."""
        with self._lock:
            jobs = self._refresh_jobs()
            with self._state.update() as records:
                _forget_finished(records, jobs)
                snapshot = copy.deepcopy(records)
        ids = [
            node_id
            for node_id, rec in snapshot.items()
            if rec["kind"] == NODE_KIND_HEAD and not rec.get("terminated")
        ]
        ids += [
            job.id
            for job in jobs.values()
            if job.state in _PENDING_STATES | _RUNNING_STATES
            and not snapshot.get(job.id, {}).get("terminated")
        ]
        return [
            i
            for i in ids
            if all(self._tags(i, snapshot).get(k) == v for k, v in tag_filters.items())
        ]

    def is_running(self, node_id: str) -> bool:
        """Head: not terminated. Worker: the job is RUNNING."""
        if node_id == self.settings.head_node_id:
            return not self.is_terminated(node_id)
        job = self._job(node_id)
        return job is not None and job.state in _RUNNING_STATES and not self._marked(node_id)

    def is_terminated(self, node_id: str) -> bool:
        """Head: `terminate_node` was called. Worker: the job is gone, ending or cancelled."""
        if node_id == self.settings.head_node_id:
            rec = self._state.read().get(node_id)
            return rec is None or bool(rec.get("terminated"))
        job = self._job(node_id)
        return (
            job is None
            or job.state not in _PENDING_STATES | _RUNNING_STATES
            or self._marked(node_id)
        )

    def node_tags(self, node_id: str) -> dict[str, str]:
        """Tags set through this provider; for an unknown job of this cluster, those its name implies."""
        return self._tags(node_id, self._state.read())

    def internal_ip(self, node_id: str) -> str:
        """Head: provider.head_ip. Worker: the address of the job's node ("" while pending)."""
        if node_id == self.settings.head_node_id:
            return self.settings.head_ip
        job = self._job(node_id)
        if job is None or not job.host:
            return ""
        if job.host not in self._hosts:
            self._hosts[job.host] = socket.gethostbyname(job.host)
        return self._hosts[job.host]

    def external_ip(self, node_id: str) -> str:
        """Same as internal_ip: the cluster network is the only network."""
        return self.internal_ip(node_id)

    # -- changes -------------------------------------------------------------

    def create_node(
        self, node_config: dict[str, Any], tags: dict[str, str], count: int
    ) -> dict[str, Any] | None:
        """Create nodes without explicit Ray resources (resources follow node_config)."""
        return self.create_node_with_resources_and_labels(node_config, tags, count, {}, {})

    def create_node_with_resources_and_labels(
        self,
        node_config: dict[str, Any],
        tags: dict[str, str],
        count: int,
        resources: dict[str, float],
        labels: dict[str, str],
    ) -> dict[str, Any] | None:
        """Head: record this machine as the head. Worker: submit `count` sbatch jobs."""
        node_type = tags.get(TAG_RAY_USER_NODE_TYPE, "")
        if tags.get(TAG_RAY_NODE_KIND) == NODE_KIND_HEAD:
            head_id = self.settings.head_node_id
            with self._state.update() as records:
                records[head_id] = _record(NODE_KIND_HEAD, node_type, tags)
            return {head_id: {"host": socket.gethostname()}}
        spec = JobSpec.from_node_config(node_type, node_config, resources)
        script = self._worker_script(node_type, spec, resources, labels)
        created = {}
        for _ in range(count):
            with self._lock:  # a listing never sees a job before its tags
                job_id = _sbatch(script, self.settings.state_dir)
                with self._state.update() as records:
                    records[job_id] = _record(NODE_KIND_WORKER, node_type, tags)
            created[job_id] = {"node_type": node_type}
        return created

    def set_node_tags(self, node_id: str, tags: dict[str, str]) -> None:
        """Merge `tags` into the node's tags (under the state file's lock)."""
        with self._state.update() as records:
            rec = records.setdefault(node_id, _record(*self._kind_and_type(node_id), {}))
            rec["tags"].update(tags)

    def terminate_node(self, node_id: str) -> dict[str, Any] | None:
        """Worker: scancel. Head: stop this cluster's processes on this machine."""
        with self._state.update() as records:
            rec = records.setdefault(node_id, _record(*self._kind_and_type(node_id), {}))
            rec["terminated"] = True
        if node_id == self.settings.head_node_id:
            stop_cluster_processes(self.settings.ray_temp_dir, self.settings.gcs_port)
        else:
            subprocess.run(["scancel", node_id], check=False, capture_output=True)
        return None

    def terminate_nodes(self, node_ids: list[str]) -> dict[str, Any] | None:
        """Terminate several nodes; workers with one scancel call."""
        workers = [n for n in node_ids if n != self.settings.head_node_id]
        with self._state.update() as records:
            for node_id in workers:
                rec = records.setdefault(node_id, _record(*self._kind_and_type(node_id), {}))
                rec["terminated"] = True
        if workers:
            subprocess.run(["scancel", *workers], check=False, capture_output=True)
        if len(workers) < len(node_ids):
            self.terminate_node(self.settings.head_node_id)
        return None

    def get_command_runner(
        self,
        log_prefix: str,
        node_id: str,
        auth_config: dict[str, Any],
        cluster_name: str,
        process_runner: ModuleType,
        use_internal_ip: bool,
        docker_config: dict[str, Any] | None = None,
    ) -> CommandRunnerInterface:
        """Head: run locally. Worker: run as a step of its job. Never SSH."""
        if node_id == self.settings.head_node_id:
            return LocalCommandRunner(self.settings, process_runner)
        return SrunCommandRunner(self.settings, node_id, process_runner)

    # -- private -------------------------------------------------------------

    def _refresh_jobs(self) -> dict[str, _Job]:
        with self._lock:
            self._jobs = _squeue(self.settings.job_name_prefix)
            self._jobs_time = time.monotonic()
            return dict(self._jobs)

    def _job(self, node_id: str) -> _Job | None:
        """The cached squeue line of a job; an unknown id refreshes the cache (at most 1/s)."""
        with self._lock:
            if node_id not in self._jobs and time.monotonic() - self._jobs_time > _REFRESH_S:
                self._refresh_jobs()
            return self._jobs.get(node_id)

    def _marked(self, node_id: str) -> bool:
        return bool(self._state.read().get(node_id, {}).get("terminated"))

    def _kind_and_type(self, node_id: str) -> tuple[str, str]:
        if node_id == self.settings.head_node_id:
            return NODE_KIND_HEAD, ""
        job = self._jobs.get(node_id)
        return NODE_KIND_WORKER, job.node_type if job else ""

    def _tags(self, node_id: str, records: Mapping[str, Any]) -> dict[str, str]:
        if node_id in records:
            return dict(records[node_id]["tags"])
        job = self._jobs.get(node_id)
        if job is None:
            return {}
        return {  # a job of ours whose record was lost: what its name says
            TAG_RAY_NODE_KIND: NODE_KIND_WORKER,
            TAG_RAY_USER_NODE_TYPE: job.node_type,
            TAG_RAY_NODE_NAME: f"ray-{self.cluster_name}-worker",
            TAG_RAY_NODE_STATUS: STATUS_UP_TO_DATE,
        }

    def _worker_script(
        self,
        node_type: str,
        spec: JobSpec,
        resources: Mapping[str, float],
        labels: Mapping[str, str],
    ) -> str:
        s = self.settings
        job_name = s.job_name_prefix + node_type
        label_line = "unset RAY_OVERRIDE_LABELS"
        if labels:
            label_line = "export RAY_OVERRIDE_LABELS=" + shlex.quote(json.dumps(dict(labels)))
        options = spec.sbatch_options(preempt_grace_s=s.preempt_grace_s)
        script = render_template(
            "worker_job.sbatch.tmpl",
            {
                "cluster_name": s.cluster_name,
                "node_type": shlex.quote(node_type),
                "job_name": job_name,
                "log_path": os.path.join(s.state_dir, "logs", "%x-%j.out"),
                "sbatch_lines": "\n".join(f"#SBATCH {opt}" for opt in options),
                "path": shlex.quote(job_path()),
                "exports": "\n".join([*export_lines(s.exports()), *s.secret_env_lines()]),
                "env_setup": "\n".join(s.env_setup) or "# (provider.env_setup is empty)",
                "labels": label_line,
                "gcs_address": s.gcs_address,
                "resource_args": _resource_args(spec, resources),
                "temp_dir": shlex.quote(s.ray_temp_dir),
                "grace": str(s.preempt_grace_s),
                "drain_s": str(_drain_deadline_s(s.preempt_grace_s)),
            },
        )
        # A copy per node type, for whoever wonders what was submitted.
        os.makedirs(os.path.join(s.state_dir, "logs"), exist_ok=True)
        with open(os.path.join(s.state_dir, f"{node_type}.sbatch"), "w") as f:
            f.write(script)
        return script


# ---------------------------------------------------------------------------
# private helpers
# ---------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class _Job:
    id: str
    state: str
    node_type: str
    host: str


def _record(kind: str, node_type: str, tags: Mapping[str, str]) -> dict[str, Any]:
    return {
        "kind": kind,
        "node_type": node_type,
        "tags": dict(tags),
        "created": time.time(),
        "terminated": False,
    }


def _squeue(prefix: str) -> dict[str, _Job]:
    """This user's jobs whose name is `<prefix><node type>`."""
    out = subprocess.run(
        ["squeue", "-h", "--me", "-o", "%i|%T|%j|%N"],
        check=True,
        capture_output=True,
        text=True,
    ).stdout
    jobs = {}
    for line in out.splitlines():
        job_id, state, name, host = [*line.split("|", 3), "", "", ""][:4]
        node_type = name[len(prefix) :]
        if name.startswith(prefix) and node_type and ":" not in node_type:
            jobs[job_id] = _Job(job_id, state, node_type, host.strip())
    return jobs


def _sbatch(script: str, cwd: str) -> str:
    """Submit `script` (on stdin) and return the job id."""
    env = {k: v for k, v in os.environ.items() if k not in _HEAD_ONLY_ENV}
    proc = subprocess.run(
        ["sbatch", "--parsable"],
        input=script,
        cwd=cwd,
        env=env,
        capture_output=True,
        text=True,
    )
    if proc.returncode != 0:
        raise RuntimeError(f"sbatch failed (exit {proc.returncode}): {proc.stderr.strip()}")
    return proc.stdout.strip().split(";")[0]


# Set for the head's `ray start`; a worker job must not inherit them.
_HEAD_ONLY_ENV = frozenset(
    {"RAY_OVERRIDE_RESOURCES", "RAY_OVERRIDE_LABELS", "RAY_CLOUD_INSTANCE_ID", "RAY_NODE_TYPE_NAME"}
)


def _resource_args(spec: JobSpec, resources: Mapping[str, float]) -> str:
    values = dict(resources)
    values.setdefault("CPU", spec.cpus)
    values.setdefault("GPU", spec.gpus)  # else Ray counts every GPU it can see
    args = [
        f"{flag}={int(values[name])}" for name, flag in _FLAG_RESOURCES.items() if name in values
    ]
    custom = {
        k: v for k, v in values.items() if k not in _FLAG_RESOURCES and k != "object_store_memory"
    }
    if custom:
        args.append("--resources=" + shlex.quote(json.dumps(custom)))
    return " ".join(args)


def _drain_deadline_s(grace_s: int) -> int:
    """Seconds from a worker's drain to its Ray stop: the grace less a margin.

    The raylet must outlive the drain's deadline (else Ray reports an expected
    termination, not a preemption), and the deadline counts from when `ray
    drain-node` runs, seconds after the signal on a busy node (10 s measured on
    a loaded CI machine). Kept back: a quarter of the grace, 5-30 s.
    """
    return max(0, grace_s - max(5, min(30, grace_s // 4)))


def _forget_finished(records: dict[str, Any], jobs: Mapping[str, _Job]) -> None:
    """Drop worker records whose job left squeue a while ago (keeps the file small)."""
    now = time.time()
    for node_id in [
        n
        for n, rec in records.items()
        if rec["kind"] == NODE_KIND_WORKER
        and n not in jobs
        and now - rec.get("created", 0) > _FORGET_AFTER_S
    ]:
        del records[node_id]
