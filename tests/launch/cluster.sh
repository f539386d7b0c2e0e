#!/usr/bin/env bash
# A throwaway Slurm cluster on loopback for the tests: slurmctld + NNODES fake nodes (`slurmd -N nI`), all on
# 127.0.0.1, auth/none, as the current user, everything (config, state, spool, logs) under DIR.
#   cluster.sh start DIR [NNODES]    writes DIR/slurm.conf, starts the daemons, waits until every node is idle
#   cluster.sh stop DIR              SIGTERM to the daemons this script started, SIGKILL after 5 s
# Ports: CTLD_PORT (slurmctld) and NODE_PORT0.. (one per node). Clients need SLURM_CONF=DIR/slurm.conf.
set -euo pipefail
action=$1; D=$(readlink -f "${2:?usage: cluster.sh start|stop DIR [NNODES]}"); N=${3:-2}
export SLURM_CONF=$D/slurm.conf
start() {
  mkdir -p "$D"/state "$D"/log "$D"/run
  local port0=${NODE_PORT0:-18901} user host
  user=$(id -un); host=$(hostname -s)
  for i in $(seq 1 "$N"); do mkdir -p "$D/spool/n$i"; done
  # NoInAddrAny: every daemon listens on 127.0.0.1 only. KillWait: the grace between SIGTERM and SIGKILL
  # on scancel and at the time limit (a checkpoint has to fit in it). config_overrides: each fake node has
  # NODE_CPUS CPUs whatever the machine has (`nproc` would also follow OMP_NUM_THREADS).
  cat > "$SLURM_CONF" <<CONF
ClusterName=megaswift-test
SlurmctldHost=$host(127.0.0.1)
SlurmUser=$user
SlurmdUser=$user
SlurmdParameters=config_overrides
AuthType=auth/none
CredType=cred/none
CommunicationParameters=NoInAddrAny,NoCtldInAddrAny
SlurmctldPort=${CTLD_PORT:-18817}
StateSaveLocation=$D/state
SlurmdSpoolDir=$D/spool/%n
SlurmctldPidFile=$D/run/slurmctld.pid
SlurmdPidFile=$D/run/slurmd-%n.pid
SlurmctldLogFile=$D/log/slurmctld.log
SlurmdLogFile=$D/log/slurmd-%n.log
MailProg=/bin/true
MpiDefault=none
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
SelectType=select/cons_tres
SelectTypeParameters=CR_Core
SchedulerType=sched/backfill
SwitchType=switch/none
JobCompType=jobcomp/none
JobAcctGatherType=jobacct_gather/none
AccountingStorageType=accounting_storage/none
ReturnToService=2
InactiveLimit=0
MinJobAge=300
KillWait=30
Waittime=0
NodeName=n[1-$N] NodeHostname=$host NodeAddr=127.0.0.1 Port=$port0-$((port0 + N - 1)) CPUs=${NODE_CPUS:-4} RealMemory=1000 State=UNKNOWN
PartitionName=debug Nodes=ALL Default=YES MaxTime=INFINITE State=UP OverSubscribe=NO
CONF
  setsid slurmctld -D -f "$SLURM_CONF" > "$D/log/ctld.out" 2>&1 < /dev/null &
  echo $! > "$D/run/ctld.mypid"
  for i in $(seq 1 "$N"); do
    setsid slurmd -D -f "$SLURM_CONF" -N "n$i" > "$D/log/slurmd-n$i.out" 2>&1 < /dev/null &
    echo $! > "$D/run/slurmd-n$i.mypid"
  done
  for t in $(seq 1 300); do  # 30 s; a daemon that died (bad config, busy port) fails at once, with its log
    for f in "$D"/run/*.mypid; do
      kill -0 "$(cat "$f")" 2> /dev/null && continue
      echo "$(basename "$f" .mypid) died" >&2; tail -n 20 "$D"/log/*.out >&2; exit 1
    done
    # (the controller that answers must be this one, not another cluster's on the same port)
    if timeout 2 scontrol show config 2> /dev/null | grep -q "^StateSaveLocation *= $D/state\$" &&
      [ "$(timeout 2 sinfo -h -N -t idle -o %N 2> /dev/null | wc -l)" -ge "$N" ]; then
      echo "slurm up: $N nodes idle after $((t / 10)).$((t % 10)) s"; return 0
    fi
    sleep 0.1
  done
  echo "slurm did not come up in 30 s" >&2; tail -n 20 "$D"/log/*.out >&2; exit 1
}
stop() {
  local f p
  for f in "$D"/run/*.mypid; do [ -f "$f" ] && kill "$(cat "$f")" 2> /dev/null || true; done
  for f in "$D"/run/*.mypid; do
    [ -f "$f" ] || continue
    p=$(cat "$f")
    for _ in $(seq 1 50); do kill -0 "$p" 2> /dev/null || break; sleep 0.1; done
    kill -0 "$p" 2> /dev/null && kill -9 "$p" 2> /dev/null || true  # slurmd can hang on SIGTERM
    rm -f "$f"
  done
}
case $action in start) start ;; stop) stop ;; *) echo "unknown action $action" >&2; exit 2 ;; esac
