#!/usr/bin/env bash
# tests/slurm/cluster.sh - a REAL two-node Slurm 22.05 test cluster on ONE Debian 12 host,
# as root, without systemd: munged + mariadbd + slurmdbd + slurmctld + one slurmd per node.
#
# Layout (one layout for every Slurm test; it is never switched):
#   nodes       n1 and n2, both on this host (NodeHostname=$(hostname -s), NodeAddr=127.0.0.1),
#               one slurmd each (`slurmd -N n1` on port 17001, `slurmd -N n2` on port 17002).
#               Each advertises FOLDHPC_SLURM_CPUS CPUs, FOLDHPC_SLURM_GPUS fake GPUs and half of
#               80% of this host's memory. Multi-node jobs (-N 2, srun, torch.distributed over
#               127.0.0.1) really run one part on each node.
#   partitions  debug (default; PriorityTier=1, PreemptMode=REQUEUE, GraceTime=20) and
#               high (PriorityTier=10; its jobs preempt debug jobs), both Nodes=n[1-2].
#               NB: with two nodes a high job only preempts when it does not fit on the idle
#               CPUs of the nodes it may use: pin victim and preemptor to one node (--nodelist)
#               or let the preemptor need every CPU of both nodes.
#   per-node files  /run/slurm/slurmd-n1.pid, /var/spool/slurmd-n1/, $LOGDIR/slurmd-n1.log (%n).
#
# Usage: tests/slurm/cluster.sh up|down|status
#   up      install packages if missing (apt), write configs, start what is not running.
#           Idempotent: when everything is already up it only checks (~0.3 s).
#           Migrates from the old single-node layout: its slurmd (/run/slurm/slurmd.pid) is
#           stopped, and the config change restarts slurmctld (slurmctld -c: old jobs dropped).
#   down    stop only the daemons that `up` started (PIDs in /run/foldhpc-slurm/).
#   status  print daemon liveness and sinfo; exit 0 if the cluster is usable (both nodes
#           idle/mixed/allocated), 1 if not.
#
# Knobs (env):
#   FOLDHPC_SLURM_PROFILE=fast|defaults
#                 fast (default): AuthInfo=cred_expire=5 and
#                 SchedulerParameters=bf_interval=1,sched_interval=1, so a requeued job
#                 runs again after ~6 s. defaults: leave both at Slurm's defaults
#                 (a requeued job waits ~150 s). Switching restarts slurmctld + both slurmds.
#   FOLDHPC_SLURM_CPUS=4        CPUs advertised by EACH node (config_overrides lets them
#                               exceed the real core count; 2 nodes x 4 = 8 on a 2-core host)
#   FOLDHPC_SLURM_GPUS=1        fake GPUs PER NODE (gres/gpu, /dev/null symlinks; n1 gets
#                               fakegpu0..G-1, n2 fakegpuG..2G-1); 0 disables gres
#   FOLDHPC_SLURM_KEEP_STATE=1  keep slurmctld's job state when (re)starting it
#                               (default: slurmctld -c, old jobs dropped; job ids keep growing)
#   FOLDHPC_SLURM_NO_INSTALL=1  never call apt-get (fail if packages are missing)
#
# Logs: /var/log/foldhpc-slurm/ (every daemon's log file and stdout/stderr, apt output).
set -euo pipefail
exec </dev/null

CLUSTER=foldhpc
PROFILE=${FOLDHPC_SLURM_PROFILE:-fast}
CPUS=${FOLDHPC_SLURM_CPUS:-4}
GPUS=${FOLDHPC_SLURM_GPUS:-1}     # per node
NODES="n1 n2"                    # node names; slurmd -N NAME, port 17000 + index
DBPASS=foldhpc-slurmdbd        # local-only test cluster; mariadb is bound to 127.0.0.1
PKGS="munge slurmctld slurmd slurm-client slurmdbd mariadb-server"
LOGDIR=/var/log/foldhpc-slurm
STATE=/run/foldhpc-slurm       # <daemon>.pid for each daemon THIS script started
LOCK=/run/foldhpc-slurm.lock
SLURMDS="slurmd-n1 slurmd-n2"    # daemon keys of the per-node slurmds (pidfiles /run/slurm/<key>.pid)
DAEMONS="munged mariadbd slurmdbd slurmctld $SLURMDS"
T0=$EPOCHREALTIME
ME="cluster.sh ${1:-}"

