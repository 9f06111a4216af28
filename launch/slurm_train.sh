#!/usr/bin/env bash
#SBATCH --job-name=itsim-train
#SBATCH --nodes=2
#SBATCH --ntasks-per-node=1
#SBATCH --gpus-per-node=8
#SBATCH --cpus-per-task=96
#SBATCH --mem=0
#SBATCH --time=24:00:00
#SBATCH --signal=TERM@300
#SBATCH --requeue
#SBATCH --output=%x-%j.out
#
# N nodes x 8 GPUs with `accelerate launch`, started once per node by srun (one task per node; each
# launcher starts one training process per GPU). Submit from the repository root, on a shared filesystem:
#
#   RUN=/shared/runs/f8k SHARDS=/shared/shards/flickr8k-299 sbatch --nodes 4 launch/slurm_train.sh [itsim.train flags]
#
#   RUN=s3://bucket/runs/f8k SHARDS=s3://bucket/shards/flickr8k-299 sbatch --nodes 4 launch/slurm_train.sh
#
# Environment: RUN, SHARDS (required; folders on the shared filesystem, or store URLs such as
# s3://bucket/prefix: then no filesystem is shared, each process stages its files on local disk under
# $TMPDIR and uploads them; credentials from the nodes' environment or instance role, an endpoint in
# ITSIM_STORAGE_OPTIONS; see launch/README.md, "Object stores"), CONFIG (TrainConfig YAML,
# default launch/flickr8k_gpu.yaml), GPUS_PER_NODE (default: SLURM_GPUS_ON_NODE, else 8),
# MASTER_PORT (default: derived from the job id), PYTHON (python3), DIST_TIMEOUT (600 s).
#
# Rank, master address and port come from SLURM: machine_rank = SLURM_NODEID (per task, inside srun),
# main_process_ip = the first host of SLURM_JOB_NODELIST, num_machines = SLURM_JOB_NUM_NODES.
# --signal=TERM@300 sends SIGTERM to the job steps 5 minutes before the time limit: the launcher
# forwards it to the training processes, which finish their step, write a checkpoint and stop.
# --resume auto makes a requeued (preempted) or resubmitted job continue from that checkpoint;
# chain jobs with `sbatch --dependency=afterany:JOBID launch/slurm_train.sh`.
# --kill-on-bad-exit: when one node's launcher fails, SLURM ends the others at once instead of
# leaving them to time out in a collective (--dist-timeout is the backstop).
# --cpus-per-task is passed to srun explicitly: since Slurm 22.05 srun no longer inherits sbatch's
# --cpus-per-task, and the task (the launcher, its 8 training processes and their DataLoader workers)
# would otherwise be confined to one CPU.
set -euo pipefail

: "${RUN:?set RUN to the run folder (on the shared filesystem, or an s3:// URL)}"
: "${SHARDS:?set SHARDS to the shard folder (on the shared filesystem, or an s3:// URL)}"
: "${SLURM_JOB_ID:?not inside a SLURM job: submit with sbatch}"
ITSIM_ROOT=${ITSIM_ROOT:-${SLURM_SUBMIT_DIR:-$PWD}}
CONFIG=${CONFIG:-$ITSIM_ROOT/launch/flickr8k_gpu.yaml}
ACCELERATE_CONFIG=$ITSIM_ROOT/launch/accelerate/multi_node.yaml
PYTHON=${PYTHON:-python3}
NNODES=$SLURM_JOB_NUM_NODES
GPUS_PER_NODE=${GPUS_PER_NODE:-${SLURM_GPUS_ON_NODE:-8}}
# Not `scontrol ... | head -n 1`: under pipefail, scontrol killed by SIGPIPE once head has exited (a race,
# likelier with many nodes) would end the script with status 141.
HOSTS=$(scontrol show hostnames "$SLURM_JOB_NODELIST")
MASTER_ADDR=${HOSTS%%$'\n'*}
MASTER_PORT=${MASTER_PORT:-$((20000 + SLURM_JOB_ID % 20000))}
DIST_TIMEOUT=${DIST_TIMEOUT:-600}
CPUS_PER_TASK=${SLURM_CPUS_PER_TASK:?sbatch --cpus-per-task is not set: every node needs its CPUs for the loaders}
export RUN SHARDS CONFIG ACCELERATE_CONFIG PYTHON NNODES GPUS_PER_NODE MASTER_ADDR MASTER_PORT DIST_TIMEOUT

echo "itsim: $NNODES nodes x $GPUS_PER_NODE GPUs, main process at $MASTER_ADDR:$MASTER_PORT, run $RUN" >&2

# The single quotes are intended: SLURM_NODEID differs per node and must expand inside each task.
# shellcheck disable=SC2016
srun --nodes="$NNODES" --ntasks-per-node=1 --cpus-per-task="$CPUS_PER_TASK" --kill-on-bad-exit=1 bash -c '
  exec "$PYTHON" -m accelerate.commands.launch --config_file "$ACCELERATE_CONFIG" \
    --num_machines "$NNODES" --num_processes "$((NNODES * GPUS_PER_NODE))" \
    --machine_rank "$SLURM_NODEID" --main_process_ip "$MASTER_ADDR" --main_process_port "$MASTER_PORT" \
    -m itsim.train --config "$CONFIG" --shards "$SHARDS" --out "$RUN" \
    --resume auto --dist-timeout "$DIST_TIMEOUT" "$@"' itsim-node "$@"
