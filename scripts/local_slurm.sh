#!/usr/bin/env bash
# A real one-node Slurm cluster on this machine (Debian/Ubuntu, run as root), for trying
# `--launcher slurm --partition cpu` without a cluster. See docs/local_slurm.md.
#
#   bash scripts/local_slurm.sh start    # install slurm-wlm + munge if missing, start munged/slurmctld/slurmd
#   bash scripts/local_slurm.sh status   # exit 0 and print the node's state if up, else exit 1
#   bash scripts/local_slurm.sh stop     # cancel all jobs, stop the daemons (munged only if we started it)
#
# Environment: EVIT_SLURM_DIR (state dir, default /var/lib/evit-slurm), EVIT_SLURM_PARTITION (default cpu),
# EVIT_SLURM_TIMEOUT (seconds start waits for the node to be idle, default 60).
#
# Everything lives under the state dir: slurm.conf, pidfiles, state/, spool/, log/ (slurmctld.log, slurmd.log,
# jobcomp.log; munged's own log is /var/log/munge/munged.log). The config is also written to
# /etc/slurm/slurm.conf so that sbatch, srun, squeue, scontrol find it without SLURM_CONF -- but only if that file
# is absent or was written by this script (its first line is MARK below); otherwise the clients need
# `export SLURM_CONF=<state dir>/slurm.conf`.
set -uo pipefail

STATE=${EVIT_SLURM_DIR:-/var/lib/evit-slurm}
PARTITION=${EVIT_SLURM_PARTITION:-cpu}
TIMEOUT=${EVIT_SLURM_TIMEOUT:-60}
CONF=$STATE/slurm.conf
ETC_CONF=/etc/slurm/slurm.conf
LOG=$STATE/log
MARK="# evit local_slurm.sh: generated, rewritten by 'scripts/local_slurm.sh start'"
MUNGE_KEY=/etc/munge/munge.key
MUNGE_RUN=/run/munge
NODE=$(hostname -s 2>/dev/null || hostname)
NODE=${NODE:-localhost}

say() { echo "local_slurm: $*"; }
die() { echo "local_slurm: $*" >&2; exit 1; }

alive() {  # alive PIDFILE: the pid in it runs
    local pid
    [[ -s $1 ]] && pid=$(<"$1") && [[ $pid =~ ^[0-9]+$ ]] && kill -0 "$pid" 2>/dev/null
}

munge_works() { command -v munge >/dev/null && munge -n 2>/dev/null | unmunge >/dev/null 2>&1; }

node_state() {  # the node's state as sinfo prints it (idle, mixed, alloc, down*, ...), empty if unreachable
    SLURM_CONF=$CONF timeout 10 sinfo -h -n "$NODE" -o %T 2>/dev/null | head -n1
}

install_packages() {
    local missing=0 t0 apt_log=/tmp/evit-slurm-apt.log
    for bin in slurmctld slurmd munged sbatch srun; do
        command -v "$bin" >/dev/null || [[ -x /usr/sbin/$bin ]] || missing=1
    done
    ((missing)) || return 0
    command -v apt-get >/dev/null || die "slurmctld/slurmd/munged missing and no apt-get to install slurm-wlm and munge"
    ((EUID == 0)) || die "slurmctld/slurmd/munged missing; installing them needs root"
    say "installing slurm-wlm and munge with apt-get (log: $apt_log)"
    t0=$SECONDS
    export DEBIAN_FRONTEND=noninteractive
    # The packages' postinst scripts try to start the daemons through invoke-rc.d; without systemd that is
    # refused harmlessly. Update the package lists only if the first try fails.
    if ! apt-get install -y -qq --no-install-recommends slurm-wlm munge >"$apt_log" 2>&1; then
        { apt-get update -qq && apt-get install -y -qq --no-install-recommends slurm-wlm munge; } >>"$apt_log" 2>&1 \
            || die "apt-get install slurm-wlm munge failed; see $apt_log"
    fi
    say "installed in $((SECONDS - t0)) s"
}

