#!/usr/bin/env bash
# ops/local-slurm/stop.sh [--purge]: stops the cluster ops/local-slurm/start.sh
# started: cancels its jobs, then stops its slurmd(s), slurmctld and munged.
# Only the PIDs in its own pid files are signalled, and only when they still
# run the expected program. --purge also removes the /etc/slurm files it wrote
# and its state folder.
set -uo pipefail

BASE=${TANDEM_SLURM_DIR:-/tmp/tandem-local-slurm}
CONF=/etc/slurm
MARK="# written by tandem ops/local-slurm/start.sh"
say() { echo "[local-slurm] $*" >&2; }
exe() { command -v "$1" >/dev/null 2>&1 && readlink -f "$(command -v "$1")"; }
runs() {  # runs PIDFILE EXE
  local pid
  pid=$(cat "$1" 2>/dev/null) || return 1
  [[ "$pid" =~ ^[0-9]+$ ]] && [ -n "$2" ] && [ "$(readlink -f "/proc/$pid/exe" 2>/dev/null)" = "$2" ]
}
stop() {  # stop PIDFILE EXE: TERM, up to 15 s, then KILL
  local f=$1 pid i
  if runs "$f" "$2"; then
    pid=$(cat "$f")
    say "stopping $(basename "$f" .pid) (pid $pid)"
    kill -TERM "$pid" 2>/dev/null
    for i in $(seq 1 30); do runs "$f" "$2" || break; sleep 0.5; done
    runs "$f" "$2" && kill -KILL "$pid" 2>/dev/null
  fi
  rm -f "$f"
}

SLURMD_EXE=$(exe slurmd); SLURMCTLD_EXE=$(exe slurmctld); MUNGED_EXE=$(exe munged)
if runs "$BASE/run/slurmctld.pid" "$SLURMCTLD_EXE" && grep -qF "$MARK" "$CONF/slurm.conf" 2>/dev/null; then
  jobs=$(squeue -h -o %A 2>/dev/null)
  if [ -n "$jobs" ]; then
    say "cancelling jobs: $(echo $jobs)"
    scancel $jobs 2>/dev/null
    for i in $(seq 1 40); do [ -z "$(squeue -h -o %A 2>/dev/null)" ] && break; sleep 0.5; done
  fi
fi
for f in "$BASE"/run/slurmd-*.pid; do [ -e "$f" ] && stop "$f" "$SLURMD_EXE"; done
stop "$BASE/run/slurmctld.pid" "$SLURMCTLD_EXE"
stop "$BASE/munge/munged.pid" "$MUNGED_EXE"
if [ "${1:-}" = --purge ]; then
  for f in slurm.conf gres.conf; do
    grep -qF "$MARK" "$CONF/$f" 2>/dev/null && rm -f "$CONF/$f"
  done
  case "$BASE" in /tmp/?*) rm -rf "$BASE" ;; *) say "not removing $BASE (outside /tmp)" ;; esac
fi
say "stopped"