log() { echo "[$ME $(awk -v a="$T0" -v b="$EPOCHREALTIME" 'BEGIN{printf "%6.1fs", b-a}')] $*"; }
# TAILS: which logs `die` shows (set per stage; empty for argument errors)
TAILS=""
tails() {
  local f
  for f in $TAILS; do
    [ -s "$f" ] && { echo "--- tail -n 15 $f" >&2; tail -n 15 "$f" >&2; }
  done
  return 0
}
die() { trap - ERR; echo "$ME: ERROR: $*" >&2; tails; echo "$ME: all logs are in $LOGDIR" >&2; exit 1; }
DAEMON_LOGS="$LOGDIR/munged.log $LOGDIR/mariadbd.log $LOGDIR/slurmdbd.log $LOGDIR/slurmctld.log"
DAEMON_LOGS="$DAEMON_LOGS $LOGDIR/slurmd-n1.log $LOGDIR/slurmd-n2.log"
DAEMON_LOGS="$DAEMON_LOGS $LOGDIR/munged.out $LOGDIR/mariadbd.out $LOGDIR/slurmdbd.out $LOGDIR/slurmctld.out $LOGDIR/slurmd.out"

# pidfile of each daemon key (written by the daemon itself). Keys: munged mariadbd slurmdbd
# slurmctld slurmd-<node>, and `slurmd` = the slurmd of the old single-node layout.
pidfile() {
  case $1 in
    munged) echo /run/munge/munged.pid ;;
    mariadbd) echo /run/mysqld/mysqld.pid ;;
    *) echo "/run/slurm/$1.pid" ;;
  esac
}
# process name (/proc/PID/comm) of a daemon key
comm_of() { case $1 in slurmd-*) echo slurmd ;; *) echo "$1" ;; esac; }
# pid_alive PID COMM -> 0 if PID is a live (non-zombie) process named COMM
pid_alive() {
  [ -n "$1" ] && [ -r "/proc/$1/comm" ] && [ "$(cat "/proc/$1/comm" 2>/dev/null)" = "$2" ] &&
    [ "$(awk '{print $3}' "/proc/$1/stat" 2>/dev/null)" != Z ]
}
# alive NAME -> 0 if the pid in NAME's pidfile is a live process named NAME
alive() { local f p; f=$(pidfile "$1"); [ -s "$f" ] || return 1; p=$(cat "$f" 2>/dev/null) || return 1; pid_alive "$p" "$(comm_of "$1")"; }
waitfor() {
  local n=$1 what=$2 i; shift 2
  for ((i = 0; i < n * 10; i++)); do "$@" >/dev/null 2>&1 && return 0; sleep 0.1; done
  die "timed out (${n}s) waiting for $what"
}
# stop_pid PID COMM: TERM, then KILL after 15 s; zombies count as gone
stop_pid() {
  local p=$1 i
  pid_alive "$p" "$2" || return 0
  kill "$p" 2>/dev/null || true
  for ((i = 0; i < 150; i++)); do pid_alive "$p" "$2" || return 0; sleep 0.1; done
  echo "$ME: $2 (pid $p) did not exit after SIGTERM, sending SIGKILL" >&2
  kill -9 "$p" 2>/dev/null || true
  for ((i = 0; i < 50; i++)); do pid_alive "$p" "$2" || return 0; sleep 0.1; done
  return 0
}
record() { cat "$(pidfile "$1")" > "$STATE/$1.pid"; }
host_name() { hostname -s; }
node_ok() { timeout 10 sinfo -h -n "$1" -o '%T' 2>/dev/null | grep -qE '^(idle|mixed|allocated|completing)$'; }

