#!/usr/bin/env bash
# A real local Slurm cluster with 2 emulated nodes (n1, n2) on this one machine.
#
#   scripts/slurm_local.sh install            # apt-get slurmctld slurmd slurm-client munge (root)
#   scripts/slurm_local.sh start  [STATE_DIR] # prints `export SLURM_CONF=...` on stdout
#   scripts/slurm_local.sh stop   [STATE_DIR]
#   scripts/slurm_local.sh status [STATE_DIR]
#
#   eval "$(scripts/slurm_local.sh start)" && sbatch job.sbatch
#
# Everything (slurm.conf, state, spool, logs, pid files) lives in STATE_DIR
# (default /tmp/dpo-dist-slurm); /etc/slurm is never written, so clients need
# SLURM_CONF=STATE_DIR/slurm.conf in their environment (start prints it; jobs
# inherit it through sbatch's default --export=ALL).
#
# Knobs (environment): SLURM_LOCAL_CTLD_PORT (16817), SLURM_LOCAL_NODE_PORT (17001; n2 uses +1),
# SLURM_LOCAL_CPUS (2 per node), SLURM_LOCAL_MEM_MB (8000 per node),
# SLURM_LOCAL_AUTH (auto|munge|none; auto tries munge, then falls back to auth/none),
# SLURM_LOCAL_TIMEOUT (30 s to wait for both nodes idle),
# SLURM_LOCAL_CRED_EXPIRE (10 s; also the delay before a requeued job may restart),
# SLURM_LOCAL_SLURMD_TIMEOUT (300 s: how long slurmctld waits on a silent slurmd before it marks
# the node DOWN and requeues its jobs; the node-loss test's own cluster uses a short one).
# All diagnostics go to stderr; stdout carries only the export line.
set -euo pipefail

CMD=${1:-}
STATE_DIR=${2:-${SLURM_LOCAL_STATE_DIR:-/tmp/dpo-dist-slurm}}
CTLD_PORT=${SLURM_LOCAL_CTLD_PORT:-16817}
NODE_PORT=${SLURM_LOCAL_NODE_PORT:-17001}
NCPUS=${SLURM_LOCAL_CPUS:-2}
MEM_MB=${SLURM_LOCAL_MEM_MB:-8000}
AUTH=${SLURM_LOCAL_AUTH:-auto}
TIMEOUT=${SLURM_LOCAL_TIMEOUT:-30}
CRED_EXPIRE=${SLURM_LOCAL_CRED_EXPIRE:-10}
SLURMD_TIMEOUT=${SLURM_LOCAL_SLURMD_TIMEOUT:-300}
NODES=(n1 n2)
PLUGIN_DIR=/usr/lib/x86_64-linux-gnu/slurm-wlm
CONF=$STATE_DIR/slurm.conf
MUNGE_SOCKET=/run/munge/munge.socket.2

log() { echo "slurm_local: $*" >&2; }
die() { log "ERROR: $*"; exit 1; }
have() { command -v "$1" >/dev/null 2>&1; }
# slurm and munge daemons live in /usr/sbin, which a non-login root shell may lack on PATH
export PATH="$PATH:/usr/sbin:/sbin"

alive() { [[ -f $1 ]] && local p && p=$(cat "$1" 2>/dev/null) && [[ -n $p ]] && kill -0 "$p" 2>/dev/null; }

do_install() {
    if have sbatch && have slurmctld && have slurmd; then
        log "slurm already installed ($(slurmd -V 2>/dev/null || echo '?'))"
        return 0
    fi
    [[ $(id -u) -eq 0 ]] || die "slurm is not installed and we are not root: cannot apt-get install"
    have apt-get || die "slurm is not installed and apt-get is missing"
    export DEBIAN_FRONTEND=noninteractive
    local pkgs=(slurmctld slurmd slurm-client munge)
    local opts=(-y -q --no-install-recommends -o Dpkg::Options::=--force-confdef -o Dpkg::Options::=--force-confold)
    log "apt-get install ${pkgs[*]}"
    if ! apt-get install "${opts[@]}" "${pkgs[@]}" >&2; then
        log "install failed; running apt-get update and retrying"
        apt-get update -q >&2 || die "apt-get update failed"
        apt-get install "${opts[@]}" "${pkgs[@]}" >&2 || die "apt-get install ${pkgs[*]} failed"
    fi
    have sbatch && have slurmctld && have slurmd || die "slurm binaries still missing after install"
}

munge_ok() { have munge && have unmunge && munge -n -S "$MUNGE_SOCKET" 2>/dev/null | unmunge -S "$MUNGE_SOCKET" >/dev/null 2>&1; }

