#!/usr/bin/env bash
# A real Slurm cluster of two nodes on this one machine, for the slurm tests (tests/slurm) and CI. Needs root.
#
#   bash scripts/slurm_local.sh install    # apt-get install slurmctld slurmd slurm-client munge (Debian's build)
#   bash scripts/slurm_local.sh start      # install if needed, then munged + slurmctld + slurmd -N n1 and -N n2
#   bash scripts/slurm_local.sh stop       # ends every daemon that `start` started, by the pids it recorded
#   export SLURM_CONF=/tmp/genlip-slurm/slurm.conf   # then sbatch, squeue, scontrol talk to it
#
# Everything lives under SLURM_LOCAL_DIR (default /tmp/genlip-slurm): slurm.conf, state, spool, logs, pid files.
# `start` wipes its state, so job ids begin at 1 again: pass training.run_dir to every job, or it may resume an old
# run dir of the same job id. The nodes n1 and n2 are names only (they share this host and its CPUs; Debian's slurmd
# is built with multiple-slurmd support): a job that rendezvouses must use 127.0.0.1 (RDZV_HOST=127.0.0.1).
# Submit with --gpus-per-node=0 --cpus-per-task=<= CPUS>: the job script asks for 8 GPUs and 96 CPUs otherwise.
set -euo pipefail

NAME=slurm_local
BASE="${SLURM_LOCAL_DIR:-/tmp/genlip-slurm}"
CONF="$BASE/slurm.conf"
PIDS="$BASE/pids"
PORT="${SLURM_LOCAL_PORT:-16817}"       # slurmctld; slurmd n1, n2 listen on the two ports after it
die() { echo "[$NAME] error: $*" >&2; exit 1; }
say() { echo "[$NAME] $*"; }

