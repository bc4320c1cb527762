"""Security of a SLURM cluster as rendered: Ray's token, MLflow's address and auth app.

No SLURM here: the head-job script, the worker script and cluster.yaml's head
commands are rendered (the commands run through the provider's real command
runner, with a stand-in `mlflow`), and the secrets are checked on disk. The
head job itself runs against a real SLURM with token auth on in
test_provider.py::test_head_job_runs_a_ray_cluster_inside_one_allocation.
"""

from __future__ import annotations

import shlex
import shutil
import stat
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from tests.slurm.conftest import CLUSTER_YAML, ci_site
from tunelab.slurm import (
    JobSpec,
    LocalCommandRunner,
    ProviderSettings,
    SlurmNodeProvider,
    ensure_cluster_secrets,
    load_cluster_config,
    render_head_job,
)

WORKER = "a100x1"
ALLOWED_HOSTS = '--allowed-hosts "$TUNELAB_HEAD_IP:$TUNELAB_MLFLOW_PORT,localhost:*,127.0.0.1:*"'


def product_config(base: Path, **site: Any) -> dict[str, Any]:
    """The CI variant of cluster.yaml with the product's security: no RAY_AUTH_MODE override."""
    values = ci_site(base)
    values["env"] = {k: v for k, v in values["env"].items() if k != "RAY_AUTH_MODE"}
    values.update(site)
    return SlurmNodeProvider.bootstrap_config(load_cluster_config(CLUSTER_YAML, site=values))


def settings_of(config: dict[str, Any]) -> ProviderSettings:
    return ProviderSettings.from_provider_config(config["provider"], config["cluster_name"])


