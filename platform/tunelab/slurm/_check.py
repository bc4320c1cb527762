"""`platform cluster check cluster.yaml`: does this config fit the local SLURM?

check_cluster_config is pure (a config and the partitions in, problems out);
query_partitions reads the partitions from `sinfo`; check_cluster_file does
both for a file.
"""

from __future__ import annotations

import dataclasses
import math
import os
import re
import subprocess
from collections.abc import Mapping
from typing import Any

from tunelab.slurm._cluster_yaml import load_cluster_config
from tunelab.slurm._settings import JobSpec, ProviderSettings

SINFO_FORMAT = "%P|%a|%l|%c|%m|%G"


@dataclasses.dataclass(frozen=True)
class Partition:
    """One SLURM partition as `sinfo` describes it.

    Attributes:
        name: Partition name.
        default: Whether jobs without --partition go here.
        up: Whether the partition accepts jobs.
        max_time_s: Time limit in seconds (inf = none).
        max_cpus: CPUs of its largest node.
        max_mem_mb: Memory (MB) of its largest node.
        gres: GRES strings of its node groups, e.g. ("gpu:a100:4(S:0-1)",).
    """

    name: str
    default: bool
    up: bool
    max_time_s: float
    max_cpus: int
    max_mem_mb: int
    gres: tuple[str, ...]

    def max_gpus(self, gpu_type: str | None) -> int:
        """Most GPUs (of `gpu_type`, or any type) on one node of this partition."""
        best = 0
        for group in self.gres:
            for item in group.split(","):
                parts = re.sub(r"\(.*?\)", "", item).split(":")
                if parts[0] != "gpu" or len(parts) < 2:
                    continue
                count = parts[-1]
                kind = parts[1] if len(parts) == 3 else None
                if count.isdigit() and (gpu_type is None or kind == gpu_type):
                    best = max(best, int(count))
        return best


def check_cluster_config(
    config: Mapping[str, Any], partitions: Mapping[str, Partition]
) -> list[str]:
    """Problems of a cluster config (a loaded cluster.yaml) against `partitions`.

    Checks the provider block and every worker node type: the partition exists
    and is up, one node has the CPUs, GPUs (GRES of the requested type), memory
    and time the job asks for, Ray's resources do not exceed the job's, and the
    job's time is longer than its end-of-job warning (provider.preempt_grace_s).

    Returns:
        One sentence per problem, naming the node type and the fix; [] if none.
    """
    problems = []
    grace = 0
    try:
        grace = ProviderSettings.from_provider_config(
            config.get("provider") or {}, config.get("cluster_name", "")
        ).preempt_grace_s
    except ValueError as e:
        problems.append(str(e))
    head_type = config.get("head_node_type")
    for name, node in (config.get("available_node_types") or {}).items():
        if name == head_type:
            continue
        try:
            spec = JobSpec.from_node_config(
                name, node.get("node_config") or {}, node.get("resources") or {}
            )
        except ValueError as e:
            problems.append(str(e))
            continue
        problems += _check_job(name, spec, partitions)
        if spec.time is not None and grace >= parse_slurm_time(spec.time):
            problems.append(
                f"provider.preempt_grace_s is {grace} s, not shorter than the time of "
                f"{name} jobs ({spec.time}): the end-of-job warning would come at once; "
                "lower it."
            )
    return problems


def query_partitions() -> dict[str, Partition]:
    """The local SLURM's partitions, from `sinfo`."""
    out = subprocess.run(
        ["sinfo", "-h", "-o", SINFO_FORMAT], check=True, capture_output=True, text=True
    ).stdout
    return parse_sinfo(out)


def parse_sinfo(text: str) -> dict[str, Partition]:
    """Partitions from `sinfo -h -o "%P|%a|%l|%c|%m|%G"` output (one line per node group)."""
    found: dict[str, Partition] = {}
    for line in text.splitlines():
        if not line.strip():
            continue
        raw, avail, limit, cpus, mem, gres = line.split("|")
        name = raw.rstrip("*")
        old = found.get(name)
        groups = () if gres in ("(null)", "") else (gres,)
        found[name] = Partition(
            name=name,
            default=raw.endswith("*"),
            up=avail == "up",
            max_time_s=parse_slurm_time(limit),
            max_cpus=max(_number(cpus), old.max_cpus if old else 0),
            max_mem_mb=max(_number(mem), old.max_mem_mb if old else 0),
            gres=(old.gres if old else ()) + groups,
        )
    return found