install() {
    local t0=$SECONDS missing=()
    for bin in munged slurmctld slurmd sbatch; do command -v "$bin" >/dev/null || missing+=("$bin"); done
    if ((${#missing[@]} == 0)); then say "installed already"; return; fi
    ((EUID == 0)) || die "installing slurm needs root (apt-get); missing: ${missing[*]}"
    command -v apt-get >/dev/null || die "apt-get not found: install slurmctld slurmd slurm-client munge yourself"
    export DEBIAN_FRONTEND=noninteractive
    apt-get update -qq || die "apt-get update failed"
    apt-get install -y -qq --no-install-recommends slurmctld slurmd slurm-client munge >/dev/null \
        || die "apt-get install slurmctld slurmd slurm-client munge failed"
    say "installed slurmctld slurmd slurm-client munge in $((SECONDS - t0)) s"
}

# `cmd args...` in the background, detached from this shell, its pid appended to $PIDS.
spawn() {
    local log="$1"; shift
    setsid "$@" >>"$log" 2>&1 < /dev/null &
    echo "$! $1" >>"$PIDS"
}

write_conf() {
    local host cpus
    host="$(hostname -s)"
    cpus="$(nproc)"
    cat >"$CONF" <<EOF
# Written by scripts/slurm_local.sh: one host, two slurmd (n1, n2) on ports $((PORT + 1))-$((PORT + 2)).
ClusterName=genlip-local
SlurmctldHost=$host
SlurmctldPort=$PORT
SlurmUser=root
SlurmdUser=root
AuthType=auth/munge
AuthInfo=socket=$BASE/munge.socket
StateSaveLocation=$BASE/state
SlurmdSpoolDir=$BASE/spool/%n
SlurmctldPidFile=$BASE/slurmctld.pid
SlurmdPidFile=$BASE/slurmd-%n.pid
SlurmctldLogFile=$BASE/slurmctld.log
SlurmdLogFile=$BASE/slurmd-%n.log
MailProg=/bin/true
# proctrack/linuxproc follows each task's process tree, so a signal to a step reaches torchrun's workers too (they
# run in sessions of their own, which proctrack/pgid would miss). No cgroups in a container.
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
JobAcctGatherType=jobacct_gather/none
SelectType=select/cons_tres
SelectTypeParameters=CR_Core
SchedulerType=sched/backfill
MpiDefault=none
ReturnToService=2
KillWait=30
NodeName=n[1-2] NodeHostname=$host NodeAddr=127.0.0.1 Port=$((PORT + 1))-$((PORT + 2)) CPUs=$cpus State=UNKNOWN
PartitionName=debug Nodes=n[1-2] Default=YES MaxTime=INFINITE State=UP OverSubscribe=YES
EOF
}

wait_idle() {
    local deadline=$((SECONDS + ${1:-60})) out=""
    while ((SECONDS < deadline)); do
        out="$(SLURM_CONF="$CONF" sinfo -h -N -o '%N %t' 2>/dev/null || true)"
        if [[ "$(grep -c ' idle$' <<<"$out")" == 2 ]]; then say "nodes idle: $(tr '\n' ' ' <<<"$out")"; return; fi
        sleep 1
    done
    die "nodes not idle after ${1:-60} s (sinfo: ${out:-nothing}); logs in $BASE"
}

start() {
    ((EUID == 0)) || die "start needs root (slurmd runs jobs as their submitter and needs to become them)"
    [[ ! -s "$PIDS" ]] || die "$PIDS exists: a cluster is running (bash scripts/$NAME.sh stop first)"
    install
    local t0=$SECONDS
    if [[ -e "$BASE" && ! -f "$CONF" ]]; then
        die "$BASE exists and is not ours (no slurm.conf): set SLURM_LOCAL_DIR to a new directory"
    fi
    rm -rf "$BASE"
    mkdir -p "$BASE/state" "$BASE/spool/n1" "$BASE/spool/n2" /run/munge
    write_conf
    : >"$PIDS"
    # munged refuses to run as root without --force; its key comes with the Debian package.
    [[ -s /etc/munge/munge.key ]] || mungekey --create --keyfile=/etc/munge/munge.key
    spawn "$BASE/munged.log" munged --foreground --force --socket="$BASE/munge.socket" \
        --pid-file="$BASE/munged.pid" --seed-file="$BASE/munge.seed"
    local deadline=$((SECONDS + 20))
    until [[ -S "$BASE/munge.socket" ]]; do
        ((SECONDS < deadline)) || die "munged did not start (see $BASE/munged.log)"
        sleep 0.2
    done
    spawn "$BASE/slurmctld.out" slurmctld -D -i -f "$CONF"
    spawn "$BASE/slurmd-n1.out" slurmd -D -N n1 -f "$CONF"
    spawn "$BASE/slurmd-n2.out" slurmd -D -N n2 -f "$CONF"
    wait_idle 60
    say "started in $((SECONDS - t0)) s; export SLURM_CONF=$CONF"
}

stop() {
    [[ -f "$PIDS" ]] || { say "nothing to stop ($PIDS not found)"; return; }
    local pid name alive
    # Jobs first, so their steps end while slurmd is there to reap them.
    SLURM_CONF="$CONF" timeout 10 scancel --full --signal=KILL --state=RUNNING,PENDING --user="$(id -un)" \
        2>/dev/null || true
    # Daemons in reverse start order; slurmd waits for its running steps' stepd.
    tac "$PIDS" | while read -r pid name; do kill -TERM "$pid" 2>/dev/null || true; done
    local deadline=$((SECONDS + 20))
    while ((SECONDS < deadline)); do
        alive=0
        while read -r pid name; do kill -0 "$pid" 2>/dev/null && alive=1; done <"$PIDS"
        ((alive)) || break
        sleep 0.5
    done
    while read -r pid name; do
        if kill -0 "$pid" 2>/dev/null; then say "$name ($pid) ignored TERM: KILL"; kill -KILL "$pid" || true; fi
    done <"$PIDS"
    rm -f "$PIDS"
    say "stopped"
}

case "${1:-}" in
    install) install ;;
    start) start ;;
    stop) stop ;;
    *) die "usage: bash scripts/$NAME.sh install|start|stop" ;;
esac
