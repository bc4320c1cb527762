"""Security of the embedded default: Ray token authentication on, 127.0.0.1 only.

The test suite runs Ray with ``RAY_AUTH_MODE=disabled`` for speed (tests/conftest.py);
the test here removes it, as a user's shell would not have it, and runs an
experiment on the embedded default in a fresh process with its own home folder.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from tests.conftest import ROOT, TOY

# Runs in the subprocess: start the embedded default exactly as the CLI does, look at
# it from outside (token file, listening sockets, gRPC without / with the token), then
# run a small sweep on it.
_SCRIPT = r"""
import json, os, sys
from pathlib import Path

import grpc
import ray
from ray.core.generated import gcs_service_pb2, gcs_service_pb2_grpc

from tunelab import init_ray, run_experiment


def listening(pids):
    # (address, port) of every TCP socket in LISTEN state owned by one of pids
    inodes = set()
    for pid in pids:
        try:
            for fd in os.listdir(f"/proc/{pid}/fd"):
                link = os.readlink(f"/proc/{pid}/fd/{fd}")
                if link.startswith("socket:["):
                    inodes.add(link[8:-1])
        except OSError:
            pass
    found = []
    for table, size in (("/proc/net/tcp", 4), ("/proc/net/tcp6", 16)):
        for line in Path(table).read_text().splitlines()[1:]:
            cols = line.split()
            if cols[3] == "0A" and cols[9] in inodes:
                ip_hex, port_hex = cols[1].split(":")
                raw = bytes.fromhex(ip_hex)
                words = [raw[i:i + 4][::-1] for i in range(0, len(raw), 4)]
                ip = b"".join(words)
                text = ".".join(map(str, ip[-4:])) if size == 4 or ip[:12] == bytes(10) + b"\xff\xff" else ip.hex()
                found.append((text, int(port_hex, 16)))
    return found


def descendants(root):
    children = {}
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                ppid = int(Path(f"/proc/{entry}/stat").read_text().rsplit(")", 1)[1].split()[1])
            except (OSError, IndexError):
                continue
            children.setdefault(ppid, []).append(int(entry))
    out, todo = [], [root]
    while todo:
        pid = todo.pop()
        out.append(pid)
        todo += children.get(pid, [])
    return out


def probe(address, token):
    metadata = [("authorization", f"Bearer {token}")] if token else None
    with grpc.insecure_channel(address) as channel:
        stub = gcs_service_pb2_grpc.NodeInfoGcsServiceStub(channel)
        try:
            stub.GetAllNodeInfo(gcs_service_pb2.GetAllNodeInfoRequest(), timeout=10, metadata=metadata)
            return "OK"
        except grpc.RpcError as e:
            return e.code().name


init_ray(None)
token_file = Path.home() / ".ray" / "auth_token"
gcs = ray.get_runtime_context().gcs_address
out = {
    "auth_mode": os.environ.get("RAY_AUTH_MODE"),
    "token_mode": oct(token_file.stat().st_mode & 0o777),
    "gcs": gcs,
    "listening": sorted(set(listening(descendants(os.getpid())))),
    "no_token": probe(gcs, None),
    "wrong_token": probe(gcs, "0" * 64),
    "token": probe(gcs, token_file.read_text().strip()),
}
summary = run_experiment(sys.argv[1], storage=sys.argv[2], progress=False)
out["trials"] = [t["status"] for t in summary["trials"]]
print("RESULT " + json.dumps(out))
"""


@pytest.mark.skipif(sys.platform != "linux", reason="reads listening sockets from /proc")
def test_embedded_default_runs_with_token_auth_on_localhost_only(tmp_path: Path) -> None:
    spec = tmp_path / "s.yaml"
    spec.write_text(
        f"""
kind: sweep
name: toy-auth
family: "{TOY}"
config: {{hidden: 8, steps_per_iter: 5}}
budget: 1
metric: {{name: val/score, mode: max}}
search: {{lr: {{grid: [0.01]}}}}
"""
    )
    home = tmp_path / "home"
    home.mkdir()
    env = {k: v for k, v in os.environ.items() if not k.startswith(("RAY_AUTH", "RAY_ADDRESS"))}
    env["HOME"] = str(home)
    env.pop("MLFLOW_TRACKING_URI", None)
    proc = subprocess.run(
        [sys.executable, "-c", _SCRIPT, str(spec), str(tmp_path / "res")],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    lines = [line for line in proc.stdout.splitlines() if line.startswith("RESULT ")]
    assert proc.returncode == 0 and lines, proc.stderr[-4000:]
    out = json.loads(lines[-1].removeprefix("RESULT "))
    # Ray's token authentication is on, with a user-only token file in the home folder
    assert out["auth_mode"] == "token"
    assert out["token_mode"] == "0o600"
    assert oct((home / ".ray").stat().st_mode & 0o777) == "0o700"
    # every Ray server of the embedded default listens on the loopback address only
    assert out["gcs"].startswith("127.0.0.1:")
    assert out["listening"], "no listening socket found"
    assert {ip for ip, _ in out["listening"]} == {"127.0.0.1"}, out["listening"]
    # a client without the token (another user on the machine) is refused
    assert out["no_token"] == out["wrong_token"] == "UNAUTHENTICATED"
    assert out["token"] == "OK"
    # and the experiment's trials, which Ray workers run, authenticate and finish
    assert out["trials"] == ["finished"], out["trials"]
