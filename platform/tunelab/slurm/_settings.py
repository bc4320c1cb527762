"""Validated views of the `provider:` block and of worker `node_config:` blocks.

Everything a user writes in cluster.yaml for the SLURM provider is checked here,
once, with a ValueError that names the key and says how to fix it. The rest of
the package trusts these objects.
"""

from __future__ import annotations

import dataclasses
import os
import re
import shlex
import socket
from collections.abc import Mapping
from typing import Any

from tunelab.slurm import _auth

# Keys Ray itself reads or adds to a provider block; they are allowed next to ours.
_RAY_PROVIDER_KEYS = frozenset(
    {
        "type",
        "module",
        "disable_node_updaters",
        "disable_launch_config_check",
        "foreground_node_launch",
        "worker_liveness_check",
        "worker_rpc_drain",
        "use_internal_ips",
        "use_external_head_ip",
        "cache_stopped_nodes",
        "head_node_type",
        "gcs_address",
    }
)
_OUR_PROVIDER_KEYS = (
    "head_ip",
    "gcs_port",
    "dashboard_port",
    "client_port",
    "mlflow_port",
    "mlflow_auth",
    "ray_temp_dir",
    "shared_dir",
    "state_dir",
    "env_setup",
    "env",
    "preempt_grace_s",
)
NODE_CONFIG_KEYS = (
    "partition",
    "account",
    "qos",
    "cpus",
    "gpus",
    "gpu_type",
    "mem",
    "time",
    "sbatch_extra",
)
PROVIDER_MODULE = "tunelab.slurm.SlurmNodeProvider"
#: Seconds of warning before a job's end when cluster.yaml sets none.
DEFAULT_PREEMPT_GRACE_S = 120
# sbatch --signal=...@<sig_time>: SLURM takes 0-65535 seconds.
_MAX_SIG_TIME_S = 65535

# Ray gives its worker processes ports 10002-19999 by default; a fixed port in
# that range collides with them sooner or later.
_RAY_WORKER_PORTS = range(10002, 20000)
# Ray's socket paths (<temp>/session_<date>_<pid>/sockets/plasma_store) must
# stay below the 107-byte AF_UNIX limit.
_MAX_TEMP_DIR_CHARS = 45
_NAME_RE = re.compile(r"^[A-Za-z0-9_.-]+$")
_ENV_NAME_RE = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*$")