start_munge() {
    if munge_works; then
        return 0  # someone's munged (the system's, or ours from an earlier start) already answers
    fi
    if [[ ! -s $MUNGE_KEY ]]; then
        mkdir -p /etc/munge
        if command -v mungekey >/dev/null; then
            mungekey --create --keyfile="$MUNGE_KEY" 2>/dev/null || dd if=/dev/urandom of="$MUNGE_KEY" bs=1 count=1024 2>/dev/null
        else
            dd if=/dev/urandom of="$MUNGE_KEY" bs=1 count=1024 2>/dev/null
        fi
    fi
    # munged refuses a key that others can read or that is not its user's.
    chown munge:munge /etc/munge "$MUNGE_KEY" && chmod 0700 /etc/munge && chmod 0400 "$MUNGE_KEY" \
        || die "cannot set owner/mode of $MUNGE_KEY (is there a 'munge' user?)"
    mkdir -p "$MUNGE_RUN" /var/lib/munge /var/log/munge
    chown munge:munge "$MUNGE_RUN" /var/lib/munge /var/log/munge
    chmod 0755 "$MUNGE_RUN"
    rm -f "$MUNGE_RUN/munged.pid"
    # munged daemonizes itself and writes $MUNGE_RUN/munged.pid (as the munge user, so not into $STATE).
    # Its log is /var/log/munge/munged.log (the munge user cannot write under $STATE); its stderr goes to
    # $LOG/munged.start.log.
    if ! runuser -u munge -- /usr/sbin/munged >>"$LOG/munged.start.log" 2>&1; then
        die "munged failed to start; see $LOG/munged.start.log and /var/log/munge/munged.log"
    fi
    local i
    for ((i = 0; i < 50; i++)); do munge_works && break; sleep 0.1; done
    munge_works || die "munged started but munge -n | unmunge fails; see /var/log/munge/munged.log"
    cp "$MUNGE_RUN/munged.pid" "$STATE/munged.pid"  # the mark that stop may stop it: we started it
}

write_conf() {
    local cpus mem_mb headroom_mb real_mb
    cpus=$(nproc)
    mem_mb=$(awk '/^MemTotal:/ {print int($2 / 1024)}' /proc/meminfo)
    # Leave the OS some memory: 10% of it, at least 512 MiB. slurmd drains a node whose RealMemory exceeds
    # what it finds, so this must stay below `slurmd -C`'s RealMemory.
    headroom_mb=$((mem_mb / 10 > 512 ? mem_mb / 10 : 512))
    real_mb=$((mem_mb - headroom_mb))
    cat >"$CONF.new" <<EOF
$MARK
# A one-node cluster on this machine; state, spool and logs under $STATE. See docs/local_slurm.md.
ClusterName=evit-local
SlurmctldHost=$NODE(127.0.0.1)
SlurmUser=root
SlurmdUser=root
AuthType=auth/munge
CredType=cred/munge
MpiDefault=none
# No cgroups here (containers, no systemd): track job processes by their parent pids, bind nothing.
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
SelectType=select/cons_tres
SelectTypeParameters=CR_Core_Memory
# Without it a job that asks for no memory (sbatch without --mem) gets the whole node, one job at a time.
DefMemPerCPU=$((real_mb / cpus))
# A node that was DOWN (e.g. after a stop) comes back once slurmd registers.
ReturnToService=2
# Jobs may be requeued (scontrol requeue; submitit's Checkpointable requeues on timeout/preemption).
JobRequeue=1
# submitit's jobs ignore SIGTERM (they wait for the signal that asks them to checkpoint): a requeued or cancelled
# job is killed KillWait seconds after it, here 5 instead of Slurm's 30.
KillWait=5
StateSaveLocation=$STATE/state
SlurmdSpoolDir=$STATE/spool
SlurmctldPidFile=$STATE/slurmctld.pid
SlurmdPidFile=$STATE/slurmd.pid
SlurmctldLogFile=$LOG/slurmctld.log
SlurmdLogFile=$LOG/slurmd.log
SlurmctldDebug=info
SlurmdDebug=info
# No slurmdbd: no accounting database, so sacct has no data; finished jobs are appended to the jobcomp file
# and stay visible in squeue/scontrol for MinJobAge seconds.
JobAcctGatherType=jobacct_gather/none
AccountingStorageType=accounting_storage/none
JobCompType=jobcomp/filetxt
JobCompLoc=$LOG/jobcomp.log
MinJobAge=600
NodeName=$NODE NodeAddr=127.0.0.1 CPUs=$cpus RealMemory=$real_mb State=UNKNOWN
PartitionName=$PARTITION Nodes=$NODE Default=YES MaxTime=INFINITE State=UP
EOF
    mv "$CONF.new" "$CONF"
    if [[ ! -e $ETC_CONF ]] || head -n1 "$ETC_CONF" | grep -qxF "$MARK"; then
        mkdir -p /etc/slurm && cp "$CONF" "$ETC_CONF"
    else
        say "$ETC_CONF is not ours; left as is. Clients need: export SLURM_CONF=$CONF"
    fi
}

start_daemon() {  # start_daemon NAME: start slurmctld or slurmd unless its pidfile names a live process
    local name=$1 pidfile=$STATE/$1.pid i
    alive "$pidfile" && return 0
    rm -f "$pidfile"
    if ! "/usr/sbin/$name" -f "$CONF" >>"$LOG/$name.start.log" 2>&1; then
        die "$name failed to start; see $LOG/$name.log and $LOG/$name.start.log"
    fi
    for ((i = 0; i < 100; i++)); do alive "$pidfile" && return 0; sleep 0.1; done
    die "$name exited right after starting; see $LOG/$name.log and $LOG/$name.start.log"
}

