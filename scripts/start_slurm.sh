#!/usr/bin/env bash
# Start a real single-node SLURM for tests, entirely inside one folder.
#
#   scripts/start_slurm.sh DIR      # prints: export SLURM_CONF=DIR/slurm.conf
#   scripts/stop_slurm.sh DIR
#
# Debian's SLURM 22.05 without systemd (see shared/SLURM.md): installs
# slurmctld, slurmd, slurm-client and munge when missing (root + apt), writes
# DIR/slurm.conf (node "localhost", partition "debug", all CPUs), and starts a
# private munged (own socket and key copy in DIR/munge), slurmctld and slurmd
# on free ports, so it never touches another SLURM or munged on this machine.
# Waits until the node is idle. Needs root. Environment knobs: SLURM_CPUS
# (default: nproc), SLURM_MEM_MB (default: 90% of RAM, at most 20000).
set -euo pipefail

if [ $# -ne 1 ]; then
  echo "usage: $0 DIR" >&2
  exit 2
fi
if [ "$(id -u)" -ne 0 ]; then
  echo "start_slurm.sh: needs root (slurmd runs jobs as their users)" >&2
  exit 3
fi
dir=$(realpath -m "$1")
mkdir -p "$dir"/{state,spool,log,munge}
chmod 755 "$dir/munge"  # munged insists on a world-searchable socket dir

# --- install when missing ------------------------------------------------------
if ! command -v slurmctld >/dev/null || ! command -v slurmd >/dev/null \
  || ! command -v sbatch >/dev/null || ! command -v munged >/dev/null; then
  if ! command -v apt-get >/dev/null; then
    echo "start_slurm.sh: SLURM is not installed and apt-get is unavailable" >&2
    exit 4
  fi
  export DEBIAN_FRONTEND=noninteractive
  apt-get update -qq
  apt-get install -y -qq --no-install-recommends slurmctld slurmd slurm-client munge >/dev/null
fi

# --- munge: a private daemon with its own socket ---------------------------------
key="$dir/munge/munge.key"
if [ -f /etc/munge/munge.key ]; then
  install -m 600 /etc/munge/munge.key "$key"  # munged as root wants a root-owned key
else
  dd if=/dev/urandom of="$key" bs=1 count=1024 status=none
  chmod 600 "$key"
fi
socket="$dir/munge/munge.socket"
# --force: munged refuses a socket below a folder others cannot search (pytest's
# tmp dirs are 0700); root's jobs do not care. Jobs of other users would.
munged --force --socket="$socket" --key-file="$key" --pid-file="$dir/munge/munged.pid" \
  --log-file="$dir/log/munged.log" --seed-file="$dir/munge/munged.seed"

# --- slurm.conf ----------------------------------------------------------------
free_port() {
  python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])'
}
ctld_port=$(free_port)
slurmd_port=$(free_port)
while [ "$slurmd_port" = "$ctld_port" ]; do slurmd_port=$(free_port); done
cpus=${SLURM_CPUS:-$(nproc)}
mem_default=$(awk '/MemTotal/ {m = int($2 / 1024 * 0.9); print (m < 20000 ? m : 20000)}' /proc/meminfo)
mem=${SLURM_MEM_MB:-$mem_default}
cat >"$dir/slurm.conf" <<CONF
ClusterName=ci
SlurmctldHost=localhost
SlurmctldPort=$ctld_port
SlurmdPort=$slurmd_port
SlurmUser=root
SlurmdUser=root
AuthType=auth/munge
AuthInfo=socket=$socket
CredType=cred/munge
StateSaveLocation=$dir/state
SlurmdSpoolDir=$dir/spool
SlurmctldPidFile=$dir/slurmctld.pid
SlurmdPidFile=$dir/slurmd.pid
SlurmctldLogFile=$dir/log/slurmctld.log
SlurmdLogFile=$dir/log/slurmd.log
MailProg=/bin/true
SchedulerType=sched/backfill
SelectType=select/cons_tres
# CR_Core, not CR_Core_Memory: a job without --mem must not take the whole node.
SelectTypeParameters=CR_Core
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
JobAcctGatherType=jobacct_gather/none
AccountingStorageType=accounting_storage/none
MpiDefault=none
ReturnToService=2
NodeName=localhost CPUs=$cpus RealMemory=$mem State=UNKNOWN
PartitionName=debug Nodes=ALL Default=YES MaxTime=INFINITE State=UP
CONF
export SLURM_CONF="$dir/slurm.conf"

# --- daemons -------------------------------------------------------------------
slurmctld -f "$SLURM_CONF"
slurmd -f "$SLURM_CONF" -N localhost
for _ in $(seq 120); do
  if sinfo -h -o %T 2>/dev/null | grep -qx idle; then
    echo "export SLURM_CONF=$SLURM_CONF"
    exit 0
  fi
  sleep 0.25
done
echo "start_slurm.sh: node did not become idle in 30 s; see $dir/log" >&2
exit 5