def mode(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


# ---------------------------------------------------------------------------
# the head-as-a-job sbatch template
# ---------------------------------------------------------------------------


@pytest.mark.parametrize("mlflow_auth", [False, True])
def test_head_job_turns_ray_auth_on_and_binds_mlflow_to_the_head(
    tmp_path: Path, mlflow_auth: bool
) -> None:
    config = product_config(tmp_path, mlflow_auth=mlflow_auth)
    settings = settings_of(config)
    script = render_head_job(config, node_type=WORKER, nodes=2, command="platform sweep s.yaml")
    lines = script.splitlines()
    # Ray: token mode, the token a user-only file in the state dir's auth folder
    token_path = str(tmp_path / "state" / "auth" / "ray_token")
    assert "export RAY_AUTH_MODE=token" in lines
    assert f"export RAY_AUTH_TOKEN_PATH={token_path}" in lines
    setup = next(i for i, line in enumerate(lines) if line.endswith(('_AUTH_DIR"', "--mlflow")))
    head = next(i for i, line in enumerate(lines) if line.startswith("ray start --head"))
    assert setup < head  # the token exists before the head starts
    assert lines[setup].endswith('"$TUNELAB_AUTH_DIR"' + (" --mlflow" if mlflow_auth else ""))
    # MLflow: the head's cluster address, never 0.0.0.0; allowed hosts; auth app if asked
    (mlflow,) = [line for line in lines if line.startswith("nohup mlflow server")]
    assert '--host "$TUNELAB_HEAD_IP"' in mlflow
    assert "0.0.0.0" not in script
    assert ALLOWED_HOSTS in mlflow
    assert ("--app-name basic-auth" in mlflow) is mlflow_auth
    # MLflow's credentials are read from the auth folder, never written into the script
    env_file = shlex.quote(str(tmp_path / "state" / "auth" / "mlflow.env"))
    assert (f". {env_file};" in script) is mlflow_auth
    assert "PASSWORD" not in script
    assert settings.auth_dir == str(tmp_path / "state" / "auth")


def test_head_job_keeps_an_explicit_ray_auth_mode_of_the_site(tmp_path: Path) -> None:
    # the site's env wins over the defaults (the CI disables auth for speed)
    config = product_config(tmp_path, env={"RAY_AUTH_MODE": "disabled"})
    script = render_head_job(config, node_type=WORKER, nodes=1, command="true")
    assert script.count("export RAY_AUTH_MODE=") == 1
    assert "export RAY_AUTH_MODE=disabled" in script


# ---------------------------------------------------------------------------
# worker jobs
# ---------------------------------------------------------------------------


@pytest.mark.parametrize("mlflow_auth", [False, True])
def test_worker_job_gets_the_token_path_and_mlflow_credentials_file(
    tmp_path: Path, mlflow_auth: bool
) -> None:
    config = product_config(tmp_path, mlflow_auth=mlflow_auth)
    provider = SlurmNodeProvider(config["provider"], config["cluster_name"])
    node = config["available_node_types"][WORKER]
    spec = JobSpec.from_node_config(WORKER, node["node_config"], node["resources"])
    script = provider._worker_script(WORKER, spec, {}, {})
    assert "export RAY_AUTH_MODE=token" in script.splitlines()
    assert f"export RAY_AUTH_TOKEN_PATH={tmp_path}/state/auth/ray_token" in script.splitlines()
    assert ("mlflow.env; set +a; fi" in script) is mlflow_auth
    assert "PASSWORD" not in script


# ---------------------------------------------------------------------------
# cluster.yaml's head commands, through the provider's command runner
# ---------------------------------------------------------------------------


def head_command(config: dict[str, Any], starts: str) -> str:
    (cmd,) = [c for c in config["head_start_ray_commands"] if c.startswith(starts)]
    return str(cmd)


def test_shipped_cluster_yaml_binds_mlflow_to_the_head_with_auth_switchable(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setenv("USER", "alice")
    config = load_cluster_config(CLUSTER_YAML)
    assert config["metadata"]["site"]["mlflow_auth"] is False
    assert config["provider"]["mlflow_auth"] is False
    commands = [str(c) for c in config["head_start_ray_commands"]]
    setup = next(i for i, c in enumerate(commands) if "$TUNELAB_AUTH_SCRIPT" in c)
    head = next(i for i, c in enumerate(commands) if "ray start --head" in c)
    assert setup < head
    mlflow = head_command(config, "nohup mlflow server")
    assert '--host "$TUNELAB_HEAD_IP"' in mlflow
    assert ALLOWED_HOSTS in mlflow
    assert '${TUNELAB_MLFLOW_APP:+--app-name "$TUNELAB_MLFLOW_APP"}' in mlflow
    assert "0.0.0.0" not in CLUSTER_YAML.read_text()
    settings = settings_of(SlurmNodeProvider.bootstrap_config(config))
    exports = settings.exports()
    assert exports["RAY_AUTH_MODE"] == "token"
    assert exports["RAY_AUTH_TOKEN_PATH"] == f"{settings.state_dir}/auth/ray_token"
    assert "TUNELAB_MLFLOW_APP" not in exports


def fake_mlflow(tmp_path: Path) -> Path:
    """A stand-in `mlflow` that records its arguments and MLflow's auth variables."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    record = tmp_path / "mlflow_args.txt"
    script = bin_dir / "mlflow"
    script.write_text(
        "#!/bin/bash\n"
        f'printf "%s\\n" "$@" > {record}\n'
        f'echo "AUTH_CONFIG=${{MLFLOW_AUTH_CONFIG_PATH-}}" >> {record}\n'
        f'echo "SECRET_SET=${{MLFLOW_FLASK_SERVER_SECRET_KEY:+yes}}" >> {record}\n'
    )
    script.chmod(0o755)
    return record


@pytest.mark.parametrize("mlflow_auth", [False, True])
def test_head_commands_create_user_only_secrets_and_start_mlflow_on_the_head(
    tmp_path: Path, mlflow_auth: bool
) -> None:
    config = product_config(tmp_path, mlflow_auth=mlflow_auth)
    settings = settings_of(config)
    runner = LocalCommandRunner(settings)
    auth = Path(settings.auth_dir)
    setup = head_command(config, 'python "$TUNELAB_AUTH_SCRIPT"')
    if mlflow_auth:
        # without Flask-WTF (mlflow[auth]) the head command stops `ray up` with a clear message
        proc = subprocess.run(
            [sys.executable, settings.exports()["TUNELAB_AUTH_SCRIPT"], str(auth), "--mlflow"],
            capture_output=True,
            text=True,
        )
        has_flask_wtf = proc.returncode == 0
        if not has_flask_wtf:
            assert proc.returncode == 2 and "pip install 'mlflow[auth]'" in proc.stderr
            ensure_cluster_secrets(auth, mlflow=True)  # what the command makes where it can
    else:
        runner.run(setup.replace("python ", f"{sys.executable} ", 1))
    assert mode(auth) == 0o700
    files = {p.name: mode(p) for p in auth.iterdir()}
    expected = {"ray_token": 0o600}
    if mlflow_auth:
        expected |= {"mlflow_auth.ini": 0o600, "mlflow.env": 0o600}
    assert files == expected
    token = (auth / "ray_token").read_text()
    assert len(token) == 64
    # the MLflow command as the runner runs it: bound to the head, auth app when switched on
    record = fake_mlflow(tmp_path)
    Path(settings.ray_temp_dir).mkdir(parents=True, exist_ok=True)
    try:
        runner.run(f"export PATH={tmp_path / 'bin'}:$PATH\n" + head_command(config, "nohup mlflow"))
        for _ in range(100):
            if record.exists() and "SECRET_SET" in record.read_text():
                break
            subprocess.run(["sleep", "0.05"], check=True)
        args = record.read_text().splitlines()
    finally:
        shutil.rmtree(settings.ray_temp_dir, ignore_errors=True)
    assert args[0] == "server"
    assert args[args.index("--host") + 1] == settings.head_ip
    hosts = f"{settings.head_ip}:{settings.mlflow_port},localhost:*,127.0.0.1:*"
    assert args[args.index("--allowed-hosts") + 1] == hosts
    assert ("--app-name" in args) is mlflow_auth
    if mlflow_auth:
        assert args[args.index("--app-name") + 1] == "basic-auth"
        assert f"AUTH_CONFIG={auth / 'mlflow_auth.ini'}" in args
        assert "SECRET_SET=yes" in args
    else:
        assert "SECRET_SET=" in args
    # a second `ray up` keeps the secrets (every node and restart sees the same token)
    ensure_cluster_secrets(auth, mlflow=mlflow_auth)
    assert (auth / "ray_token").read_text() == token


def test_secrets_are_tightened_and_kept(tmp_path: Path) -> None:
    auth = tmp_path / "auth"
    auth.mkdir(mode=0o755)
    (auth / "ray_token").write_text("a" * 64)
    (auth / "ray_token").chmod(0o644)
    ensure_cluster_secrets(auth)
    assert (mode(auth), mode(auth / "ray_token")) == (0o700, 0o600)
    assert (auth / "ray_token").read_text() == "a" * 64
