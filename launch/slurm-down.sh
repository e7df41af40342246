#!/usr/bin/env bash
# Stop the cluster that launch/slurm-up.sh started in STATE_DIR, by the PIDs it recorded there.
# Jobs still running are killed with it. The state (job history, database) stays for the next
# slurm-up.sh; delete STATE_DIR to forget it.
#
#   launch/slurm-down.sh STATE_DIR
set -euo pipefail

if [ $# -ne 1 ] || [ "${1:0:1}" = "-" ]; then
  echo "usage: $0 STATE_DIR" >&2
  exit 2
fi
S="$(cd "$1" 2>/dev/null && pwd)" || { echo "slurm-down: no such directory: $1" >&2; exit 2; }
WAIT="${SLURM_DOWN_WAIT:-10}"

# Jobs first: slurmd leaves its job steps running when it stops (so that it can restart under
# them), so kill whatever still runs while the controller can still reach it.
if [ -s "$S/run/slurmctld.pid" ] && kill -0 "$(cat "$S/run/slurmctld.pid")" 2>/dev/null; then
  export SLURM_CONF="$S/etc/slurm.conf"
  if [ -n "$(timeout 10 squeue -h -t running,suspended -o %A 2>/dev/null)" ]; then
    timeout 10 scancel --quiet --full --signal=KILL -t running,suspended 2>/dev/null || true
    for _ in $(seq 50); do
      [ -z "$(timeout 10 squeue -h -t running,completing -o %A 2>/dev/null)" ] && break
      sleep 0.1
    done
  fi
fi

# Then the daemons, in the reverse order of their start; only PIDs recorded under STATE_DIR.
pids=()
for name in slurmd slurmctld slurmdbd mariadbd munged; do
  pidfile="$S/run/$name.pid"
  [ -s "$pidfile" ] || continue
  pid="$(cat "$pidfile")"
  kill -0 "$pid" 2>/dev/null && pids+=("$pid")
done

[ ${#pids[@]} -gt 0 ] && kill -TERM "${pids[@]}" 2>/dev/null || true
deadline=$((SECONDS + WAIT))
for pid in "${pids[@]}"; do
  while kill -0 "$pid" 2>/dev/null && [ $SECONDS -lt $deadline ]; do sleep 0.1; done
  if kill -0 "$pid" 2>/dev/null; then
    echo "slurm-down: PID $pid did not stop within ${WAIT}s; killing it" >&2
    kill -KILL "$pid" 2>/dev/null || true
  fi
done
rm -f "$S"/run/*.pid
echo "slurm-down: cluster in $S is down"
