#!/usr/bin/env bash
# Stop the SLURM that scripts/start_slurm.sh started in DIR (and only that one).
#
#   scripts/stop_slurm.sh DIR
#
# Cancels its jobs, shuts slurmctld and slurmd down, stops its private munged.
# Daemons that do not exit within 10 s are killed by their pid files.
set -uo pipefail

if [ $# -ne 1 ]; then
  echo "usage: $0 DIR" >&2
  exit 2
fi
dir=$(realpath -m "$1")
export SLURM_CONF="$dir/slurm.conf"

alive() { [ -f "$1" ] && kill -0 "$(cat "$1")" 2>/dev/null && ! grep -q '^State:.*Z' "/proc/$(cat "$1")/status" 2>/dev/null; }

if [ -f "$SLURM_CONF" ]; then
  scancel --user="$(id -un)" 2>/dev/null || true
  scontrol shutdown 2>/dev/null || true
fi
for pidfile in "$dir/slurmctld.pid" "$dir/slurmd.pid"; do
  for _ in $(seq 40); do alive "$pidfile" || break; sleep 0.25; done
  if alive "$pidfile"; then kill -9 "$(cat "$pidfile")" 2>/dev/null || true; fi
done
pidfile="$dir/munge/munged.pid"
if alive "$pidfile"; then
  kill "$(cat "$pidfile")" 2>/dev/null || true
  for _ in $(seq 20); do alive "$pidfile" || break; sleep 0.25; done
fi
exit 0
