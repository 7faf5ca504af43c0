#!/usr/bin/env bash
# ops/local-slurm/start.sh: a throw-away Slurm cluster on this one machine,
# to test ops/slurm/train.sbatch against a real Slurm (Debian's slurm-wlm).
#
#   sudo ops/local-slurm/start.sh     # idempotent; ~15 s the first time
#   ops/local-slurm/stop.sh [--purge]
#
# What it does, as root (no systemd needed, works in containers):
#   - installs slurm-wlm and munge from apt when they are missing (apt is kept
#     from starting their services);
#   - a private munged (own key and socket under $BASE/munge): a system munged
#     is never touched;
#   - writes /etc/slurm/slurm.conf and gres.conf (refuses to overwrite files it
#     did not write), starts slurmctld and one slurmd per node: NODES "nodes"
#     (node1..nodeN), all on 127.0.0.1 with their own slurmd port;
#   - fake GPUs: every node declares Gres=gpu:GPUS backed by symlinks to
#     /dev/null, so --gpus-per-node / --gres=gpu:N are accepted and Slurm sets
#     CUDA_VISIBLE_DEVICES; nothing real is behind them (jobs run on CPU);
#   - proctrack/linuxproc + task/none (no cgroups);
#   - waits until `sinfo` shows every node idle, then exits 0.
#
# Facts this relies on (Slurm 22.05): start the daemons by their plain names
# (/usr/sbin/slurmd, not slurmd-wlm: Slurm reads its role from argv[0] and
# GRES breaks otherwise); count-only GRES (no File=) drains the node; never
# run a Slurm command before slurm.conf exists (it falls back to DNS SRV
# lookups); there is no slurmdbd, so use `scontrol show job` / `squeue`, not
# sacct; finished jobs stay visible MinJobAge (600 s).
#
# Settings (environment): TANDEM_SLURM_DIR (/tmp/tandem-local-slurm),
# TANDEM_SLURM_NODES (2), TANDEM_SLURM_GPUS (4 per node, 0: none),
# TANDEM_SLURM_CPUS (nproc), TANDEM_SLURM_PORT (6817: slurmctld; slurmd of
# node i: PORT + i), TANDEM_SLURM_TIMEOUT (60 s).
set -euo pipefail

BASE=${TANDEM_SLURM_DIR:-/tmp/tandem-local-slurm}
NODES=${TANDEM_SLURM_NODES:-2}
GPUS=${TANDEM_SLURM_GPUS:-4}
CPUS=${TANDEM_SLURM_CPUS:-$(nproc)}
PORT=${TANDEM_SLURM_PORT:-6817}
TIMEOUT=${TANDEM_SLURM_TIMEOUT:-60}
CONF=/etc/slurm
MARK="# written by tandem ops/local-slurm/start.sh"
HERE=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)

say() { echo "[local-slurm] $*" >&2; }
fail() { say "error: $*"; exit 1; }

[ "$(id -u)" = 0 ] || fail "run as root (it installs packages and writes /etc/slurm)"
[[ "$NODES" =~ ^[1-9][0-9]*$ ]] || fail "TANDEM_SLURM_NODES must be a positive number"

# ----------------------------------------------------------------- install
missing() {
  local c
  for c in slurmctld slurmd sbatch srun sinfo scontrol squeue munged munge unmunge; do
    command -v "$c" >/dev/null 2>&1 || return 0
  done
  return 1
}
if missing; then
  say "installing slurm-wlm and munge (apt)"
  export DEBIAN_FRONTEND=noninteractive
  if [ ! -e /usr/sbin/policy-rc.d ]; then
    # Keep the packages' init scripts from starting system daemons.
    printf '#!/bin/sh\nexit 101\n' >/usr/sbin/policy-rc.d
    chmod 755 /usr/sbin/policy-rc.d
    trap 'rm -f /usr/sbin/policy-rc.d' EXIT
  fi
  if ! apt-get install -y -q --no-install-recommends slurm-wlm munge >/dev/null 2>&1; then
    apt-get update -q >/dev/null
    apt-get install -y -q --no-install-recommends slurm-wlm munge >/dev/null
  fi
  missing && fail "slurm-wlm/munge did not install"
