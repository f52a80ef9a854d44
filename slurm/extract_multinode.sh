#!/usr/bin/env bash
# DINOv2 feature pyramids on several SLURM nodes: one srun task per node runs `accelerate launch` for
# that node's GPUs, and all processes split one to-do list. Requeues itself before the time limit.
#
#   cd /path/to/repo                 # submit from the repository root: the job runs and logs there
#   sbatch slurm/extract_multinode.sh --model facebook/dinov2-large --output_dir data/pyr_large
#   sbatch --nodes=4 slurm/extract_multinode.sh     # more nodes, same script
#
# Every argument after the script name goes to extract_distributed.py unchanged. The nodes must share
# the repository, the input and the output directory (a shared filesystem), and reach the first node
# of the job on a TCP port (the rendezvous). When several independent one-node jobs would do, they are
# simpler: see docs/slurm.md.
#
#SBATCH --job-name=pyramid-extract-mn
#SBATCH --nodes=2
#SBATCH --ntasks-per-node=1          # one launcher per node; it starts one process per GPU
#SBATCH --gres=gpu:4                 # GPUs per node
#SBATCH --cpus-per-task=64           # 16 cores per GPU: see 'Node sizing' below
#SBATCH --mem=96G                    # 24 GB per GPU process: see 'Node sizing' below (per node)
#SBATCH --time=04:00:00
#SBATCH --signal=B:USR1@300          # SIGUSR1 to this script 5 minutes before the limit
#SBATCH --requeue
#SBATCH --open-mode=append           # a requeued run appends to the same log
#SBATCH --output=logs/%x-%j.out      # logs/ must exist where you submit (the repository ships it)
#
# Node sizing, per GPU (dinov2-base in fp16 does ~4,000 images/s on an H100; docs/gpu.md):
#   256x256 PNGs (python -m pyramid.prepare --resolution 256): 16 cores, ~10 decoding (~400 images/s each),
#     ~2 writing the 1 MB files, 1 feeding the GPU.
#   1024x1024 PNGs: decode-bound at ~35 images/s per core whatever the GPU: 16 cores give ~500 images/s,
#     more cores more (64 per GPU: ~2,000). Preparing the images at 256 is cheaper than cores.
#   Memory: ~1.5 GB for the main process and ~0.4 GB per decode worker, plus the page cache the files
#     pass through (it counts against --mem: past ~20% of it, writers wait for the disk).
#   /dev/shm: decode workers hand batches over in shared memory, (2 x workers + 2) batches of
#     batch x 150 KB each: ~300 MB per GPU process at batch 64 with 15 workers, twice that with --flip.
#     Containers often give 64 MB (docker: --shm-size=1g per GPU); the extractor warns when it is short.
#
# ---- EDIT for your cluster: delete the first '#' of a line to use it ------------------------------
##SBATCH --partition=gpu
##SBATCH --account=my_account

# ---- EDIT: activate the environment that has requirements.txt installed -----------------------------
# module load python/3.11
# source ~/venvs/pyramid/bin/activate            # or: conda activate pyramid

set -uo pipefail
cd "${SLURM_SUBMIT_DIR:?run this with sbatch}" || exit 2
if [ ! -f extract_distributed.py ]; then
    echo "error: $PWD has no extract_distributed.py; cd to the repository and sbatch slurm/extract_multinode.sh there" >&2
    exit 2
fi
# shellcheck source=slurm/common.sh
source slurm/common.sh

# This script runs on the job's first node, which hosts the rendezvous: its name and a port free on it.
PYRAMID_MAIN_ADDR=$(scontrol show hostnames "$SLURM_JOB_NODELIST" | head -n 1)
PYRAMID_MAIN_PORT=$(free_port)
export PYRAMID_MAIN_ADDR PYRAMID_MAIN_PORT
echo "pyramid: job $SLURM_JOB_ID run $((${SLURM_RESTART_COUNT:-0} + 1)): $SLURM_JOB_NUM_NODES node(s)," \
     "rendezvous at $PYRAMID_MAIN_ADDR:$PYRAMID_MAIN_PORT"

# The command in single quotes is evaluated by each task on its own node: the node's rank and GPU count
# are known only there. --num_processes is the total over all nodes (accelerate divides it by
# --num_machines), so every node must have the same GPU count. srun is given --cpus-per-task again
# because since SLURM 22.05 a step does not inherit it from the job.
# No --max_restarts here, unlike slurm/extract.sh: under static rendezvous a node's agent restarts only
# its own processes, which would then wait for the other nodes in vain. A failed process ends the step
# (--kill-on-bad-exit) with the run's record; a rerun finishes it (docs/scale.md#faults-inside-a-run).
# shellcheck disable=SC2016
run_and_requeue_on_usr1 steps srun --nodes="$SLURM_JOB_NUM_NODES" --ntasks-per-node=1 \
    --cpus-per-task="${SLURM_CPUS_PER_TASK:-1}" --kill-on-bad-exit=1 bash -c '
        source slurm/common.sh
        processes=$(processes_on_node)
        echo "pyramid: node $SLURM_NODEID ($(hostname)): $processes process(es)"
        exec accelerate launch --config_file accelerate_config.yaml \
            --num_machines "$SLURM_NNODES" --machine_rank "$SLURM_NODEID" \
            --num_processes "$((processes * SLURM_NNODES))" \
            --main_process_ip "$PYRAMID_MAIN_ADDR" --main_process_port "$PYRAMID_MAIN_PORT" \
            extract_distributed.py "$@"' pyramid-node "$@"
