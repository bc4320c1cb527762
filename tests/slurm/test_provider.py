"""tunelab.slurm against a real single-node SLURM (no Ray cluster here; see test_ray_up.py).

Provider jobs in these tests are submitted with `--hold` where only the
submission matters, so they stay PENDING (visible to squeue, never running).
Tests that need no SLURM (config validation, site overrides, sinfo parsing)
are not marked `slurm`.
"""

from __future__ import annotations

import copy
import dataclasses
import multiprocessing
import os
import shutil
import stat
import subprocess
import sys
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml
from ray.autoscaler._private.util import prepare_config, validate_config
from ray.autoscaler.tags import (
    NODE_KIND_WORKER,
    TAG_RAY_LAUNCH_REQUEST,
    TAG_RAY_NODE_KIND,
    TAG_RAY_USER_NODE_TYPE,
)

from tests.conftest import wait_for
from tests.slurm.conftest import CLUSTER_YAML, ci_site
from tunelab.slurm import (
    LocalCommandRunner,
    SlurmNodeProvider,
    SrunCommandRunner,
    check_cluster_config,
    cluster_processes,
    load_cluster_config,
    parse_sinfo,
    parse_slurm_time,
    query_partitions,
    render_head_job,
    stop_cluster_processes,
)

slurm = pytest.mark.slurm
WORKER = "a100x1"


# ---------------------------------------------------------------------------
# helpers and fixtures
# ---------------------------------------------------------------------------


def ci_config(base: Path, **site: Any) -> dict[str, Any]:
    """The CI variant of cluster.yaml, bootstrapped as `ray up` would."""
    values = ci_site(base)
    values.update(site)
    return SlurmNodeProvider.bootstrap_config(load_cluster_config(CLUSTER_YAML, site=values))


def squeue(*args: str) -> str:
    return subprocess.run(
        ["squeue", "-h", *args], check=True, capture_output=True, text=True
    ).stdout.strip()


def worker_tags(node_type: str = WORKER) -> dict[str, str]:
    return {
        TAG_RAY_NODE_KIND: NODE_KIND_WORKER,
        TAG_RAY_USER_NODE_TYPE: node_type,
        TAG_RAY_LAUNCH_REQUEST: "req-1",
    }


@pytest.fixture
def config(tmp_path: Path) -> dict[str, Any]:
    return ci_config(tmp_path)


@pytest.fixture
def provider(slurm: Path, config: dict[str, Any]) -> Iterator[SlurmNodeProvider]:
    p = SlurmNodeProvider(config["provider"], config["cluster_name"])
    yield p
    jobs = squeue("--me", "-o", "%i|%j").splitlines()
    mine = [j.split("|")[0] for j in jobs if j.split("|")[1].startswith(p.settings.job_name_prefix)]
    if mine:
        subprocess.run(["scancel", *mine], check=False)


def held_node_config(config: dict[str, Any]) -> dict[str, Any]:
    node_config = copy.deepcopy(config["available_node_types"][WORKER]["node_config"])
    node_config["sbatch_extra"] = ["--hold"]
    return node_config


# ---------------------------------------------------------------------------
# provider methods against the real SLURM
# ---------------------------------------------------------------------------


@slurm
def test_create_node_submits_job_with_cluster_name_and_cpus(
    provider: SlurmNodeProvider, config: dict[str, Any]
) -> None:
    # the job carries the cluster's name prefix and the node type's CPUs
    created = provider.create_node_with_resources_and_labels(
        held_node_config(config), worker_tags(), 1, {"CPU": 1}, {}
    )
    (job_id,) = list(created or {})
    name, cpus = squeue("-j", job_id, "-o", "%j|%C").split("|")
    assert name == f"ray-{config['cluster_name']}:{WORKER}"
    assert int(cpus) == 1


@slurm
def test_created_job_is_listed_pending_with_its_tags(
    provider: SlurmNodeProvider, config: dict[str, Any]
) -> None:
    # a queued job is a non-terminated, not running node with the tags it was created with
    (job_id,) = list(provider.create_node(held_node_config(config), worker_tags(), 1) or {})
    assert job_id in provider.non_terminated_nodes({TAG_RAY_USER_NODE_TYPE: WORKER})
    assert not provider.is_running(job_id)
    assert provider.node_tags(job_id)[TAG_RAY_LAUNCH_REQUEST] == "req-1"