# ===================================================================== up
cmd_up() {
  [ "$(id -u)" = 0 ] || die "must run as root (uid is $(id -u))"
  case $PROFILE in fast | defaults) ;; *) die "FOLDHPC_SLURM_PROFILE must be 'fast' or 'defaults', not '$PROFILE'" ;; esac
  [[ $CPUS =~ ^[1-9][0-9]*$ ]] || die "FOLDHPC_SLURM_CPUS must be a positive integer"
  [[ $GPUS =~ ^[0-9]+$ ]] || die "FOLDHPC_SLURM_GPUS must be a non-negative integer"
  mkdir -p "$STATE" "$LOGDIR"
  exec 9>"$LOCK"
  flock -w 900 9 || die "could not lock $LOCK (another cluster.sh running?)"
  trap 'die "command failed (line $LINENO): $BASH_COMMAND"' ERR

  local H; H=$(host_name)

  # ------------------------------------------------------------- 1. packages
  local missing="" p
  for p in $PKGS; do
    dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q 'install ok installed' || missing="$missing $p"
  done
  if [ -n "$missing" ]; then
    [ "${FOLDHPC_SLURM_NO_INSTALL:-0}" = 1 ] && die "missing packages:$missing (FOLDHPC_SLURM_NO_INSTALL=1)"
    command -v apt-get >/dev/null || die "missing packages:$missing and no apt-get on this machine"
    log "installing:$missing (apt output: $LOGDIR/apt.log)"
    TAILS="$LOGDIR/apt.log"
    # keep maintainer scripts from starting services (there is no systemd anyway)
    local added_policy=0
    if [ ! -e /usr/sbin/policy-rc.d ]; then
      printf '#!/bin/sh\nexit 101\n' > /usr/sbin/policy-rc.d; chmod 755 /usr/sbin/policy-rc.d; added_policy=1
    fi
    export DEBIAN_FRONTEND=noninteractive
    local ok=0 i
    for i in 1 2 3; do
      if apt-get -o DPkg::Lock::Timeout=300 update -qq >>"$LOGDIR/apt.log" 2>&1; then ok=1; break; fi
      sleep 5
    done
    [ $ok = 1 ] || { [ $added_policy = 1 ] && rm -f /usr/sbin/policy-rc.d; die "apt-get update failed"; }
    if ! apt-get -o DPkg::Lock::Timeout=300 install -y -qq --no-install-recommends \
         -o Dpkg::Options::=--force-confold $PKGS >>"$LOGDIR/apt.log" 2>&1; then
      [ $added_policy = 1 ] && rm -f /usr/sbin/policy-rc.d
      die "apt-get install$missing failed"
    fi
    [ $added_policy = 1 ] && rm -f /usr/sbin/policy-rc.d
    log "packages installed"
  fi
  TAILS=$DAEMON_LOGS

  mkdir -p /run/munge /var/log/munge /var/lib/munge /run/mysqld /run/slurm \
           /var/spool/slurmctld /var/lib/slurm /etc/slurm
  local n
  for n in $NODES; do mkdir -p "/var/spool/slurmd-$n"; done
  chown munge:munge /run/munge /var/log/munge /var/lib/munge
  chown mysql:mysql /run/mysqld
  chown slurm:slurm /run/slurm /var/spool/slurmctld /var/lib/slurm
  chgrp slurm "$LOGDIR"; chmod 775 "$LOGDIR"   # slurmdbd/slurmctld chdir() there
  # log files the daemons open themselves after dropping privileges
  local f
  for f in munged.log:munge mariadbd.log:mysql slurmdbd.log:slurm slurmctld.log:slurm slurmd-n1.log:root slurmd-n2.log:root; do
    touch "$LOGDIR/${f%%:*}"; chown "${f##*:}" "$LOGDIR/${f%%:*}"
  done

  # ------------------------------------------------------------- 2. munge
  if [ ! -s /etc/munge/munge.key ]; then
    mkdir -p /etc/munge
    if command -v mungekey >/dev/null; then mungekey -c -f -k /etc/munge/munge.key
    else dd if=/dev/urandom of=/etc/munge/munge.key bs=1 count=1024 status=none; fi
  fi
  chown munge:munge /etc/munge /etc/munge/munge.key; chmod 700 /etc/munge; chmod 600 /etc/munge/munge.key
  if ! alive munged || ! (munge -n 2>/dev/null | unmunge >/dev/null 2>&1); then
    log "starting munged"
    rm -f /run/munge/munged.pid /run/munge/munge.socket.2 /run/munge/munge.socket.2.lock
    runuser -u munge -- /usr/sbin/munged --log-file="$LOGDIR/munged.log" 9>&- </dev/null >>"$LOGDIR/munged.out" 2>&1 ||
      die "munged failed to start"
    waitfor 10 munged sh -c 'munge -n | unmunge'
    record munged
  fi

  # ------------------------------------------------------------- 3. mariadb
  if [ ! -d /var/lib/mysql/mysql ]; then
    log "initialising mariadb datadir"
    mariadb-install-db --user=mysql --datadir=/var/lib/mysql >>"$LOGDIR/mariadbd.out" 2>&1 || die "mariadb-install-db failed"
  fi
  cat > /etc/mysql/mariadb.conf.d/99-foldhpc-slurm.cnf <<'EOF'