cmd_start() {
    ((EUID == 0)) || die "start needs root (daemons run as root, config goes to $ETC_CONF)"
    local t0=$SECONDS state
    if alive "$STATE/slurmctld.pid" && alive "$STATE/slurmd.pid" && state=$(node_state) && [[ -n $state ]]; then
        say "already running: node $NODE is $state, partition $PARTITION (state dir $STATE)"
        return 0
    fi
    install_packages
    mkdir -p "$STATE/state" "$STATE/spool" "$LOG"
    start_munge
    # Rewrite the config only while no daemon reads it (a half-up cluster keeps its config).
    alive "$STATE/slurmctld.pid" || alive "$STATE/slurmd.pid" || write_conf
    start_daemon slurmctld
    start_daemon slurmd
    local deadline=$((SECONDS + TIMEOUT)) resumed=0
    while ((SECONDS < deadline)); do
        state=$(node_state)
        case $state in
            idle | mixed | alloc* | allocated | completing)
                say "up in $((SECONDS - t0)) s: node $NODE is $state, partition $PARTITION, logs in $LOG"
                return 0 ;;
            drain* | down | down~)  # a node drained by an earlier run: put it back once
                ((resumed)) || SLURM_CONF=$CONF scontrol update nodename="$NODE" state=resume >/dev/null 2>&1
                resumed=1 ;;
        esac
        alive "$STATE/slurmctld.pid" || die "slurmctld died while starting; see $LOG/slurmctld.log"
        alive "$STATE/slurmd.pid" || die "slurmd died while starting; see $LOG/slurmd.log"
        sleep 0.5
    done
    die "node $NODE not idle after ${TIMEOUT} s (state: ${state:-no answer from slurmctld}); see $LOG/slurmctld.log and $LOG/slurmd.log"
}

stop_pid() {  # stop_pid PIDFILE NAME: TERM the process, KILL it after 20 s; remove the pidfile
    local pidfile=$1 name=$2 pid i
    if alive "$pidfile"; then
        pid=$(<"$pidfile")
        kill -TERM "$pid" 2>/dev/null
        for ((i = 0; i < 200; i++)); do kill -0 "$pid" 2>/dev/null || break; sleep 0.1; done
        if kill -0 "$pid" 2>/dev/null; then
            kill -KILL "$pid" 2>/dev/null
            sleep 0.2
        fi
        say "stopped $name (pid $pid)"
    fi
    rm -f "$pidfile"
}

cmd_stop() {
    local i pids
    if alive "$STATE/slurmctld.pid"; then
        # Jobs would outlive slurmd (their slurmstepd keep running): cancel them first.
        if [[ -n $(SLURM_CONF=$CONF timeout 10 squeue -h -o %i 2>/dev/null) ]]; then
            SLURM_CONF=$CONF timeout 10 scancel --full --quiet --user=root 2>/dev/null
            SLURM_CONF=$CONF timeout 10 scancel --full --quiet 2>/dev/null
            for ((i = 0; i < 100; i++)); do
                [[ -z $(SLURM_CONF=$CONF timeout 10 squeue -h -t R,CG -o %i 2>/dev/null) ]] && break
                sleep 0.2
            done
            say "cancelled the queued jobs"
        fi
    fi
    stop_pid "$STATE/slurmd.pid" slurmd
    stop_pid "$STATE/slurmctld.pid" slurmctld
    # Steps left behind by a job that did not end (slurmd gone): theirs are the only slurmstepd on this machine
    # that can belong to this cluster's spool dir.
    pids=$(pgrep -x slurmstepd 2>/dev/null || true)
    if [[ -n $pids ]]; then
        kill -KILL $pids 2>/dev/null
        say "killed leftover slurmstepd: $pids"
    fi
    if [[ -s $STATE/munged.pid ]]; then  # only a munged this script started
        stop_pid "$STATE/munged.pid" munged
    fi
    return 0
}

cmd_status() {
    local state
    if alive "$STATE/slurmctld.pid" && alive "$STATE/slurmd.pid" && state=$(node_state) && [[ -n $state ]]; then
        echo "$NODE $state (partition $PARTITION, state dir $STATE)"
        return 0
    fi
    echo "local_slurm: not running (state dir $STATE)"
    return 1
}

case ${1:-} in
    start) cmd_start ;;
    stop) cmd_stop ;;
    status) cmd_status ;;
    *) echo "usage: bash $0 start|stop|status" >&2; exit 2 ;;
esac
