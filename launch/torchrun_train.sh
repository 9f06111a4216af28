#!/usr/bin/env bash
# Train with plain torchrun instead of `accelerate launch` (no Accelerate config file). itsim.train
# still uses Accelerate inside; Accelerate reads torchrun's RANK, WORLD_SIZE, LOCAL_RANK, MASTER_ADDR.
#
# One machine, all its GPUs:
#   launch/torchrun_train.sh --config launch/flickr8k_gpu.yaml --shards SHARDS --out RUN
# N machines: run on every machine, the same MASTER_ADDR (machine 0's address), its own NODE_RANK:
#   NNODES=2 NODE_RANK=0 MASTER_ADDR=10.0.0.1 launch/torchrun_train.sh --shards /shared/shards --out /shared/runs/r1
#   NNODES=2 NODE_RANK=1 MASTER_ADDR=10.0.0.1 launch/torchrun_train.sh --shards /shared/shards --out /shared/runs/r1
# CPU (2 processes, gloo): ACCELERATE_USE_CPU=1 NPROC_PER_NODE=2 launch/torchrun_train.sh ...
#
# Environment (defaults): NNODES (1), NODE_RANK (0), NPROC_PER_NODE (number of GPUs, else 1),
# MASTER_ADDR (127.0.0.1), MASTER_PORT (29500), PYTHON (python3), DIST_TIMEOUT (600 s: a dead peer
# ends the run with an error after at most this long).
# The run resumes from its newest complete checkpoint (--resume auto), so re-running the same command
# after a failure or preemption continues the run. --out must be on a filesystem all machines share.
# itsim must be importable (pip install -e . in the repository) on every machine.
set -euo pipefail

if [[ $# -eq 0 || $1 == -h || $1 == --help ]]; then
  sed -n '2,/^[^#]/{/^#/p}' "$0" >&2
  exit 2
fi

PYTHON=${PYTHON:-python3}
if [[ -z ${NPROC_PER_NODE:-} ]]; then
  if command -v nvidia-smi >/dev/null 2>&1; then
    NPROC_PER_NODE=$(nvidia-smi -L | grep -c '^GPU' || true)
  fi
  NPROC_PER_NODE=${NPROC_PER_NODE:-1}
  [[ $NPROC_PER_NODE -ge 1 ]] || NPROC_PER_NODE=1
fi

exec "$PYTHON" -m torch.distributed.run \
  --nnodes "${NNODES:-1}" \
  --node-rank "${NODE_RANK:-0}" \
  --nproc-per-node "$NPROC_PER_NODE" \
  --master-addr "${MASTER_ADDR:-127.0.0.1}" \
  --master-port "${MASTER_PORT:-29500}" \
  -m itsim.train --resume auto --dist-timeout "${DIST_TIMEOUT:-600}" "$@"