@slurm
def test_terminate_node_cancels_the_job(
    provider: SlurmNodeProvider, config: dict[str, Any]
) -> None:
    # terminated at once for Ray, and gone from squeue shortly after
    (job_id,) = list(provider.create_node(held_node_config(config), worker_tags(), 1) or {})
    provider.terminate_node(job_id)
    assert provider.is_terminated(job_id)
    assert job_id not in provider.non_terminated_nodes({})
    wait_for(lambda: job_id not in squeue("-o", "%i").split(), 10, "scancel")


@slurm
def test_jobs_of_other_clusters_are_not_listed(
    provider: SlurmNodeProvider, config: dict[str, Any]
) -> None:
    # a cluster whose name extends ours ("<name>-x") owns its own jobs
    other = subprocess.run(
        [
            "sbatch",
            "--parsable",
            "--hold",
            "--output=/dev/null",
            "-J",
            f"ray-{config['cluster_name']}-x:{WORKER}",
            "--wrap",
            "true",
        ],
        check=True,
        capture_output=True,
        text=True,
    ).stdout.strip()
    try:
        assert other not in provider.non_terminated_nodes({})
    finally:
        subprocess.run(["scancel", other], check=False)


def _tag_many(provider_config: dict[str, Any], cluster_name: str, prefix: str) -> None:
    p = SlurmNodeProvider(provider_config, cluster_name)
    for i in range(40):
        p.set_node_tags(p.settings.head_node_id, {f"{prefix}{i}": str(i)})


def test_set_node_tags_from_two_processes_loses_nothing(config: dict[str, Any]) -> None:
    # read-modify-write under the file lock: 2 processes x 40 updates, all kept
    ctx = multiprocessing.get_context("fork")
    procs = [
        ctx.Process(target=_tag_many, args=(config["provider"], config["cluster_name"], p))
        for p in ("a", "b")
    ]
    for proc in procs:
        proc.start()
    for proc in procs:
        proc.join(60)
    p = SlurmNodeProvider(config["provider"], config["cluster_name"])
    tags = p.node_tags(p.settings.head_node_id)
    assert sum(k[0] in "ab" and k[1:].isdigit() for k in tags) == 80


def test_tags_persist_across_provider_instances(config: dict[str, Any]) -> None:
    # what `ray up` sets, the autoscaler's own provider instance reads
    a = SlurmNodeProvider(config["provider"], config["cluster_name"])
    a.create_node({}, {TAG_RAY_NODE_KIND: "head", TAG_RAY_USER_NODE_TYPE: "head"}, 1)
    a.set_node_tags(a.settings.head_node_id, {"ray-node-status": "up-to-date"})
    b = SlurmNodeProvider(config["provider"], config["cluster_name"])
    assert b.node_tags(b.settings.head_node_id)["ray-node-status"] == "up-to-date"


