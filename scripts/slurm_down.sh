#!/usr/bin/env bash
# Stop the single-node SLURM started by scripts/slurm_up.sh [STATE_DIR]: slurmd, slurmctld and
# (when slurm_up started it) munged, by the PIDs recorded in STATE_DIR.  Jobs still queued or
# running are cancelled first.  Safe to call when nothing runs.
set -uo pipefail

DIR=$(realpath -m "${1:-${HDLORA_SLURM_DIR:-/tmp/hdlora-slurm}}")
log() { echo "slurm_down: $*" >&2; }

if [ -f "$DIR/slurm.conf" ] && command -v scancel >/dev/null; then
    SLURM_CONF="$DIR/slurm.conf" timeout 10 scancel --full --user="$(id -un)" 2>/dev/null || true
fi

stop() {  # name: TERM, wait up to 10 s, then KILL
    local rec="$DIR/$1.pid.rec" pid
    [ -f "$rec" ] || return 0
    pid=$(cat "$rec")
    if kill -0 "$pid" 2>/dev/null; then
        kill -TERM "$pid" 2>/dev/null
        for _ in $(seq 100); do kill -0 "$pid" 2>/dev/null || break; sleep 0.1; done
        kill -0 "$pid" 2>/dev/null && kill -KILL "$pid" 2>/dev/null
        log "stopped $1 (pid $pid)"
    fi
    rm -f "$rec"
}

stop slurmd
stop slurmctld
stop munged
exit 0
