# shellcheck shell=bash
# Helpers for slurm/extract.sh and slurm/extract_multinode.sh, sourced from the repository root.

# One extraction process per GPU SLURM gave this node. PYRAMID_NUM_PROCESSES overrides the count
# (a CPU-only node, or fewer processes than GPUs); a node with no GPU at all runs one process.
processes_on_node() {
    local count
    if [ -n "${PYRAMID_NUM_PROCESSES:-}" ]; then
        count=$PYRAMID_NUM_PROCESSES
    elif [ -n "${SLURM_GPUS_ON_NODE:-}" ]; then
        count=$SLURM_GPUS_ON_NODE
    elif [ -n "${CUDA_VISIBLE_DEVICES:-}" ]; then
        local ids
        IFS=, read -ra ids <<<"$CUDA_VISIBLE_DEVICES"
        count=${#ids[@]}
    elif command -v nvidia-smi >/dev/null 2>&1; then
        count=$(nvidia-smi -L 2>/dev/null | grep -c '^GPU')
    else
        count=0
    fi
    case $count in
        '' | *[!0-9]*) echo "pyramid: cannot read a process count from '$count'; using 1" >&2; echo 1 ;;
        0) echo 1 ;;
        *) echo "$count" ;;
    esac
}

# A TCP port free on this host now, for the rendezvous of the processes (29500, accelerate's default,
# clashes when two jobs share a node).
free_port() {
    python -c 'import socket; s = socket.socket(); s.bind(("", 0)); print(s.getsockname()[1])'
}

# The --output_dir among the extractor's arguments (--output_dir X or --output_dir=X; the last one wins,
# as in argparse), or the extractor's default.
#   usage: output_dir_of ARGS...
output_dir_of() {
    local dir=data/feature_pyramids
    while [ $# -gt 0 ]; do
        case $1 in
            --output_dir=*) dir=${1#--output_dir=} ;;
            --output_dir) if [ $# -gt 1 ]; then dir=$2; shift; fi ;;
        esac
        shift
    done
    echo "$dir"
}

# Run COMMAND in the background and return its status. SLURM sends SIGUSR1 to this shell shortly before
# the time limit (#SBATCH --signal=B:USR1@...): stop COMMAND with SIGTERM, so the extractor finishes the
# files in flight, wait for it, then requeue the job, whose next run skips the files that exist.
# STOP says where SIGTERM goes: "process", COMMAND itself; "steps", every process of the job's srun
# steps on all nodes (srun itself would turn a SIGTERM into SIGKILL for its tasks).
# The status is the run's own, from its line in OUTPUT_DIR/runs.jsonl (found by PYRAMID_RUN_ID, set here
# per job and restart): `accelerate launch` turns every failure into 1. Without a line (the run was
# killed, or refused before it could write one) it is COMMAND's. A run stopped by the signal (130, 143)
# is requeued; one that ended on its own (0; 3: some images are broken and a rerun will not fix them;
# 2: bad arguments) is not, so a finished job ends COMPLETED. Without a line, any status but 0 and 3
# after the signal counts as stopped.
#   usage: run_and_requeue_on_usr1 process|steps COMMAND...
run_and_requeue_on_usr1() {
    local stop=$1 pid='' status recorded stopped stop_requested=0 output_dir
    shift
    output_dir=$(output_dir_of "$@")
    PYRAMID_RUN_ID="slurm-$SLURM_JOB_ID-${SLURM_RESTART_COUNT:-0}"
    export PYRAMID_RUN_ID
    trap 'if [ "$stop_requested" = 0 ]; then
              stop_requested=1
              echo "pyramid: time limit near; stopping after the files in flight" >&2
              if [ "$stop" = steps ]; then scancel --signal=TERM "$SLURM_JOB_ID"
              elif [ -n "$pid" ]; then kill -TERM "$pid" 2>/dev/null; fi
          fi' USR1
    "$@" &
    pid=$!
    # A trapped signal interrupts `wait` with a status above 128: wait again until the command is gone.
    while :; do
        wait "$pid"
        status=$?
        kill -0 "$pid" 2>/dev/null || break
    done
    trap - USR1
    if recorded=$(python -m pyramid.runs status "$output_dir" "$PYRAMID_RUN_ID" 2>/dev/null); then
        if [ "$recorded" != "$status" ]; then
            echo "pyramid: the launcher returned $status; the run reported $recorded ($output_dir/runs.jsonl)" >&2
        fi
        status=$recorded
        case $status in 130 | 143) stopped=1 ;; *) stopped=0 ;; esac
    else
        case $status in 0 | 3) stopped=0 ;; *) stopped=1 ;; esac
    fi
    if [ "$stop_requested" = 1 ] && [ "$stopped" = 1 ]; then
        echo "pyramid: stopped with status $status; requeueing job $SLURM_JOB_ID to resume" >&2
        scontrol requeue "$SLURM_JOB_ID"
    fi
    return "$status"
}
