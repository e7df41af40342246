#!/usr/bin/env bash
# Bring up a one-node SLURM cluster on this machine, with accounting, every file under STATE_DIR.
#
#   launch/slurm-up.sh STATE_DIR        # then: . STATE_DIR/env.sh   (sets SLURM_CONF)
#   launch/slurm-down.sh STATE_DIR
#
# Needs the Debian packages slurmctld slurmd slurm-client munge slurmdbd mariadb-server (their
# service scripts are not used: the daemons are started here, as the calling user). Accounting
# (slurmdbd + MariaDB) is not optional: submitit learns that a job died from `sacct`, and without
# it a dead job leaves the submitting process waiting forever.
#
# Re-running on a stopped STATE_DIR keeps its job history and ports. Knobs (environment):
#   SLURM_UP_CPUS      CPUs the node offers (default: all of this machine's)
#   SLURM_UP_MEM_MB    memory the node offers (default: MemTotal)
#   SLURM_UP_TIMEOUT   seconds to wait for each daemon (default 60)
set -euo pipefail

if [ $# -ne 1 ] || [ "${1:0:1}" = "-" ]; then
  echo "usage: $0 STATE_DIR" >&2
  exit 2
fi
mkdir -p "$1"
S="$(cd "$1" && pwd)"
TIMEOUT="${SLURM_UP_TIMEOUT:-60}"
USER_NAME="$(id -un)"
NODE="$(hostname -s)"
CPUS="${SLURM_UP_CPUS:-$(nproc)}"
MEM_MB="${SLURM_UP_MEM_MB:-$(awk '/^MemTotal:/ {print int($2 / 1024)}' /proc/meminfo)}"

for tool in munged mariadbd mariadb-install-db mariadb slurmdbd slurmctld slurmd sbatch sacct sinfo; do
  if ! PATH="$PATH:/usr/sbin:/sbin" command -v "$tool" >/dev/null; then
    echo "slurm-up: '$tool' not found; install: apt-get install slurmctld slurmd slurm-client munge slurmdbd mariadb-server" >&2
    exit 3
  fi
done
export PATH="$PATH:/usr/sbin:/sbin"

alive() { [ -s "$1" ] && kill -0 "$(cat "$1")" 2>/dev/null; }
for pidfile in "$S"/run/*.pid; do
  if [ -e "$pidfile" ] && alive "$pidfile"; then
    echo "slurm-up: $S is already up ($(basename "$pidfile" .pid) has PID $(cat "$pidfile")); run launch/slurm-down.sh $S first" >&2
    exit 1
  fi
done

# munged refuses a socket directory that others may write to, or that is not 0755.
mkdir -p "$S"/{etc,log,run/munge,spool/slurmctld,spool/slurmd,munge,db}
chmod 0755 "$S" "$S/run" "$S/run/munge"
chmod 0700 "$S/munge"

fail() {
  echo "slurm-up: $1; log tail:" >&2
  [ -n "${2:-}" ] && [ -f "$2" ] && tail -n 20 "$2" >&2
  exit 1
}
wait_for() {  # wait_for WHAT LOG COMMAND...: poll until COMMAND succeeds
  local what="$1" logfile="$2" deadline=$((SECONDS + TIMEOUT))
  shift 2
  until "$@" >/dev/null 2>&1; do
    [ $SECONDS -lt $deadline ] || fail "$what did not come up within ${TIMEOUT}s" "$logfile"
    sleep 0.1
  done
}
port_free() { ! (exec 3<>"/dev/tcp/127.0.0.1/$1") 2>/dev/null; }
pick_port() {
  local p
  while :; do
    p=$((20000 + RANDOM % 40000))
    if port_free "$p"; then echo "$p"; return; fi
  done
}

# Ports are chosen once per state dir, so several clusters (and CI runs) can share a machine.
if [ ! -f "$S/etc/ports.env" ]; then
  {
    echo "CTLD_PORT=$(pick_port)"
    echo "SLURMD_PORT=$(pick_port)"
    echo "DBD_PORT=$(pick_port)"
    echo "DB_PORT=$(pick_port)"
  } >"$S/etc/ports.env"
fi
# shellcheck disable=SC1091
. "$S/etc/ports.env"

MUNGE_SOCKET="$S/run/munge/munge.socket.2"

# --- munge --------------------------------------------------------------------------------------
if [ ! -s "$S/munge/munge.key" ]; then
  dd if=/dev/urandom of="$S/munge/munge.key" bs=1024 count=1 status=none
fi
chmod 0400 "$S/munge/munge.key"
munged --socket="$MUNGE_SOCKET" --key-file="$S/munge/munge.key" --pid-file="$S/run/munged.pid" \
  --log-file="$S/log/munged.log" --seed-file="$S/munge/munged.seed" --force 2>>"$S/log/munged.log" \
  || fail "munged did not start" "$S/log/munged.log"
wait_for munged "$S/log/munged.log" test -S "$MUNGE_SOCKET"

# --- MariaDB (accounting storage) ----------------------------------------------------------------
DB_SOCKET="$S/run/mariadb.sock"
# A throwaway accounting database: small buffers and redo log, no binary log, no fsync per commit
# (the bootstrap takes ~2 s less with them too).
DB_OPTS="--skip-log-bin --innodb-buffer-pool-size=32M --innodb-log-file-size=16M --innodb-flush-log-at-trx-commit=0 --innodb-doublewrite=0"
if [ ! -d "$S/db/mysql" ]; then
  mariadb-install-db --no-defaults --datadir="$S/db" --user="$USER_NAME" \
    --auth-root-authentication-method=socket --skip-test-db $DB_OPTS >"$S/log/mariadb-install.log" 2>&1 \
    || fail "mariadb-install-db failed" "$S/log/mariadb-install.log"
fi
# shellcheck disable=SC2086
setsid nohup mariadbd --no-defaults --datadir="$S/db" --user="$USER_NAME" --socket="$DB_SOCKET" \
  --port="$DB_PORT" --bind-address=127.0.0.1 --pid-file="$S/run/mariadbd.pid" \
  --log-error="$S/log/mariadb.log" --skip-name-resolve $DB_OPTS </dev/null >>"$S/log/mariadb.log" 2>&1 &
echo $! >"$S/run/mariadbd.pid"
wait_for mariadbd "$S/log/mariadb.log" mariadb --no-defaults --socket="$DB_SOCKET" -u root -e "SELECT 1"

if [ ! -s "$S/etc/db.pass" ]; then
  (umask 077 && head -c 18 /dev/urandom | base64 | tr -d '/+=' >"$S/etc/db.pass")
fi
DB_PASS="$(cat "$S/etc/db.pass")"
mariadb --no-defaults --socket="$DB_SOCKET" -u root -e "
  CREATE USER IF NOT EXISTS 'slurm'@'127.0.0.1' IDENTIFIED BY '$DB_PASS';
  GRANT ALL ON slurm_acct_db.* TO 'slurm'@'127.0.0.1';" \
  || fail "could not create the accounting database user" "$S/log/mariadb.log"

# --- configuration ----------------------------------------------------------------------------
# The controller reaches slurmdbd with the munge socket named in AccountingStoragePass, not
# AuthInfo: with a non-default socket both must be set.
(
  umask 077
  cat >"$S/etc/slurmdbd.conf" <<EOF
AuthType=auth/munge
AuthInfo=socket=$MUNGE_SOCKET
DbdHost=localhost
DbdAddr=127.0.0.1
DbdPort=$DBD_PORT
SlurmUser=$USER_NAME
PidFile=$S/run/slurmdbd.pid
LogFile=$S/log/slurmdbd.log
StorageType=accounting_storage/mysql
StorageHost=127.0.0.1
StoragePort=$DB_PORT
StorageUser=slurm
StoragePass=$DB_PASS
StorageLoc=slurm_acct_db
EOF
)
chmod 0600 "$S/etc/slurmdbd.conf"

# No cgroups in containers: plain process tracking, no task binding, no usage sampling.
# batch_sched_delay/sched_min_interval=0 start a job as soon as it is submitted (else ~3 s each).
# sched_interval/bf_interval=2: a job that becomes eligible without an event (a requeued job, once
# cred_expire has passed) starts within 2 s, not at the next 30-60 s pass.
# cred_expire is also how long a requeued job waits before it may start again (default 120 s).
# config_overrides: the node offers SLURM_UP_CPUS even where the machine has fewer cores.
cat >"$S/etc/slurm.conf" <<EOF
ClusterName=metaopt
SlurmctldHost=$NODE(127.0.0.1)
SlurmUser=$USER_NAME
SlurmdUser=$USER_NAME
SlurmctldPort=$CTLD_PORT
SlurmdPort=$SLURMD_PORT
AuthType=auth/munge
AuthInfo=socket=$MUNGE_SOCKET,cred_expire=10
CredType=cred/munge
StateSaveLocation=$S/spool/slurmctld
SlurmdSpoolDir=$S/spool/slurmd
SlurmctldPidFile=$S/run/slurmctld.pid
SlurmdPidFile=$S/run/slurmd.pid
SlurmctldLogFile=$S/log/slurmctld.log
SlurmdLogFile=$S/log/slurmd.log
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
JobAcctGatherType=jobacct_gather/none
AccountingStorageType=accounting_storage/slurmdbd
AccountingStorageHost=localhost
AccountingStoragePort=$DBD_PORT
AccountingStoragePass=socket=$MUNGE_SOCKET
JobCompType=jobcomp/none
SchedulerType=sched/backfill
SchedulerParameters=batch_sched_delay=0,sched_min_interval=0,sched_interval=2,bf_interval=2
SelectType=select/cons_tres
SelectTypeParameters=CR_CPU
MpiDefault=none
ReturnToService=2
SlurmdParameters=config_overrides
KillWait=10
MailProg=/bin/true
PlugStackConfig=$S/etc/plugstack.conf
NodeName=$NODE NodeAddr=127.0.0.1 CPUs=$CPUS RealMemory=$MEM_MB State=UNKNOWN
PartitionName=debug Nodes=ALL Default=YES MaxTime=INFINITE State=UP
EOF
: >"$S/etc/plugstack.conf"
cat >"$S/env.sh" <<EOF
# . this file to talk to the cluster in $S
export SLURM_CONF=$S/etc/slurm.conf
EOF
# slurmdbd finds slurmdbd.conf next to $SLURM_CONF; the other daemons read $SLURM_CONF itself.
export SLURM_CONF="$S/etc/slurm.conf"

# --- daemons ------------------------------------------------------------------------------------
slurmdbd 2>>"$S/log/slurmdbd.log" || fail "slurmdbd did not start" "$S/log/slurmdbd.log"
wait_for slurmdbd "$S/log/slurmdbd.log" bash -c "exec 3<>/dev/tcp/127.0.0.1/$DBD_PORT"
slurmctld 2>>"$S/log/slurmctld.log" || fail "slurmctld did not start" "$S/log/slurmctld.log"
wait_for slurmctld "$S/log/slurmctld.log" scontrol ping
slurmd -N "$NODE" 2>>"$S/log/slurmd.log" || fail "slurmd did not start" "$S/log/slurmd.log"
node_idle() { [ "$(sinfo -h -n "$NODE" -o %T 2>/dev/null)" = idle ]; }
wait_for "node $NODE" "$S/log/slurmd.log" node_idle
# Jobs are accepted only once the controller has registered the cluster with slurmdbd.
wait_for accounting "$S/log/slurmctld.log" bash -c "sacctmgr -n -P list cluster format=cluster | grep -qx metaopt"

echo "slurm-up: cluster 'metaopt' is up ($CPUS CPUs, ${MEM_MB} MB) with state in $S"
echo "slurm-up: use it with:  . $S/env.sh"