[mysqld]
bind-address=127.0.0.1
innodb_lock_wait_timeout=900
innodb_buffer_pool_size=256M
EOF
  local db_started=0
  if ! mysqladmin ping >/dev/null 2>&1; then
    log "starting mariadbd"
    rm -f /run/mysqld/mysqld.sock
    # mariadbd directly (mysqld_safe's logger pipe would keep a CI pipe open)
    setsid /usr/sbin/mariadbd --user=mysql --pid-file=/run/mysqld/mysqld.pid \
      --socket=/run/mysqld/mysqld.sock --log-error="$LOGDIR/mariadbd.log" 9>&- </dev/null >>"$LOGDIR/mariadbd.out" 2>&1 &
    waitfor 60 mariadbd mysqladmin ping
    waitfor 10 "mariadbd pid file" test -s /run/mysqld/mysqld.pid
    record mariadbd
    db_started=1
  fi
  if [ $db_started = 1 ] || ! alive slurmdbd; then
    mysql -e "CREATE DATABASE IF NOT EXISTS slurm_acct_db;
              CREATE USER IF NOT EXISTS 'slurm'@'localhost' IDENTIFIED BY '$DBPASS';
              ALTER USER 'slurm'@'localhost' IDENTIFIED BY '$DBPASS';
              GRANT ALL ON slurm_acct_db.* TO 'slurm'@'localhost';" || die "mariadb: creating slurm_acct_db failed"
  fi

  # ------------------------------------------------------------- 4. configs
  CHANGED=0
  # write_if_changed DEST MODE OWNER:GROUP  (content on stdin); sets CHANGED=1 if rewritten
  write_if_changed() {
    local tmp; tmp=$(mktemp); cat > "$tmp"
    if ! cmp -s "$tmp" "$1"; then install -m "$2" -o "${3%%:*}" -g "${3##*:}" "$tmp" "$1"; CHANGED=1; log "wrote $1"; fi
    rm -f "$tmp"
  }

  local MEM_MB GRES_LINE="" GRES_TYPES="" FAST="" NODE_LINES="" GRES_CONF="" idx=0 first
  # 80% of this host's memory, split evenly between the nodes (bookkeeping only: no cgroups)
  MEM_MB=$(awk -v n="$(echo $NODES | wc -w)" '/MemTotal/ {printf "%d", $2/1024*0.8/n}' /proc/meminfo)
  if [ "$GPUS" -gt 0 ]; then
    # gres File= must stat() as a character device, else CUDA_VISIBLE_DEVICES stays empty
    for ((i = 0; i < GPUS * $(echo $NODES | wc -w); i++)); do ln -sfn /dev/null /var/lib/slurm/fakegpu$i; done
    GRES_LINE=" Gres=gpu:$GPUS"; GRES_TYPES="GresTypes=gpu"
  fi
  for n in $NODES; do
    idx=$((idx + 1))
    NODE_LINES="${NODE_LINES}NodeName=$n NodeHostname=$H NodeAddr=127.0.0.1 Port=$((17000 + idx)) CPUs=$CPUS RealMemory=$MEM_MB$GRES_LINE State=UNKNOWN
"
    if [ "$GPUS" -gt 0 ]; then
      first=$(((idx - 1) * GPUS))
      if [ "$GPUS" = 1 ]; then GRES_CONF="${GRES_CONF}NodeName=$n Name=gpu File=/var/lib/slurm/fakegpu$first
"
      else GRES_CONF="${GRES_CONF}NodeName=$n Name=gpu File=/var/lib/slurm/fakegpu[$first-$((first + GPUS - 1))]
"
      fi
    fi
  done
  GRES_CONF=${GRES_CONF%$'\n'}   # the here-document adds the last newline
  local NODESET; NODESET=$(echo $NODES | tr ' ' ',')
  if [ "$PROFILE" = fast ]; then
    # cred_expire also sets how long a requeued job waits before it may start again
    # (default 120 s; 5 is the minimum accepted). Scheduler passes every second.
    FAST="AuthInfo=cred_expire=5
SchedulerParameters=bf_interval=1,sched_interval=1"
  fi

  write_if_changed /etc/slurm/slurmdbd.conf 600 slurm:slurm <<EOF
AuthType=auth/munge
DbdHost=localhost
DbdPort=6819
SlurmUser=slurm
LogFile=$LOGDIR/slurmdbd.log
PidFile=/run/slurm/slurmdbd.pid
StorageType=accounting_storage/mysql
StorageHost=localhost
StorageUser=slurm
StoragePass=$DBPASS
StorageLoc=slurm_acct_db
EOF
  local DBD_CHANGED=$CHANGED; CHANGED=0

  write_if_changed /etc/slurm/slurm.conf 644 root:root <<EOF