@dataclasses.dataclass(frozen=True)
class ProviderSettings:
    """The SLURM provider's settings, from cluster.yaml's `provider:` block.

    Attributes:
        cluster_name: Ray cluster name; SLURM job names are `ray-<cluster_name>:<type>`.
        head_ip: Address workers use to reach the head (the login node).
        gcs_port: Ray GCS port on the head (`ray start --head --port`).
        dashboard_port: Ray dashboard port on the head.
        client_port: Ray client server port on the head.
        mlflow_port: MLflow tracking server port on the head, or None for no server.
        mlflow_auth: Run the MLflow server with MLflow's authentication app
            (`mlflow server --app-name basic-auth`): every request needs a user
            name and password (see tunelab.slurm._auth for the files).
        ray_temp_dir: Ray's temp dir for this cluster (head and workers); `ray stop`
            is scoped to the processes using it.
        shared_dir: Folder visible from the head and every worker (Tune storage,
            MLflow store).
        state_dir: Folder on the head for node tags, the bootstrap config, job
            scripts and job logs (job logs are written by compute nodes: put it
            on a shared filesystem, e.g. under the home folder). The cluster's
            secrets live in its user-only `auth` folder (auth_dir).
        env_setup: Shell lines run before every head command and in every
            worker job before `ray start` (module loads, venv activation).
        env: Variables exported to every head command and worker job.
        preempt_grace_s: Seconds of warning before a job ends (time limit or
            preemption): every job asks SLURM for SIGTERM this long before its
            end (`#SBATCH --signal=B:TERM@<s>`) and exports it as
            TUNELAB_PREEMPT_GRACE_S, the time a driver gives its trials to
            checkpoint; a worker job drains its Ray node as preempted. 0 = no
            warning.
    """

    cluster_name: str
    head_ip: str
    gcs_port: int
    dashboard_port: int
    client_port: int
    mlflow_port: int | None
    mlflow_auth: bool
    ray_temp_dir: str
    shared_dir: str
    state_dir: str
    env_setup: tuple[str, ...]
    env: dict[str, str]
    preempt_grace_s: int = DEFAULT_PREEMPT_GRACE_S

    @classmethod
    def from_provider_config(
        cls, provider_config: Mapping[str, Any], cluster_name: str
    ) -> ProviderSettings:
        """Validate a provider block; raise ValueError naming the key and the fix."""
        _check_name("cluster_name", cluster_name)
        unknown = sorted(
            k
            for k in provider_config
            if k not in _RAY_PROVIDER_KEYS and k not in _OUR_PROVIDER_KEYS and not k.startswith("_")
        )
        if unknown:
            raise ValueError(
                f"provider.{unknown[0]} is not a SLURM provider key; known keys: "
                f"{', '.join(_OUR_PROVIDER_KEYS)}. Remove it or fix its spelling."
            )
        module = provider_config.get("module")
        if module != PROVIDER_MODULE:
            raise ValueError(f"provider.module is {module!r}, but must be {PROVIDER_MODULE!r}.")
        if provider_config.get("disable_node_updaters") is not True:
            raise ValueError(
                "provider.disable_node_updaters must be true: worker jobs start Ray "
                "themselves, and Ray's node updater would run worker commands on the head."
            )
        state_default = os.path.join("~", ".tunelab", "slurm", cluster_name)
        return cls(
            cluster_name=cluster_name,
            head_ip=_head_ip(provider_config.get("head_ip")),
            gcs_port=_port(provider_config, "gcs_port", 6379),
            dashboard_port=_port(provider_config, "dashboard_port", 8265),
            client_port=_port(provider_config, "client_port", 10001),
            mlflow_port=_optional_port(provider_config, "mlflow_port"),
            mlflow_auth=_flag(provider_config, "mlflow_auth"),
            ray_temp_dir=_temp_dir(provider_config.get("ray_temp_dir")),
            shared_dir=_abs_path(provider_config, "shared_dir", None),
            state_dir=_abs_path(provider_config, "state_dir", state_default),
            env_setup=_env_setup(provider_config.get("env_setup")),
            env=_env(provider_config.get("env")),
            preempt_grace_s=_grace(provider_config.get("preempt_grace_s")),
        )

    @property
    def job_name_prefix(self) -> str:
        """Prefix of every SLURM job name of this cluster (`:` never occurs in a name)."""
        return f"ray-{self.cluster_name}:"

    @property
    def head_node_id(self) -> str:
        """Node id of the head (the login node running `ray up`)."""
        return f"{self.cluster_name}-head"

    @property
    def gcs_address(self) -> str:
        """`HOST:PORT` that workers and drivers connect to."""
        return f"{self.head_ip}:{self.gcs_port}"

    @property
    def auth_dir(self) -> str:
        """User-only folder of the cluster's secrets (Ray's token, MLflow's auth files)."""
        return os.path.join(self.state_dir, "auth")

    @property
    def bootstrap_config_path(self) -> str:
        """Where this cluster's copy of `~/ray_bootstrap_config.yaml` lives."""
        return os.path.join(self.state_dir, "ray_bootstrap_config.yaml")

    def exports(self) -> dict[str, str]:
        """Variables exported to head commands and worker jobs, `env` last (it wins).

        Ray's token authentication is on: RAY_AUTH_MODE=token, with the token in
        RAY_AUTH_TOKEN_PATH (a path, never the token itself). TUNELAB_AUTH_SCRIPT
        creates the secrets (`python "$TUNELAB_AUTH_SCRIPT" "$TUNELAB_AUTH_DIR"`);
        TUNELAB_MLFLOW_APP is `basic-auth` when mlflow_auth is on.
        """
        out = {
            "TUNELAB_CLUSTER_NAME": self.cluster_name,
            "TUNELAB_HEAD_IP": self.head_ip,
            "TUNELAB_GCS_PORT": str(self.gcs_port),
            "TUNELAB_DASHBOARD_PORT": str(self.dashboard_port),
            "TUNELAB_CLIENT_PORT": str(self.client_port),
            "TUNELAB_RAY_TEMP_DIR": self.ray_temp_dir,
            "TUNELAB_SHARED_DIR": self.shared_dir,
            "TUNELAB_STATE_DIR": self.state_dir,
            "TUNELAB_AUTH_DIR": self.auth_dir,
            "TUNELAB_AUTH_SCRIPT": os.path.abspath(_auth.__file__),
            "RAY_AUTH_MODE": "token",
            "RAY_AUTH_TOKEN_PATH": os.path.join(self.auth_dir, _auth.RAY_TOKEN_FILE),
            "TUNELAB_PREEMPT_GRACE_S": str(self.preempt_grace_s),
        }
        if self.mlflow_port is not None:
            out["TUNELAB_MLFLOW_PORT"] = str(self.mlflow_port)
            out["MLFLOW_TRACKING_URI"] = f"http://{self.head_ip}:{self.mlflow_port}"
            if self.mlflow_auth:
                out["TUNELAB_MLFLOW_APP"] = "basic-auth"
        out.update(self.env)
        return out

    def secret_env_lines(self) -> list[str]:
        """Shell lines that export MLflow's credentials from the auth dir (mlflow_auth only).

        The file is read where it is needed, so no job script or command line
        holds a password; a head command that runs before the file exists skips it.
        """
        if self.mlflow_port is None or not self.mlflow_auth:
            return []
        env_file = shlex.quote(os.path.join(self.auth_dir, _auth.MLFLOW_ENV_FILE))
        return [f"if [ -r {env_file} ]; then set -a; . {env_file}; set +a; fi"]