def check_cluster_file(path: str | os.PathLike[str]) -> list[str]:
    """check_cluster_config for a cluster.yaml against the local SLURM."""
    try:
        partitions = query_partitions()
    except (OSError, subprocess.CalledProcessError) as e:
        return [f"cannot read the SLURM partitions with sinfo: {e}"]
    return check_cluster_config(load_cluster_config(path), partitions)


def parse_slurm_time(text: str) -> float:
    """Seconds in a SLURM time ("infinite", "D-HH:MM:SS", "HH:MM:SS", "MM:SS", "MM")."""
    text = text.strip()
    if text.lower() in ("infinite", "unlimited", "n/a", ""):
        return math.inf
    days, _, clock = text.rpartition("-")
    parts = [int(p) for p in clock.split(":")]
    if len(parts) == 1:
        hours, minutes, seconds = (parts[0], 0, 0) if days else (0, parts[0], 0)  # D-HH | MM
    elif len(parts) == 2:
        hours, minutes, seconds = (parts[0], parts[1], 0) if days else (0, *parts)
    else:
        hours, minutes, seconds = parts[:3]
    return ((int(days or 0) * 24 + hours) * 60 + minutes) * 60 + seconds


# ---------------------------------------------------------------------------
# private helpers
# ---------------------------------------------------------------------------


def _check_job(name: str, spec: JobSpec, partitions: Mapping[str, Partition]) -> list[str]:
    where = f"available_node_types.{name}.node_config"
    if spec.partition is None:
        part = next((p for p in partitions.values() if p.default), None)
        if part is None:
            return [f"{where}.partition is not set and SLURM has no default partition; set it."]
    elif spec.partition not in partitions:
        known = ", ".join(sorted(partitions)) or "none"
        return [f"{where}.partition {spec.partition!r} does not exist; partitions: {known}."]
    else:
        part = partitions[spec.partition]
    problems = []
    if not part.up:
        problems.append(f"{name}: partition {part.name!r} is not up (sinfo %a); jobs will wait.")
    if spec.cpus > part.max_cpus:
        problems.append(
            f"{where}.cpus is {spec.cpus}, but the largest node of partition {part.name!r} "
            f"has {part.max_cpus} CPUs."
        )
    if spec.gpus > 0 and part.max_gpus(spec.gpu_type) < spec.gpus:
        kind = f"{spec.gpu_type} " if spec.gpu_type else ""
        have = ", ".join(part.gres) or "no GRES"
        problems.append(
            f"{where}.gpus is {spec.gpus}, but no node of partition {part.name!r} has "
            f"{spec.gpus} {kind}GPUs (GRES: {have}); fix gpus/gpu_type or the partition."
        )
    if spec.mem is not None and _mem_mb(spec.mem) > part.max_mem_mb:
        problems.append(
            f"{where}.mem is {spec.mem}, but the largest node of partition {part.name!r} "
            f"has {part.max_mem_mb} MB."
        )
    if spec.time is not None and parse_slurm_time(spec.time) > part.max_time_s:
        problems.append(f"{where}.time is {spec.time}, longer than partition {part.name!r} allows.")
    return problems


def _number(text: str) -> int:
    digits = re.match(r"\d+", text.strip())
    return int(digits.group()) if digits else 0


def _mem_mb(text: str) -> float:
    match = re.fullmatch(r"(\d+(?:\.\d+)?)([KMGT]?)B?", text.strip().upper())
    if not match:
        return 0.0  # e.g. "0" = all memory of the node: always fits
    scale = {"K": 1 / 1024, "": 1, "M": 1, "G": 1024, "T": 1024**2}[match.group(2)]
    return float(match.group(1)) * scale