# generated by foldhpc tests/slurm/cluster.sh - two-node test cluster (n1, n2) on one host
# profile: $PROFILE
ClusterName=$CLUSTER
SlurmctldHost=$H(127.0.0.1)
SlurmUser=slurm
SlurmdUser=root
AuthType=auth/munge
CredType=cred/munge
$FAST
StateSaveLocation=/var/spool/slurmctld
SlurmdSpoolDir=/var/spool/slurmd-%n
SlurmctldPidFile=/run/slurm/slurmctld.pid
SlurmdPidFile=/run/slurm/slurmd-%n.pid
SlurmctldLogFile=$LOGDIR/slurmctld.log
SlurmdLogFile=$LOGDIR/slurmd-%n.log
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
SwitchType=switch/none
MpiDefault=none
MailProg=/bin/true
ReturnToService=2
SchedulerType=sched/backfill
SelectType=select/cons_tres
SelectTypeParameters=CR_Core_Memory
DefMemPerCPU=1000
JobRequeue=1
MinJobAge=600
KillWait=10
InactiveLimit=0
Waittime=0
AccountingStorageType=accounting_storage/slurmdbd
AccountingStorageHost=localhost
AccountingStorageTRES=gres/gpu
JobAcctGatherType=jobacct_gather/linux
JobAcctGatherFrequency=30
JobCompType=jobcomp/none
PreemptType=preempt/partition_prio
PreemptMode=REQUEUE
SlurmctldParameters=preempt_send_user_signal
SlurmdParameters=config_overrides
$GRES_TYPES
${NODE_LINES}PartitionName=debug Nodes=$NODESET Default=YES MaxTime=INFINITE State=UP PriorityTier=1 PreemptMode=REQUEUE GraceTime=20
PartitionName=high Nodes=$NODESET Default=NO MaxTime=INFINITE State=UP PriorityTier=10 PreemptMode=OFF
EOF
  if [ "$GPUS" -gt 0 ]; then
    write_if_changed /etc/slurm/gres.conf 644 root:root <<EOF
AutoDetect=off
$GRES_CONF
EOF
  elif [ -e /etc/slurm/gres.conf ]; then
    rm -f /etc/slurm/gres.conf; CHANGED=1
  fi
  local CONF_CHANGED=$CHANGED

  # ------------------------------------------------------------- 5. slurmdbd
  if [ "$DBD_CHANGED" = 1 ] && alive slurmdbd; then
    log "slurmdbd.conf changed: restarting slurmdbd"; stop_pid "$(cat /run/slurm/slurmdbd.pid)" slurmdbd
  fi
  if ! alive slurmdbd; then
    log "starting slurmdbd"
    /usr/sbin/slurmdbd 9>&- </dev/null >>"$LOGDIR/slurmdbd.out" 2>&1 || die "slurmdbd failed to start"
    waitfor 30 slurmdbd timeout 10 sacctmgr -n list cluster
    record slurmdbd
  fi
  if ! timeout 20 sacctmgr -n -P list cluster format=cluster | grep -qx "$CLUSTER"; then
    log "registering cluster $CLUSTER"
    timeout 20 sacctmgr -i add cluster "$CLUSTER" >/dev/null || die "sacctmgr add cluster failed"
  fi

  # ------------------------------------------------------------- 6. slurmctld + slurmds
  # the single slurmd of the old one-node layout (no -N; pidfile /run/slurm/slurmd.pid): its
  # node is gone from slurm.conf, so it always goes
  if alive slurmd; then
    log "stopping the single-node layout's slurmd (pid $(cat /run/slurm/slurmd.pid))"
    stop_pid "$(cat /run/slurm/slurmd.pid)" slurmd
  fi
  rm -f /run/slurm/slurmd.pid "$STATE/slurmd.pid"
  local d any=0
  for d in $SLURMDS slurmctld; do alive "$d" && any=1; done
  if [ "$CONF_CHANGED" = 1 ] && [ $any = 1 ]; then
    log "slurm.conf/gres.conf changed (profile=$PROFILE): restarting slurmctld and the slurmds"
    for d in $SLURMDS slurmctld; do
      if alive "$d"; then stop_pid "$(cat "$(pidfile "$d")")" "$(comm_of "$d")"; fi
    done
  fi
  if ! alive slurmctld; then
    log "starting slurmctld (profile=$PROFILE)"
    local clear=-c; [ "${FOLDHPC_SLURM_KEEP_STATE:-0}" = 1 ] && clear=""
    /usr/sbin/slurmctld $clear 9>&- </dev/null >>"$LOGDIR/slurmctld.out" 2>&1 || die "slurmctld failed to start"
    waitfor 30 slurmctld timeout 5 scontrol ping
    record slurmctld
  fi
  for n in $NODES; do
    if ! alive "slurmd-$n"; then
      log "starting slurmd -N $n"
      /usr/sbin/slurmd -N "$n" 9>&- </dev/null >>"$LOGDIR/slurmd.out" 2>&1 || die "slurmd -N $n failed to start"
      waitfor 10 "slurmd -N $n" alive "slurmd-$n"
      record "slurmd-$n"
    fi
  done
  local st
  for n in $NODES; do
    for ((i = 0; i < 300; i++)); do
      node_ok "$n" && break
      st=$(timeout 10 sinfo -h -n "$n" -o '%T' 2>/dev/null | head -1) || true
      case "$st" in down* | drain* | fail* | *'*') timeout 10 scontrol update nodename="$n" state=resume >/dev/null 2>&1 || true ;; esac
      sleep 0.1
    done
    node_ok "$n" || die "node $n not usable: $(timeout 10 sinfo -h -N -o '%N %T %E' 2>&1)"
  done
  trap - ERR
  log "cluster up (profile=$PROFILE): $(timeout 10 sinfo -h -N -o '%N %P %a %T' | tr '\n' ';')"
}