# Sets AUTH_LINES. Uses a munged already running if there is one; otherwise starts one and
# records that in STATE_DIR/munged.started so `stop` stops only a munged that we started.
setup_auth() {
    if [[ $AUTH != none ]]; then
        if munge_ok; then
            AUTH_LINES=$'AuthType=auth/munge\nCredType=cred/munge'
            return 0
        fi
        if [[ -x /usr/sbin/munged && $(id -u) -eq 0 ]] && getent passwd munge >/dev/null; then
            if [[ ! -s /etc/munge/munge.key ]]; then
                install -d -o munge -g munge -m 0700 /etc/munge
                if have mungekey; then
                    mungekey --create --keyfile=/etc/munge/munge.key >&2 || true
                fi
                [[ -s /etc/munge/munge.key ]] || dd if=/dev/urandom of=/etc/munge/munge.key bs=1 count=1024 status=none
                chown munge:munge /etc/munge/munge.key && chmod 0400 /etc/munge/munge.key
            fi
            install -d -o munge -g munge -m 0755 /run/munge
            install -d -o munge -g munge -m 0700 /var/log/munge /var/lib/munge 2>/dev/null || true
            log "starting munged"
            if runuser -u munge -- /usr/sbin/munged >&2 9>&-; then
                for _ in $(seq 50); do munge_ok && break; sleep 0.1; done
            fi
            if munge_ok; then
                cp /run/munge/munged.pid "$STATE_DIR/munged.started" 2>/dev/null || echo started >"$STATE_DIR/munged.started"
                AUTH_LINES=$'AuthType=auth/munge\nCredType=cred/munge'
                return 0
            fi
        fi
        [[ $AUTH == munge ]] && die "munge requested but munged could not be started"
        log "munge unavailable: falling back to auth/none"
    fi
    [[ -f $PLUGIN_DIR/auth_none.so && -f $PLUGIN_DIR/cred_none.so ]] || [[ ! -d $PLUGIN_DIR ]] ||
        die "neither munge nor the auth_none/cred_none plugins are available"
    AUTH_LINES=$'AuthType=auth/none\nCredType=cred/none'
}