fi
SLURMD=$(command -v slurmd)
SLURMCTLD=$(command -v slurmctld)
SLURMD_EXE=$(readlink -f "$SLURMD")
SLURMCTLD_EXE=$(readlink -f "$SLURMCTLD")
MUNGED_EXE=$(readlink -f "$(command -v munged)")

# running PIDFILE EXE: the pid in PIDFILE is alive and runs EXE (no PID reuse).
running() {
  local pid
  pid=$(cat "$1" 2>/dev/null) || return 1
  [[ "$pid" =~ ^[0-9]+$ ]] || return 1
  [ "$(readlink -f "/proc/$pid/exe" 2>/dev/null)" = "$2" ]
}
everything_running() {
  local i
  running "$BASE/munge/munged.pid" "$MUNGED_EXE" || return 1
  running "$BASE/run/slurmctld.pid" "$SLURMCTLD_EXE" || return 1
  for i in $(seq 1 "$NODES"); do
    running "$BASE/run/slurmd-node$i.pid" "$SLURMD_EXE" || return 1
  done
}
# wait_nodes REGEX: every node's state matches REGEX.
wait_nodes() {
  local until=$((SECONDS + TIMEOUT)) n
  while :; do
    n=$(sinfo -h -N -o '%N %t' 2>/dev/null | awk -v re="^($1)\$" '$2 ~ re' | sort -u | wc -l)
    [ "$n" -ge "$NODES" ] && return 0
    if [ "$SECONDS" -ge "$until" ]; then
      sinfo -N -l >&2 || true
      tail -n 20 "$BASE"/log/*.log >&2 || true
      fail "the nodes are not $1 after ${TIMEOUT}s"
    fi
    sleep 0.5
  done
}

# ----------------------------------------------------------------- config
if [ "$NODES" = 1 ]; then NODE_LIST=node1; PORTS=$((PORT + 1))
else NODE_LIST="node[1-$NODES]"; PORTS="[$((PORT + 1))-$((PORT + NODES))]"; fi
MEM_MB=$(awk '/^MemTotal:/ { print int($2 / 1024) }' /proc/meminfo)
GRES=""; GRES_TYPES=""
if [ "$GPUS" -gt 0 ]; then GRES=" Gres=gpu:$GPUS"; GRES_TYPES="GresTypes=gpu"; fi

slurm_conf="$MARK (state in $BASE)
ClusterName=tandemlocal
SlurmctldHost=localhost(127.0.0.1)
SlurmctldPort=$PORT
SlurmUser=root
AuthType=auth/munge
CredType=cred/munge
AuthInfo=socket=$BASE/munge/munge.socket
StateSaveLocation=$BASE/state
SlurmdSpoolDir=$BASE/spool/%n
SlurmctldPidFile=$BASE/run/slurmctld.pid
SlurmdPidFile=$BASE/run/slurmd-%n.pid
SlurmctldLogFile=$BASE/log/slurmctld.log
SlurmdLogFile=$BASE/log/slurmd-%n.log
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
MpiDefault=none
SchedulerType=sched/backfill
SelectType=select/cons_tres
SelectTypeParameters=CR_Core
AccountingStorageType=accounting_storage/none
JobCompType=jobcomp/none
JobAcctGatherType=jobacct_gather/none
ReturnToService=2
SlurmdParameters=config_overrides
MinJobAge=600
KillWait=10
MailProg=/bin/true
$GRES_TYPES
NodeName=$NODE_LIST NodeHostname=localhost NodeAddr=127.0.0.1 Port=$PORTS CPUs=$CPUS RealMemory=$MEM_MB$GRES State=UNKNOWN
PartitionName=debug Nodes=ALL Default=YES MaxTime=INFINITE State=UP"
gres_conf="$MARK"
if [ "$GPUS" -gt 0 ]; then
  gres_conf+=$'\n'"AutoDetect=off"
  gres_conf+=$'\n'"NodeName=$NODE_LIST Name=gpu File=$BASE/fakedev/nvidia[0-$((GPUS - 1))]"
fi

for f in slurm.conf gres.conf; do
  if [ -f "$CONF/$f" ] && ! grep -qF "$MARK" "$CONF/$f"; then
    fail "$CONF/$f exists and was not written by this script: not touching a real Slurm setup"
  fi
done

if everything_running && [ "$(cat "$CONF/slurm.conf" 2>/dev/null)" = "$slurm_conf" ] &&
   [ "$(cat "$CONF/gres.conf" 2>/dev/null)" = "$gres_conf" ]; then
  say "already running"
  wait_nodes 'idle|mix|alloc|comp'
  sinfo -N -o '%N %T %c %G'
  exit 0
fi
# Something partial or another configuration: start from scratch.
TANDEM_SLURM_DIR="$BASE" "$HERE/stop.sh" >/dev/null 2>&1 || true

rm -rf "$BASE/state" "$BASE/spool" "$BASE/run" "$BASE/log" "$BASE/fakedev"
mkdir -p "$BASE"/{state,run,log,fakedev,munge}
chmod 755 "$BASE"
for i in $(seq 1 "$NODES"); do mkdir -p "$BASE/spool/node$i"; done
for ((g = 0; g < GPUS; g++)); do ln -s /dev/null "$BASE/fakedev/nvidia$g"; done
mkdir -p "$CONF"
printf '%s\n' "$slurm_conf" >"$CONF/slurm.conf.tmp" && mv "$CONF/slurm.conf.tmp" "$CONF/slurm.conf"
printf '%s\n' "$gres_conf" >"$CONF/gres.conf.tmp" && mv "$CONF/gres.conf.tmp" "$CONF/gres.conf"

# ----------------------------------------------------------------- munge
M=$BASE/munge
chown munge:munge "$M"
chmod 755 "$M"
[ -s "$M/munge.key" ] || dd if=/dev/urandom of="$M/munge.key" bs=1024 count=1 status=none
chown munge:munge "$M/munge.key"
chmod 400 "$M/munge.key"
rm -f "$M/munge.socket" "$M/munge.socket.lock" "$M/munged.pid"
runuser -u munge -- "$MUNGED_EXE" --socket="$M/munge.socket" --key-file="$M/munge.key" \
  --pid-file="$M/munged.pid" --log-file="$M/munged.log" --seed-file="$M/munged.seed" \
  --num-threads=2
munge -S "$M/munge.socket" -n | unmunge -S "$M/munge.socket" >/dev/null ||
  fail "munge does not work (see $M/munged.log)"

# ----------------------------------------------------------------- slurm
"$SLURMCTLD"   # daemonizes and writes its pid file
until=$((SECONDS + TIMEOUT))
until scontrol ping 2>/dev/null | grep -q 'is UP'; do
  if [ "$SECONDS" -ge "$until" ]; then
    tail -n 20 "$BASE/log/slurmctld.log" >&2 || true
    fail "slurmctld is not up after ${TIMEOUT}s"
  fi
  sleep 0.2
done
for i in $(seq 1 "$NODES"); do
  # Its own hostname (nodeN) where namespaces are allowed; plain otherwise.
  if unshare --uts true 2>/dev/null; then
    unshare --uts sh -c "hostname node$i && exec '$SLURMD' -N node$i"
  else
    "$SLURMD" -N "node$i"
  fi
done
wait_nodes idle
say "up: $NODES node(s) on 127.0.0.1, $GPUS fake GPU(s) each; state in $BASE"
sinfo -N -o '%N %T %c %G'