# ===================================================================== down
cmd_down() {
  [ "$(id -u)" = 0 ] || die "must run as root"
  mkdir -p "$STATE"
  exec 9>"$LOCK"
  flock -w 900 9 || die "could not lock $LOCK"
  local name f pid
  for name in $SLURMDS slurmd slurmctld slurmdbd mariadbd munged; do   # slurmd: old one-node layout
    f=$STATE/$name.pid
    [ -s "$f" ] || continue
    pid=$(cat "$f")
    if pid_alive "$pid" "$(comm_of "$name")"; then
      log "stopping $name (pid $pid)"
      stop_pid "$pid" "$(comm_of "$name")"
    else
      log "$name (pid $pid) not running"
    fi
    rm -f "$f"
  done
  rm -f /run/munge/munge.socket.2.lock
  log "done"
}

# ===================================================================== status
cmd_status() {
  local name pid mine rc=0 n
  for name in $DAEMONS; do
    pid=$(cat "$(pidfile "$name")" 2>/dev/null) || pid=""
    mine=""; [ -n "$pid" ] && [ "$(cat "$STATE/$name.pid" 2>/dev/null)" = "$pid" ] && mine=" (started by cluster.sh)"
    if alive "$name"; then printf '%-10s up    pid %s%s\n' "$name" "$pid" "$mine"
    else printf '%-10s DOWN\n' "$name"; rc=1; fi
  done
  if ! (munge -n 2>/dev/null | unmunge >/dev/null 2>&1); then echo "munge: credential round trip FAILED"; rc=1; fi
  if ! timeout 10 sacctmgr -n list cluster >/dev/null 2>&1; then echo "slurmdbd: sacctmgr cannot reach it"; rc=1; fi
  if timeout 5 scontrol ping >/dev/null 2>&1; then
    echo "profile:   $(sed -n 's/^# profile: //p' /etc/slurm/slurm.conf 2>/dev/null)"
    timeout 10 sinfo -N -o '%N %P %a %T %c %m %G' || rc=1
    for n in $NODES; do node_ok "$n" || { echo "node $n not usable"; rc=1; }; done
  else
    echo "slurmctld: scontrol ping FAILED"; rc=1
  fi
  [ $rc = 0 ] && echo "status: cluster usable" || echo "status: cluster NOT usable (logs: $LOGDIR)"
  return $rc
}

case ${1:-} in
  up) cmd_up ;;
  down) cmd_down ;;
  status) cmd_status ;;
  *) echo "usage: $0 up|down|status   (env: FOLDHPC_SLURM_PROFILE=fast|defaults, FOLDHPC_SLURM_CPUS, FOLDHPC_SLURM_GPUS, FOLDHPC_SLURM_KEEP_STATE, FOLDHPC_SLURM_NO_INSTALL)" >&2
     exit 2 ;;
esac