@dataclasses.dataclass(frozen=True)
class JobSpec:
    """What one worker node type asks SLURM for (its `node_config:` block).

    Attributes:
        partition: sbatch --partition; None = the site's default partition.
        account: sbatch --account; None = the user's default account.
        qos: sbatch --qos; None = default.
        cpus: sbatch --cpus-per-task (one task per job).
        gpus: GPUs per job, requested as --gres=gpu[:gpu_type]:N; 0 = none.
        gpu_type: GRES type, e.g. "a100"; None = any GPU.
        mem: sbatch --mem, e.g. "120G"; None = the partition's default.
        time: sbatch --time, e.g. "24:00:00"; None = the partition's default.
        sbatch_extra: further sbatch options, one per item, e.g. "--constraint=a100_80g".
    """

    partition: str | None = None
    account: str | None = None
    qos: str | None = None
    cpus: int = 1
    gpus: int = 0
    gpu_type: str | None = None
    mem: str | None = None
    time: str | None = None
    sbatch_extra: tuple[str, ...] = ()

    @classmethod
    def from_node_config(
        cls, node_type: str, node_config: Mapping[str, Any], resources: Mapping[str, Any]
    ) -> JobSpec:
        """Validate a worker node type; raise ValueError naming the key and the fix."""
        where = f"available_node_types.{node_type}"
        _check_name(where, node_type)
        unknown = sorted(set(node_config) - set(NODE_CONFIG_KEYS))
        if unknown:
            raise ValueError(
                f"{where}.node_config.{unknown[0]} is not a SLURM node_config key; known "
                f"keys: {', '.join(NODE_CONFIG_KEYS)}."
            )
        strings = {}
        for key in ("partition", "account", "qos", "gpu_type", "mem", "time"):
            value = node_config.get(key)
            if value is not None and (not isinstance(value, str) or not value.strip()):
                raise ValueError(
                    f"{where}.node_config.{key} is {value!r}, but must be a non-empty "
                    'string or null (quote times such as "24:00:00").'
                )
            strings[key] = value
        cpus = _count(where, node_config, "cpus", int(resources.get("CPU", 1)), minimum=1)
        gpus = _count(where, node_config, "gpus", int(resources.get("GPU", 0)), minimum=0)
        for resource, allocated in (("CPU", cpus), ("GPU", gpus)):
            if int(resources.get(resource, 0)) > allocated:
                raise ValueError(
                    f"{where}.resources.{resource} is {resources[resource]}, more than the "
                    f"{allocated} the job asks SLURM for (node_config.{resource.lower()}s): "
                    "Ray would schedule trials on resources the job does not own."
                )
        extra = node_config.get("sbatch_extra") or []
        if not isinstance(extra, list) or not all(
            isinstance(x, str) and x.startswith("-") for x in extra
        ):
            raise ValueError(
                f"{where}.node_config.sbatch_extra must be a list of sbatch options such "
                f'as ["--constraint=a100_80g"], got {extra!r}.'
            )
        return cls(cpus=cpus, gpus=gpus, sbatch_extra=tuple(extra), **strings)

    def sbatch_options(self, nodes: int = 1, *, preempt_grace_s: int = 0) -> list[str]:
        """The options as `#SBATCH` arguments (one task per node), in a stable order.

        With `preempt_grace_s` > 0 the job's batch shell gets SIGTERM that many
        seconds before the job ends (`--signal=B:TERM@<s>`; SLURM may send it up
        to a minute earlier, never later).
        """
        opts = [f"--nodes={nodes}", "--ntasks-per-node=1", f"--cpus-per-task={self.cpus}"]
        for flag, value in (
            ("partition", self.partition),
            ("account", self.account),
            ("qos", self.qos),
            ("mem", self.mem),
            ("time", self.time),
        ):
            if value is not None:
                opts.append(f"--{flag}={value}")
        if self.gpus > 0:
            kind = f"gpu:{self.gpu_type}" if self.gpu_type else "gpu"
            opts.append(f"--gres={kind}:{self.gpus}")
        if preempt_grace_s > 0:
            opts.append(f"--signal=B:TERM@{preempt_grace_s}")
        return opts + list(self.sbatch_extra)


