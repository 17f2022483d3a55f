#!/usr/bin/env bash
# A one-node Slurm cluster on this machine, to try `tinylm ablate --launcher slurm` (and to test it).
#
#   sudo scripts/slurm_cluster.sh          # install (Debian/Ubuntu) and start; waits until the node is idle
#   sudo scripts/slurm_cluster.sh status   # say whether it is up
#   sudo scripts/slurm_cluster.sh stop     # stop the daemons this script started
#
# It installs munge, slurmctld, slurmd and slurm-client with apt-get when they are missing, writes
# /etc/slurm/slurm.conf for one node named by `hostname` with this machine's CPUs and memory (as
# `slurmd -C` measures them), starts munged as the munge user, then slurmctld and slurmd, and waits
# until `sinfo` shows the node idle. A second call while the cluster answers only says so.
#
# Deliberately small: no slurmdbd (so no `sacct`), no cgroups (it runs in containers too), no GPUs
# (GRES) configured, one partition named `debug`. Run it as root: the daemons need it.
set -euo pipefail

CONF_DIR=/etc/slurm
CONF=$CONF_DIR/slurm.conf
MARK="# written by tinylm scripts/slurm_cluster.sh"
NODE=$(hostname)
LOG_DIR=/var/log/slurm
STATE_DIR=/var/lib/slurm
PIDS=(/run/munge/munged.pid /run/slurmctld.pid /run/slurmd.pid)
WAIT_S=${SLURM_CLUSTER_WAIT_S:-60}

say() { echo "slurm_cluster: $*"; }
die() { echo "slurm_cluster: error: $*" >&2; exit 1; }

node_state() {  # the node's state as sinfo reports it (idle, mixed, allocated, down*, ...), or nothing
  timeout 10 sinfo -h -N -n "$NODE" -o '%T' 2>/dev/null | head -n1 || true
}

is_up() {
  case "$(node_state)" in idle | mixed | allocated | completing) return 0 ;; *) return 1 ;; esac
}

need_root() {
  [ "$(id -u)" = 0 ] || die "run as root (sudo $0 ${1:-})"
}

