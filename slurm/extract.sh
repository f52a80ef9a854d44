#!/usr/bin/env bash
# DINOv2 feature pyramids on one SLURM node, one process per GPU; requeues itself before the time limit.
#
#   cd /path/to/repo                 # submit from the repository root: the job runs and logs there
#   sbatch slurm/extract.sh          # extract_distributed.py with its defaults
#   sbatch slurm/extract.sh --model facebook/dinov2-large --output_dir data/pyr_large
#
# Every argument after the script name goes to extract_distributed.py unchanged. With several GPUs a failed
# process is restarted once with the others (PYRAMID_MAX_RESTARTS=N for N times, 0 for none). Options given to
# sbatch before the script name override the directives below (sbatch --time=12:00:00 slurm/extract.sh).
# Shortly before the time limit SLURM sends SIGUSR1: the run stops after the files in flight and the
# job requeues itself; the next run skips every file that exists. A run that finished is not requeued.
#
#SBATCH --job-name=pyramid-extract
#SBATCH --nodes=1
#SBATCH --ntasks-per-node=1
#SBATCH --gres=gpu:4                 # the node's GPUs: one extraction process each
#SBATCH --cpus-per-task=64           # 16 cores per GPU: see 'Node sizing' below
#SBATCH --mem=96G                    # 24 GB per GPU process: see 'Node sizing' below
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
    echo "error: $PWD has no extract_distributed.py; cd to the repository and sbatch slurm/extract.sh there" >&2
    exit 2
fi
# shellcheck source=slurm/common.sh
source slurm/common.sh

processes=$(processes_on_node)
echo "pyramid: job $SLURM_JOB_ID run $((${SLURM_RESTART_COUNT:-0} + 1)) on $(hostname): $processes process(es)"
if [ "$processes" -eq 1 ]; then
    # One process needs no launcher; accelerate's would neither pass SIGTERM on nor keep the exit status.
    run_and_requeue_on_usr1 process python extract_distributed.py "$@"
else
    # torchrun's own restarts: a process that fails (an error, a stuck or killed process) reruns the
    # node's processes, which finish the run (docs/scale.md#faults-inside-a-run).
    run_and_requeue_on_usr1 process accelerate launch --config_file accelerate_config.yaml \
        --num_processes "$processes" --main_process_port "$(free_port)" \
        --max_restarts "${PYRAMID_MAX_RESTARTS:-1}" extract_distributed.py "$@"
fi