def worker_job_specs(cluster_config: Mapping[str, Any]) -> dict[str, JobSpec]:
    """JobSpec of every worker node type of a cluster config (the head is not a job)."""
    head_type = cluster_config.get("head_node_type")
    types = cluster_config.get("available_node_types") or {}
    return {
        name: JobSpec.from_node_config(
            name, spec.get("node_config") or {}, spec.get("resources") or {}
        )
        for name, spec in types.items()
        if name != head_type
    }


# ---------------------------------------------------------------------------
# private helpers
# ---------------------------------------------------------------------------


def _check_name(key: str, value: object) -> None:
    if not isinstance(value, str) or not _NAME_RE.match(value):
        raise ValueError(
            f"{key} is {value!r}, but must use only letters, digits, '_', '.' and '-' "
            "(it becomes part of SLURM job names)."
        )


def _port(cfg: Mapping[str, Any], key: str, default: int) -> int:
    value = cfg.get(key, default)
    if value is None:
        raise ValueError(f"provider.{key} is null; set a port number (default {default}).")
    return _checked_port(key, value)


def _optional_port(cfg: Mapping[str, Any], key: str) -> int | None:
    value = cfg.get(key)
    return None if value is None else _checked_port(key, value)


def _checked_port(key: str, value: object) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or not 1 <= value <= 65535:
        raise ValueError(f"provider.{key} is {value!r}, but must be a port number 1-65535.")
    if value in _RAY_WORKER_PORTS:
        raise ValueError(
            f"provider.{key} is {value}, inside Ray's worker port range 10002-19999; "
            "pick a port outside it (e.g. 8265, 6379 or 20000+)."
        )
    return value


def _flag(cfg: Mapping[str, Any], key: str) -> bool:
    value = cfg.get(key, False)
    if value is None:
        return False
    if not isinstance(value, bool):
        raise ValueError(f"provider.{key} is {value!r}, but must be true or false.")
    return value