@slurm
def test_worker_script_sets_job_identity_and_drops_head_env(
    provider: SlurmNodeProvider,
    config: dict[str, Any],
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    # the real script runs with a fake `ray` that records its environment and arguments
    fake_bin = tmp_path / "bin"
    fake_bin.mkdir()
    out = tmp_path / "ray_start.txt"
    (fake_bin / "ray").write_text(
        f'#!/bin/bash\n{{ echo "ARGS $*"; env; }} > {out}.tmp\nmv {out}.tmp {out}\n'
    )
    (fake_bin / "ray").chmod(0o755)
    monkeypatch.setenv("RAY_OVERRIDE_RESOURCES", '{"CPU": 9}')  # as on the head
    monkeypatch.setenv("RAY_CLOUD_INSTANCE_ID", "the-head")
    provider.settings = dataclasses.replace(
        provider.settings, env_setup=(f"export PATH={fake_bin}:$PATH",)
    )
    node_config = config["available_node_types"][WORKER]["node_config"]
    (job_id,) = list(provider.create_node(node_config, worker_tags(), 1) or {})
    text = wait_for(lambda: out.exists() and out.read_text(), 30, "the job to run `ray start`")
    env = dict(line.split("=", 1) for line in text.splitlines()[1:] if "=" in line)
    assert env["RAY_CLOUD_INSTANCE_ID"] == job_id
    assert env["RAY_NODE_TYPE_NAME"] == WORKER
    assert "RAY_OVERRIDE_RESOURCES" not in env
    assert f"--address={provider.settings.gcs_address} --num-cpus=1 --num-gpus=0" in text
    assert text.splitlines()[0].endswith("--block")
    # SLURM warns the job before its end; the grace time is the site's preempt_grace_s
    assert env["TUNELAB_PREEMPT_GRACE_S"] == "5"
    script = Path(provider.settings.state_dir, f"{WORKER}.sbatch").read_text()
    assert "#SBATCH --signal=B:TERM@5\n" in script


@slurm
def test_srun_runner_runs_inside_the_job(
    slurm: Path, config: dict[str, Any], tmp_path: Path
) -> None:
    # a worker's command runner runs a step of its job, not a command on the head
    log = f"--output={tmp_path / 'slurm-%j.out'}"  # not slurm-<id>.out in the current folder
    job_id = subprocess.run(
        ["sbatch", "--parsable", "-J", "runner-test", log, "--wrap", "sleep 60"],
        check=True,
        capture_output=True,
        text=True,
    ).stdout.strip()
    try:
        wait_for(lambda: squeue("-j", job_id, "-o", "%T") == "RUNNING", 20, "the job to run")
        p = SlurmNodeProvider(config["provider"], config["cluster_name"])
        runner = p.get_command_runner("", job_id, {}, config["cluster_name"], subprocess, True)
        assert isinstance(runner, SrunCommandRunner)
        assert runner.run("echo $SLURM_JOB_ID", with_output=True).decode().strip() == job_id
    finally:
        subprocess.run(["scancel", job_id], check=False)


# ---------------------------------------------------------------------------
# the head's local runner: scoped `ray stop`, bootstrap config redirect
# ---------------------------------------------------------------------------


def _sleeper(*args: str) -> subprocess.Popen[bytes]:
    return subprocess.Popen([sys.executable, "-c", "import time; time.sleep(120)", *args])


def test_ray_stop_through_runner_stops_only_this_cluster(config: dict[str, Any]) -> None:
    # `ray stop` (as `ray down` runs it) ends this cluster's processes, not another's
    p = SlurmNodeProvider(config["provider"], config["cluster_name"])
    s = p.settings
    ours = [_sleeper(f"--temp-dir={s.ray_temp_dir}"), _sleeper(f"--address=1.2.3.4:{s.gcs_port}")]
    theirs = [
        _sleeper(f"--temp-dir={s.ray_temp_dir}x"),
        _sleeper(f"--address=1.2.3.4:{s.gcs_port}1"),
    ]
    try:
        runner = p.get_command_runner("", s.head_node_id, {}, s.cluster_name, subprocess, True)
        assert isinstance(runner, LocalCommandRunner)
        runner.run("export X=1; ray stop")
        assert [proc.wait(10) for proc in ours] == [-15, -15]
        assert [proc.poll() for proc in theirs] == [None, None]
        assert cluster_processes(s.ray_temp_dir, s.gcs_port) == []
    finally:
        for proc in ours + theirs:
            proc.kill()
            proc.wait()


def test_bootstrap_config_goes_to_the_state_dir(config: dict[str, Any], tmp_path: Path) -> None:
    # `~/ray_bootstrap_config.yaml` is per cluster, also inside commands
    p = SlurmNodeProvider(config["provider"], config["cluster_name"])
    source = tmp_path / "bootstrap.yaml"
    source.write_text("cluster_name: x\n")
    runner = p.get_command_runner("", p.settings.head_node_id, {}, "x", subprocess, True)
    assert isinstance(runner, LocalCommandRunner)
    runner.run_rsync_up(str(source), "~/ray_bootstrap_config.yaml")
    shown = runner.run("cat ~/ray_bootstrap_config.yaml", with_output=True)
    assert shown.decode() == "cluster_name: x\n"
    assert Path(p.settings.bootstrap_config_path).read_text() == "cluster_name: x\n"


def test_runner_exports_cluster_variables(config: dict[str, Any]) -> None:
    # head commands see TUNELAB_* and the site's env (the cluster.yaml commands use them)
    p = SlurmNodeProvider(config["provider"], config["cluster_name"])
    runner = p.get_command_runner("", p.settings.head_node_id, {}, "x", subprocess, True)
    assert isinstance(runner, LocalCommandRunner)
    out = runner.run("echo $TUNELAB_GCS_PORT $RAY_AUTH_MODE", with_output=True).decode().split()
    assert out == [str(p.settings.gcs_port), "disabled"]


# ---------------------------------------------------------------------------
# cluster.yaml: the shipped file, its site block, validation
# ---------------------------------------------------------------------------


def test_shipped_cluster_yaml_is_valid_for_ray_and_the_provider(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    # the A100 site config passes Ray's schema and the provider's checks
    monkeypatch.setenv("USER", "alice")
    config = load_cluster_config(CLUSTER_YAML)
    validate_config(prepare_config(copy.deepcopy(config)))
    booted = SlurmNodeProvider.bootstrap_config(config)
    assert booted["provider"]["ray_temp_dir"] == "/tmp/alice/ray-tunelab"


def test_site_override_reaches_every_alias(tmp_path: Path) -> None:
    # one site value changes all the places that refer to it
    config = ci_config(tmp_path, partition_a100x1="other", a100x1_cpus=3)
    node = config["available_node_types"][WORKER]
    assert node["node_config"]["partition"] == "other"
    assert node["node_config"]["cpus"] == node["resources"]["CPU"] == 3


def test_unknown_site_key_is_an_error() -> None:
    with pytest.raises(ValueError, match=r"metadata\.site\.partiton does not exist"):
        load_cluster_config(CLUSTER_YAML, site={"partiton": "debug"})


@pytest.mark.parametrize(
    ("change", "message"),
    [
        (
            lambda c: c["provider"].update(gcs_port=12000),
            r"provider\.gcs_port is 12000, inside Ray's worker port range",
        ),
        (
            lambda c: c["provider"].update(partition="x"),
            r"provider\.partition is not a SLURM provider key",
        ),
        (
            lambda c: c["provider"].update(disable_node_updaters=False),
            r"provider\.disable_node_updaters must be true",
        ),
        (
            lambda c: c["provider"].update(ray_temp_dir="/tmp/" + "x" * 60),
            r"provider\.ray_temp_dir expands to .* characters",
        ),
        (lambda c: c["provider"].pop("shared_dir"), r"provider\.shared_dir is missing"),
        (
            lambda c: c["available_node_types"][WORKER]["node_config"].update(gpu=1),
            r"a100x1\.node_config\.gpu is not a SLURM node_config key",
        ),
        (
            lambda c: c["available_node_types"][WORKER]["resources"].update(CPU=4),
            r"a100x1\.resources\.CPU is 4, more than the 1",
        ),
        (
            lambda c: c["available_node_types"][WORKER]["node_config"].update(time=86400),
            r"a100x1\.node_config\.time is 86400",
        ),
        (
            lambda c: c["available_node_types"]["head"].update(node_config={"partition": "x"}),
            r"head\.node_config must be empty",
        ),
        (
            lambda c: c["provider"].update(preempt_grace_s="2m"),
            r"provider\.preempt_grace_s is '2m', but must be whole seconds 0-65535",
        ),
        (
            lambda c: c["provider"].update(preempt_grace_s=-1),
            r"provider\.preempt_grace_s is -1",
        ),
    ],
)
def test_bad_config_is_rejected_naming_the_key(
    tmp_path: Path, change: Callable[[dict[str, Any]], Any], message: str
) -> None:
    config = load_cluster_config(CLUSTER_YAML, site=ci_site(tmp_path))
    change(config)
    with pytest.raises(ValueError, match=message):
        SlurmNodeProvider.bootstrap_config(config)


# ---------------------------------------------------------------------------
# `platform cluster check`
# ---------------------------------------------------------------------------


@slurm
def test_check_accepts_the_ci_cluster(slurm: Path, tmp_path: Path) -> None:
    assert check_cluster_config(ci_config(tmp_path), query_partitions()) == []


@slurm
def test_check_reports_the_a100_site_against_this_slurm(
    slurm: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # the shipped partitions do not exist on the CI SLURM: both node types say so
    monkeypatch.setenv("USER", "alice")
    problems = check_cluster_config(load_cluster_config(CLUSTER_YAML), query_partitions())
    assert len(problems) == 2
    assert "partition 'gpu' does not exist; partitions: debug" in problems[0]


@slurm
@pytest.mark.parametrize(
    ("site", "message"),
    [
        ({"a100x1_gpus": 1}, "no node of partition 'debug' has 1 GPUs"),
        ({"a100x1_cpus": 64}, "cpus is 64, but the largest node of partition 'debug' has"),
        ({"a100x1_mem": "900G"}, "mem is 900G, but the largest node"),
    ],
)
def test_check_reports_what_no_node_has(
    slurm: Path, tmp_path: Path, site: dict[str, Any], message: str
) -> None:
    config = load_cluster_config(CLUSTER_YAML, site={**ci_site(tmp_path), **site})
    problems = check_cluster_config(config, query_partitions())
    assert len(problems) == 1
    assert message in problems[0]


@slurm
def test_check_reports_a_grace_not_shorter_than_the_job(slurm: Path, tmp_path: Path) -> None:
    # the end-of-job warning must come before the job ends: one problem per node type
    site = {**ci_site(tmp_path), "preempt_grace_s": 900}  # time_limit 00:15:00 = 900 s
    problems = check_cluster_config(
        load_cluster_config(CLUSTER_YAML, site=site), query_partitions()
    )
    assert [p.split(" jobs ")[0] for p in problems] == [
        f"provider.preempt_grace_s is 900 s, not shorter than the time of {t}"
        for t in ("a100x4", "a100x1")
    ]


def test_no_grace_asks_slurm_for_no_warning(tmp_path: Path) -> None:
    # preempt_grace_s 0: no --signal line; the driver is told to stop at once
    script = render_head_job(
        ci_config(tmp_path, preempt_grace_s=0), node_type=WORKER, nodes=1, command="true"
    )
    assert not [line for line in script.splitlines() if line.startswith("#SBATCH --signal")]
    assert "export TUNELAB_PREEMPT_GRACE_S=0\n" in script


def test_gpu_partition_from_sinfo_counts_typed_gres() -> None:
    # sinfo of an A100 site: 4 typed GPUs per node in `gpu`, none in `cpu`
    parts = parse_sinfo(
        "gpu|up|2-00:00:00|64|500000|gpu:a100:4(S:0-1)\ncpu*|up|infinite|128|250000|(null)\n"
    )
    assert (
        parts["gpu"].max_gpus("a100"),
        parts["gpu"].max_gpus("h100"),
        parts["gpu"].max_gpus(None),
    ) == (4, 0, 4)
    assert parts["cpu"].default and parts["cpu"].max_gpus(None) == 0
    assert parts["gpu"].max_time_s == 2 * 86400


@pytest.mark.parametrize(
    ("text", "seconds"),
    [
        ("infinite", float("inf")),
        ("30", 1800),
        ("30:00", 1800),
        ("2:00:00", 7200),
        ("1-12", 129600),
        ("1-00:00:00", 86400),
    ],
)
def test_parse_slurm_time(text: str, seconds: float) -> None:
    assert parse_slurm_time(text) == seconds


# ---------------------------------------------------------------------------
# the head-as-a-job sbatch template
# ---------------------------------------------------------------------------


def test_head_job_rejects_the_head_node_type(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="must be one of the worker node types: a100x4, a100x1"):
        render_head_job(ci_config(tmp_path), node_type="head", nodes=1, command="true")


# Runs as the driver command of the head job: the cluster answers with the token and
# refuses without it; MLflow listens on the head's address only.
_HEAD_JOB_PROBE = r"""
import os, time, urllib.error, urllib.request
import grpc, ray
from ray.core.generated import gcs_service_pb2, gcs_service_pb2_grpc

ray.init(logging_level="ERROR")
print("CLUSTER_CPUS", ray.cluster_resources()["CPU"])
print("AUTH_MODE", os.environ["RAY_AUTH_MODE"])
with grpc.insecure_channel(os.environ["RAY_ADDRESS"]) as channel:
    stub = gcs_service_pb2_grpc.NodeInfoGcsServiceStub(channel)
    try:
        stub.GetAllNodeInfo(gcs_service_pb2.GetAllNodeInfoRequest(), timeout=10)
        print("NO_TOKEN OK")
    except grpc.RpcError as e:
        print("NO_TOKEN", e.code().name)

def get(url):
    try:
        with urllib.request.urlopen(url, timeout=10) as r:
            return r.status
    except urllib.error.HTTPError as e:
        return e.code
    except OSError as e:
        return type(e).__name__

uri = os.environ["MLFLOW_TRACKING_URI"]
deadline = time.time() + 120
while get(uri + "/health") != 200 and time.time() < deadline:
    time.sleep(0.5)
print("MLFLOW_HEAD_ADDRESS", get(uri + "/api/2.0/mlflow/experiments/search?max_results=1"))
port = uri.rsplit(":", 1)[1]
print("MLFLOW_LOOPBACK", get(f"http://127.0.0.1:{port}/health"))
"""


@slurm
def test_head_job_runs_a_ray_cluster_inside_one_allocation(slurm: Path, tmp_path: Path) -> None:
    # the rendered script starts a head in the job, runs the command against it, and cleans
    # up; with the product's security on: Ray's token auth (the CI's RAY_AUTH_MODE=disabled
    # dropped), MLflow bound to the head's cluster address. (MLflow's basic-auth app needs
    # mlflow[auth], which the test environment lacks: test_head_job_template_* render it.)
    env = {k: v for k, v in ci_site(tmp_path)["env"].items() if k != "RAY_AUTH_MODE"}
    config = ci_config(tmp_path, env=env)
    probe = tmp_path / "probe.py"
    probe.write_text(_HEAD_JOB_PROBE)
    script = render_head_job(config, node_type=WORKER, nodes=1, command=f"python {probe}")
    script_path = tmp_path / "head.sbatch"
    script_path.write_text(script)
    job_id = subprocess.run(
        ["sbatch", "--parsable", str(script_path)], check=True, capture_output=True, text=True
    ).stdout.strip()
    temp_dir, gcs_port = config["provider"]["ray_temp_dir"], config["provider"]["gcs_port"]
    try:
        wait_for(lambda: job_id not in squeue("-o", "%i").split(), 240, "the head job to end")
        log = next(Path(config["provider"]["state_dir"], "logs").glob(f"*-{job_id}.out"))
        text = log.read_text()
        assert "Ray nodes alive: 1 of 1" in text, text[-3000:]
        assert "CLUSTER_CPUS 1.0" in text, text[-3000:]
        assert "AUTH_MODE token" in text
        assert "NO_TOKEN UNAUTHENTICATED" in text, text[-3000:]
        assert "MLFLOW_HEAD_ADDRESS 200" in text, text[-3000:]
        if config["provider"]["head_ip"] != "127.0.0.1":
            assert "MLFLOW_LOOPBACK URLError" in text, text[-3000:]  # not on 0.0.0.0
        auth = Path(config["provider"]["state_dir"], "auth")
        assert stat.S_IMODE(auth.stat().st_mode) == 0o700
        assert {p.name: stat.S_IMODE(p.stat().st_mode) for p in auth.iterdir()} == {
            "ray_token": 0o600
        }
        assert cluster_processes(temp_dir, gcs_port) == []
    finally:
        subprocess.run(["scancel", job_id], check=False)
        stop_cluster_processes(temp_dir, gcs_port)
        shutil.rmtree(temp_dir, ignore_errors=True)


def test_yaml_dump_of_ci_config_round_trips(tmp_path: Path) -> None:
    # what the e2e test hands to `ray up` is what load_cluster_config produced
    from tunelab.slurm import dump_cluster_config

    config = ci_config(tmp_path)
    dump_cluster_config(config, tmp_path / "c.yaml")
    assert yaml.safe_load((tmp_path / "c.yaml").read_text()) == config
    assert os.path.getsize(tmp_path / "c.yaml") > 0
