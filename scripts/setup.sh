#!/usr/bin/env bash
# Set up tunelab on a fresh machine and run something.
#
#   bash scripts/setup.sh demo   # install, then a quick seed cull on the embedded default
#   bash scripts/setup.sh test   # install (+ the system packages the tests drive), then the tests
#
# Installs into ./.venv (override with TUNELAB_VENV). On a CPU machine the
# CPU build of torch is installed first (TORCH_SPEC, default torch==2.13.0);
# on a GPU cluster set TORCH_SPEC to the CUDA build you want (e.g. "torch").
set -euo pipefail
cd "$(dirname "$0")/.."
what="${1:-demo}"
venv="${TUNELAB_VENV:-.venv}"
python="${PYTHON:-python3}"

if [ ! -x "$venv/bin/python" ]; then
  "$python" -m venv "$venv"
fi
py="$venv/bin/python"
"$py" -m pip install --quiet --upgrade pip
if ! "$py" -c "import torch" 2>/dev/null; then
  "$py" -m pip install --quiet "${TORCH_SPEC:-torch==2.13.0}"
fi
"$py" -m pip install --quiet -e ".[test]"

# Ray's token authentication stays on (tunelab.init_ray); the tests turn it off for speed.

case "$what" in
  demo)
    "$venv/bin/platform" sweep search_spaces/seed_cull.yaml --quick
    ;;
  test)
    # Real services the tests drive: SLURM (tests/slurm), Chromium (report), Prometheus (metrics).
    if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null; then
      need=()
      for pkg in slurmctld slurmd slurm-client munge chromium prometheus; do
        dpkg -s "$pkg" >/dev/null 2>&1 || need+=("$pkg")
      done
      if [ ${#need[@]} -gt 0 ]; then
        apt-get update -qq
        DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends "${need[@]}" >/dev/null
      fi
    fi
    "$venv/bin/ruff" check cli.py platform trainables tests bench
    "$venv/bin/mypy" cli.py platform/tunelab trainables
    "$venv/bin/python" -m pytest -q "${@:2}"
    ;;
  *)
    echo "usage: bash scripts/setup.sh demo|test [pytest args]" >&2
    exit 2
    ;;
esac