def _head_ip(value: object) -> str:
    if value in (None, ""):
        return _detect_ip()
    if not isinstance(value, str):
        raise ValueError(f"provider.head_ip is {value!r}, but must be a host or IP string.")
    return value


def _detect_ip() -> str:
    """This machine's address as Ray picks it (route towards the outside world)."""
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        try:
            s.connect(("8.8.8.8", 80))
            return str(s.getsockname()[0])
        except OSError:
            return socket.gethostbyname(socket.gethostname())


def _expand(path: str) -> str:
    expanded = os.path.expanduser(os.path.expandvars(path))
    unset = re.search(r"\$\{?([A-Za-z_][A-Za-z0-9_]*)", expanded)
    if unset:
        raise ValueError(
            f"path {path!r} uses ${unset.group(1)}, which is not set here; set it or "
            "write the path out."
        )
    return os.path.abspath(expanded)


def _abs_path(cfg: Mapping[str, Any], key: str, default: str | None) -> str:
    value = cfg.get(key) or default
    if not isinstance(value, str) or not value:
        raise ValueError(
            f"provider.{key} is missing; set it to a folder path "
            "(~ and $VARS are expanded on the head)."
        )
    if not os.path.isabs(os.path.expanduser(os.path.expandvars(value))):
        raise ValueError(
            f"provider.{key} is {value!r}, but must be an absolute path or start with ~."
        )
    return _expand(value)


def _temp_dir(value: object) -> str:
    if not isinstance(value, str) or not value:
        raise ValueError(
            "provider.ray_temp_dir is missing; set a short per-user folder such as "
            "/tmp/$USER/ray-tunelab (never the shared /tmp/ray)."
        )
    path = _expand(value)
    if not os.path.isabs(os.path.expandvars(os.path.expanduser(value))):
        raise ValueError(f"provider.ray_temp_dir is {value!r}, but must be an absolute path.")
    if len(path) > _MAX_TEMP_DIR_CHARS:
        raise ValueError(
            f"provider.ray_temp_dir expands to {path!r} ({len(path)} characters); Ray's "
            f"socket paths under it must stay below 108 bytes: use at most "
            f"{_MAX_TEMP_DIR_CHARS} characters."
        )
    return path


def _env_setup(value: object) -> tuple[str, ...]:
    if value is None:
        return ()
    if not isinstance(value, list) or not all(isinstance(x, str) for x in value):
        raise ValueError(
            "provider.env_setup must be a list of shell lines such as "
            f'["module load cuda/12.4"], got {value!r}.'
        )
    return tuple(value)


def _env(value: object) -> dict[str, str]:
    if value is None:
        return {}
    if not isinstance(value, Mapping):
        raise ValueError(f"provider.env must be a mapping NAME: value, got {value!r}.")
    out = {}
    for name, val in value.items():
        if not isinstance(name, str) or not _ENV_NAME_RE.match(name):
            raise ValueError(f"provider.env key {name!r} is not a valid variable name.")
        if isinstance(val, (dict, list)) or val is None:
            raise ValueError(f"provider.env.{name} is {val!r}, but must be a string or number.")
        out[name] = str(val)
    return out


def _grace(value: object) -> int:
    if value is None:
        return DEFAULT_PREEMPT_GRACE_S
    if isinstance(value, bool) or not isinstance(value, int) or not 0 <= value <= _MAX_SIG_TIME_S:
        raise ValueError(
            f"provider.preempt_grace_s is {value!r}, but must be whole seconds 0-{_MAX_SIG_TIME_S} "
            f"(SLURM's limit for --signal; 0 = no warning, default {DEFAULT_PREEMPT_GRACE_S})."
        )
    return value


def _count(where: str, cfg: Mapping[str, Any], key: str, default: int, *, minimum: int) -> int:
    value = cfg.get(key, default)
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise ValueError(
            f"{where}.node_config.{key} is {value!r}, but must be an integer >= {minimum}."
        )
    return value