write_conf() {
    local last_port=$((NODE_PORT + ${#NODES[@]} - 1))
    cat >"$CONF.tmp" <<EOF
# Written by scripts/slurm_local.sh: 2 emulated nodes on one machine (multiple-slurmd build).
ClusterName=dpodist
SlurmctldHost=localhost
SlurmctldPort=$CTLD_PORT
SlurmUser=root
SlurmdUser=root
$AUTH_LINES
# cred_expire also sets how long a requeued job waits before it may start again (default 120 s)
AuthInfo=cred_expire=$CRED_EXPIRE
StateSaveLocation=$STATE_DIR/ctld
SlurmdSpoolDir=$STATE_DIR/spool/%n
SlurmctldPidFile=$STATE_DIR/slurmctld.pid
SlurmdPidFile=$STATE_DIR/slurmd-%n.pid
SlurmctldLogFile=$STATE_DIR/log/slurmctld.log
SlurmdLogFile=$STATE_DIR/log/slurmd-%n.log
MailProg=/bin/true
SlurmctldDebug=info
SlurmdDebug=info
SlurmdParameters=config_overrides
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
MpiDefault=none
SwitchType=switch/none
SelectType=select/cons_tres
SelectTypeParameters=CR_CPU
SchedulerType=sched/backfill
# main scheduling loop every 2 s (default 60): a requeued job starts soon after its BeginTime
SchedulerParameters=sched_interval=2,bf_interval=2
JobAcctGatherType=jobacct_gather/none
AccountingStorageType=accounting_storage/none
JobCompType=jobcomp/none
ReturnToService=2
MinJobAge=300
KillWait=5
InactiveLimit=0
SlurmctldTimeout=60
SlurmdTimeout=$SLURMD_TIMEOUT
MessageTimeout=10
JobRequeue=1
NodeName=n[1-${#NODES[@]}] NodeHostname=localhost NodeAddr=127.0.0.1 Port=[$NODE_PORT-$last_port] CPUs=$NCPUS RealMemory=$MEM_MB State=UNKNOWN
# Jobs share the nodes' CPUs (all the nodes are this one machine): a job requeued onto fewer nodes
# does not wait for another test's job to leave the CPUs it wants (seen: 97 s)
PartitionName=debug Nodes=ALL Default=YES MaxTime=INFINITE State=UP OverSubscribe=FORCE:4
EOF
    mv "$CONF.tmp" "$CONF"
}

cluster_up() {
    alive "$STATE_DIR/slurmctld.pid" || return 1
    local n
    for n in "${NODES[@]}"; do alive "$STATE_DIR/slurmd-$n.pid" || return 1; done
    [[ $(SLURM_CONF=$CONF sinfo -h -N -t idle,mix,alloc -o '%N' 2>/dev/null | sort -u | wc -l) -eq ${#NODES[@]} ]]
}

print_logs() {
    local f
    for f in "$STATE_DIR"/log/*.log; do
        [[ -f $f ]] || continue
        echo "----- $f (last 40 lines)" >&2
        tail -n 40 "$f" >&2
    done
}

do_start() {
    [[ $(id -u) -eq 0 ]] || die "start needs root (SlurmUser=root)"
    have slurmctld && have slurmd && have sinfo || die "slurm is not installed (run: $0 install)"
    if cluster_up; then
        log "cluster already running in $STATE_DIR"
        echo "export SLURM_CONF=$CONF"
        return 0
    fi
    do_stop quiet
    mkdir -p "$STATE_DIR/ctld" "$STATE_DIR/log"
    local n
    for n in "${NODES[@]}"; do mkdir -p "$STATE_DIR/spool/$n"; done
    setup_auth
    write_conf
    export SLURM_CONF=$CONF
    log "starting slurmctld (port $CTLD_PORT) and slurmd ${NODES[*]} (ports $NODE_PORT..)"
    # -c: start clean (no jobs from an earlier run); -i: ignore unreadable state
    slurmctld -c -i -f "$CONF" >&2 9>&- || { print_logs; die "slurmctld failed to start"; }
    for n in "${NODES[@]}"; do
        slurmd -N "$n" -f "$CONF" >&2 9>&- || { print_logs; die "slurmd -N $n failed to start"; }
    done
    local t0=$SECONDS idle
    while :; do
        idle=$(sinfo -h -N -t idle -o '%N' 2>/dev/null | sort -u | wc -l || true)
        [[ $idle -eq ${#NODES[@]} ]] && break
        if ((SECONDS - t0 >= TIMEOUT)); then
            sinfo -N -l >&2 || true
            print_logs
            die "nodes not idle after ${TIMEOUT}s"
        fi
        sleep 0.3
    done
    log "cluster up in $((SECONDS - t0))s: $(sinfo -h -N -o '%N=%t' | tr '\n' ' ')"
    echo "export SLURM_CONF=$CONF"
}

# TERM the daemons of the given pid files at once (each takes 1-2 s to exit), wait up to 10 s,
# then KILL what is left
stop_pidfiles() {
    local f p pids=()
    for f in "$@"; do
        [[ -f $f ]] || continue
        p=$(cat "$f" 2>/dev/null || true)
        if [[ -n $p ]] && kill -0 "$p" 2>/dev/null; then
            kill -TERM "$p" 2>/dev/null || true
            pids+=("$p")
        fi
        rm -f "$f"
    done
    for _ in $(seq 100); do
        local left=()
        for p in "${pids[@]}"; do kill -0 "$p" 2>/dev/null && left+=("$p"); done
        pids=("${left[@]}")
        ((${#pids[@]} == 0)) && return 0
        sleep 0.1
    done
    kill -KILL "${pids[@]}" 2>/dev/null || true
}

do_stop() {
    local quiet=${1:-}
    [[ -f $CONF ]] || { [[ -n $quiet ]] || log "nothing to stop in $STATE_DIR"; return 0; }
    export SLURM_CONF=$CONF
    # cancel jobs of this cluster so that no slurmstepd / job processes stay behind
    if alive "$STATE_DIR/slurmctld.pid"; then
        local jobs
        jobs=$(squeue -h -o '%i' 2>/dev/null || true)
        if [[ -n $jobs ]]; then
            # shellcheck disable=SC2086
            scancel $jobs 2>/dev/null || true
            for _ in $(seq 50); do
                [[ -z $(squeue -h -t running,completing -o '%i' 2>/dev/null || true) ]] && break
                sleep 0.2
            done
        fi
    fi
    local n files=("$STATE_DIR/slurmctld.pid")
    for n in "${NODES[@]}"; do files+=("$STATE_DIR/slurmd-$n.pid"); done
    # stop munged only if this script started it
    [[ -f $STATE_DIR/munged.started ]] && files+=(/run/munge/munged.pid)
    stop_pidfiles "${files[@]}"
    rm -f "$STATE_DIR/munged.started"
    [[ -n $quiet ]] || log "stopped cluster in $STATE_DIR"
}

do_status() {
    [[ -f $CONF ]] || die "no cluster config in $STATE_DIR"
    SLURM_CONF=$CONF sinfo -N -l
    SLURM_CONF=$CONF squeue
}

# serialize start/stop of one STATE_DIR (e.g. several pytest workers); daemons get 9>&-
# so that they do not hold the lock
locked() {
    mkdir -p "$STATE_DIR"
    if have flock; then
        exec 9>"$STATE_DIR/.lock"
        flock -w 120 9 || die "could not lock $STATE_DIR/.lock"
    fi
    "$@"
}

case $CMD in
    install) do_install ;;
    start) locked do_start ;;
    stop) locked do_stop ;;
    status) do_status ;;
    *) echo "usage: $0 {install|start|stop|status} [STATE_DIR]" >&2; exit 2 ;;
esac
