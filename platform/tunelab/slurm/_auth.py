"""Secrets of one Ray cluster on SLURM: Ray's auth token and MLflow's basic-auth files.

A SLURM login node is shared: without authentication, any user who can reach
the GCS port can run code as you, and anyone who can reach the MLflow port can
read and change your runs. Ray's token authentication is therefore always on
(RAY_AUTH_MODE=token), and MLflow's authentication app can be switched on from
the site block (`mlflow_auth`).

Every secret lives in the cluster's auth dir, `<state_dir>/auth` (the state
dir is on the shared filesystem, so every node of the user reads the same
files), which is user-only (0700); every file in it is user-only (0600):

- `ray_token`: Ray's token (RAY_AUTH_TOKEN_PATH of the head, the worker jobs
  and the driver).
- with MLflow auth: `mlflow_auth.ini` (MLFLOW_AUTH_CONFIG_PATH: users database
  `mlflow_auth.db` in the same dir, no permission for other users by default)
  and `mlflow.env` (the server's secret key and admin account, and the same
  account as MLFLOW_TRACKING_USERNAME / MLFLOW_TRACKING_PASSWORD for the driver
  and the trials). Secrets are read from these files where they are needed;
  they are never written into job scripts or command lines.

Run as a file (`python _auth.py AUTH_DIR [--mlflow]`), so that creating the
secrets never imports tunelab (torch): the head-job script and cluster.yaml's
head commands do so. Files that exist are kept (permissions tightened), so
every node and every restart of the cluster sees the same secrets.
"""

from __future__ import annotations

import contextlib
import importlib.util
import os
import secrets
import shlex
import stat
import sys
from pathlib import Path

RAY_TOKEN_FILE = "ray_token"
MLFLOW_CONFIG_FILE = "mlflow_auth.ini"
MLFLOW_ENV_FILE = "mlflow.env"
MLFLOW_DB_FILE = "mlflow_auth.db"
MLFLOW_ADMIN = "tunelab"


def private_dir(path: str | os.PathLike[str]) -> Path:
    """Create `path` (and its parents) if needed; make it user-only (0700).

    Raises:
        PermissionError: the folder belongs to another user.
    """
    folder = Path(path)
    folder.mkdir(mode=0o700, parents=True, exist_ok=True)
    info = folder.stat()
    if info.st_uid != os.getuid():
        raise PermissionError(
            f"{folder} belongs to uid {info.st_uid}, not to you: the cluster's secrets "
            "must sit in a folder only you can read; set provider.state_dir to one of yours."
        )
    if stat.S_IMODE(info.st_mode) != 0o700:
        folder.chmod(0o700)
    return folder


def secret_file(path: str | os.PathLike[str], content: str) -> Path:
    """Write `content` to a new user-only (0600) file; an existing file is kept, made 0600."""
    file = Path(path)
    flags = os.O_WRONLY | os.O_CREAT | os.O_EXCL
    with contextlib.suppress(FileExistsError), open(os.open(file, flags, 0o600), "w") as f:
        f.write(content)
    if stat.S_IMODE(file.stat().st_mode) != 0o600:
        file.chmod(0o600)
    return file


def ensure_cluster_secrets(auth_dir: str | os.PathLike[str], *, mlflow: bool = False) -> Path:
    """Create the cluster's auth dir and its secrets (see the module doc); return the dir."""
    folder = private_dir(auth_dir)
    secret_file(folder / RAY_TOKEN_FILE, secrets.token_hex(32))
    if mlflow:
        secret_file(
            folder / MLFLOW_CONFIG_FILE,
            "[mlflow]\n"
            "default_permission = NO_PERMISSIONS\n"
            f"database_uri = sqlite:///{folder / MLFLOW_DB_FILE}\n"
            f"admin_username = {MLFLOW_ADMIN}\n"
            "authorization_function = mlflow.server.auth:authenticate_request_basic_auth\n",
        )
        password = secrets.token_urlsafe(24)
        secret_file(
            folder / MLFLOW_ENV_FILE,
            "".join(
                f"{name}={shlex.quote(value)}\n"
                for name, value in (
                    ("MLFLOW_AUTH_CONFIG_PATH", str(folder / MLFLOW_CONFIG_FILE)),
                    ("MLFLOW_FLASK_SERVER_SECRET_KEY", secrets.token_urlsafe(32)),
                    ("MLFLOW_AUTH_ADMIN_USERNAME", MLFLOW_ADMIN),
                    ("MLFLOW_AUTH_ADMIN_PASSWORD", password),
                    ("MLFLOW_TRACKING_USERNAME", MLFLOW_ADMIN),
                    ("MLFLOW_TRACKING_PASSWORD", password),
                )
            ),
        )
    return folder


def _main(argv: list[str]) -> int:
    if not argv or argv[0].startswith("-") or set(argv[1:]) - {"--mlflow"}:
        print("usage: python _auth.py AUTH_DIR [--mlflow]", file=sys.stderr)
        return 2
    mlflow = "--mlflow" in argv[1:]
    if mlflow and importlib.util.find_spec("flask_wtf") is None:
        print(
            "mlflow_auth is true, but MLflow's basic-auth app needs Flask-WTF, which this "
            "environment lacks: pip install 'mlflow[auth]' (e.g. in setup_commands).",
            file=sys.stderr,
        )
        return 2
    ensure_cluster_secrets(argv[0], mlflow=mlflow)
    return 0


if __name__ == "__main__":  # run as a file: never imports tunelab (torch)
    raise SystemExit(_main(sys.argv[1:]))