install_packages() {
  local missing=()
  command -v munged >/dev/null || missing+=(munge)
  command -v slurmctld >/dev/null || missing+=(slurmctld)
  command -v slurmd >/dev/null || missing+=(slurmd)
  command -v sbatch >/dev/null || missing+=(slurm-client)
  [ ${#missing[@]} = 0 ] && return
  command -v apt-get >/dev/null || die "install ${missing[*]} with your package manager first (apt-get not found)"
  say "installing ${missing[*]}"
  DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "${missing[@]}" >/dev/null
}

write_conf() {
  if [ -f "$CONF" ] && ! grep -qF "$MARK" "$CONF"; then
    die "$CONF exists and was not written by this script; move it away to use this one-node cluster"
  fi
  # slurmd -C: "NodeName=x CPUs=2 Boards=1 SocketsPerBoard=1 CoresPerSocket=2 ThreadsPerCore=1 RealMemory=24105"
  local hw
  hw=$(slurmd -C | head -n1 | sed -e "s/^NodeName=[^ ]* //")
  mkdir -p "$CONF_DIR"
  cat >"$CONF" <<EOF
$MARK
ClusterName=tinylm
SlurmctldHost=$NODE(127.0.0.1)
SlurmUser=slurm
AuthType=auth/munge
CredType=cred/munge
MpiDefault=none
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
ReturnToService=2
SlurmctldPidFile=/run/slurmctld.pid
SlurmdPidFile=/run/slurmd.pid
SlurmdSpoolDir=$STATE_DIR/slurmd
StateSaveLocation=$STATE_DIR/slurmctld
SlurmctldLogFile=$LOG_DIR/slurmctld.log
SlurmdLogFile=$LOG_DIR/slurmd.log
SchedulerType=sched/backfill
SchedulerParameters=sched_interval=2,bf_interval=2
SelectType=select/cons_tres
SelectTypeParameters=CR_Core
# Keep finished jobs' records for 10 minutes, so that \`scontrol requeue\` can bring one back.
MinJobAge=600
JobRequeue=1
AccountingStorageType=accounting_storage/none
JobAcctGatherType=jobacct_gather/none
JobCompType=jobcomp/none
MailProg=/bin/true
NodeName=$NODE NodeAddr=127.0.0.1 $hw State=UNKNOWN
PartitionName=debug Nodes=$NODE Default=YES MaxTime=INFINITE State=UP OverSubscribe=NO
EOF
}

start_munge() {
  if munge -n 2>/dev/null | unmunge >/dev/null 2>&1; then
    return
  fi
  mkdir -p /run/munge /var/log/munge /var/lib/munge
  chown munge:munge /run/munge /var/log/munge /var/lib/munge
  chmod 0755 /run/munge
  if [ ! -s /etc/munge/munge.key ]; then
    mungekey --create >/dev/null 2>&1 || dd if=/dev/urandom of=/etc/munge/munge.key bs=1024 count=1 status=none
  fi
  chown munge:munge /etc/munge/munge.key
  chmod 0400 /etc/munge/munge.key
  runuser -u munge -- /usr/sbin/munged 9>&-  # the daemons keep no hold of the lock below
  munge -n | unmunge >/dev/null || die "munged does not answer; see /var/log/munge/munged.log"
}

running() {  # a daemon's pid file names a live process
  [ -f "$1" ] && kill -0 "$(cat "$1" 2>/dev/null)" 2>/dev/null
}

start() {
  need_root
  if command -v sinfo >/dev/null && is_up; then
    say "already up: node $NODE is $(node_state) (stop it with: $0 stop)"
    return
  fi
  install_packages
  write_conf
  mkdir -p "$LOG_DIR" "$STATE_DIR/slurmctld" "$STATE_DIR/slurmd"
  chown slurm:slurm "$LOG_DIR" "$STATE_DIR/slurmctld"
  start_munge
  running /run/slurmctld.pid || /usr/sbin/slurmctld 9>&-
  running /run/slurmd.pid || /usr/sbin/slurmd 9>&-
  local waited=0
  until is_up; do
    if [ "$waited" -ge "$WAIT_S" ]; then
      die "node $NODE is not idle after ${WAIT_S}s (sinfo: $(node_state)); see $LOG_DIR/slurmctld.log and slurmd.log"
    fi
    # A node left down by an earlier stop comes back once the daemons answer.
    case "$(node_state)" in down* | drain*) scontrol update NodeName="$NODE" State=RESUME 2>/dev/null || true ;; esac
    sleep 1
    waited=$((waited + 1))
  done
  say "up: node $NODE is $(node_state) ($(sinfo -h -N -n "$NODE" -o '%c CPUs, %m MB'), partition debug)"
}

stop() {
  need_root stop
  local stopped=0 pidfile
  for pidfile in /run/slurmd.pid /run/slurmctld.pid /run/munge/munged.pid; do
    if running "$pidfile"; then
      kill "$(cat "$pidfile")"
      stopped=1
    fi
  done
  for pidfile in "${PIDS[@]}"; do  # wait for them to exit, so that a start right after finds them gone
    for _ in $(seq 50); do running "$pidfile" || break; sleep 0.2; done
  done
  [ "$stopped" = 1 ] && say "stopped" || say "not running"
}

status() {
  if command -v sinfo >/dev/null && is_up; then
    say "up: node $NODE is $(node_state)"
  else
    say "down"
    return 1
  fi
}

# One start or stop at a time: two callers at once (two test processes, two shells) would otherwise both
# install with apt-get (its lock refuses the second) and both start the daemons.
if [ "${1:-start}" != status ] && [ "$(id -u)" = 0 ]; then
  exec 9>/run/tinylm-slurm-cluster.lock
  flock 9
fi

case "${1:-start}" in
  start) start ;;
  stop) stop ;;
  status) status ;;
  *) die "usage: $0 [start|stop|status]" ;;
esac
