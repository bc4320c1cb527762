"""Ray on SLURM: a `ray up` node provider whose workers are sbatch jobs.

Public surface:

- SlurmNodeProvider: the provider (`provider: {type: external, module:
  tunelab.slurm.SlurmNodeProvider}` in cluster.yaml).
- load_cluster_config: read cluster.yaml, optionally replacing values of its
  site block (the CI variant of the tests is made this way).
- check_cluster_config / check_cluster_file: problems of a cluster config
  against the local SLURM (partitions, GRES, CPUs), as a list of strings.
- render_head_job: an sbatch script that runs a whole Ray cluster inside one
  allocation, for sites that forbid long-running login-node processes.
- stop_cluster_processes: `ray stop` scoped to one cluster.
- the pieces the provider is built from, for tests and site tooling:
  ensure_cluster_secrets (the per-cluster token files), LocalCommandRunner /
  SrunCommandRunner (how commands reach a node), parse_sinfo /
  parse_slurm_time (reading SLURM's own output).

Security: Ray's token authentication is on for every cluster (RAY_AUTH_MODE=token);
the token and, with `mlflow_auth`, MLflow's basic-auth credentials are user-only
files in `<state_dir>/auth` (tunelab/slurm/_auth.py). The MLflow server listens
on the head's cluster address only.
"""

from tunelab.slurm._auth import ensure_cluster_secrets
from tunelab.slurm._check import (
    check_cluster_config,
    check_cluster_file,
    parse_sinfo,
    parse_slurm_time,
    query_partitions,
)
from tunelab.slurm._cluster_yaml import dump_cluster_config, load_cluster_config
from tunelab.slurm._head_job import render_head_job
from tunelab.slurm._provider import SlurmNodeProvider
from tunelab.slurm._runner import LocalCommandRunner, SrunCommandRunner
from tunelab.slurm._settings import JobSpec, ProviderSettings
from tunelab.slurm._stop import cluster_processes, stop_cluster_processes

__all__ = [
    "JobSpec",
    "LocalCommandRunner",
    "ProviderSettings",
    "SlurmNodeProvider",
    "SrunCommandRunner",
    "check_cluster_config",
    "check_cluster_file",
    "cluster_processes",
    "dump_cluster_config",
    "ensure_cluster_secrets",
    "load_cluster_config",
    "parse_sinfo",
    "parse_slurm_time",
    "query_partitions",
    "render_head_job",
    "stop_cluster_processes",
]
