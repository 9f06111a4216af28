#!/usr/bin/env bash
# The Flickr8k recipe on a CPU machine, as recorded in docs/results.md:
# val list (1,000 images: the itm_dev.tsv images of this copy + seeded others) -> shards (96 px) ->
# train (launch/flickr8k_cpu.yaml: ITC + ITM) -> eval (retrieval ranked by the contrastive vectors, the
# top 20 re-ranked by the head; itm_dev.tsv scored by the head).
#   launch/flickr8k_cpu.sh [FLICKR8K_DIR] [WORK_DIR]
set -euo pipefail
DATA=${1:-../shared/data/flickr8k}
WORK=${2:-runs/flickr8k}
ITSIM=${ITSIM:-.venv/bin/itsim}
PYTHON=${PYTHON:-.venv/bin/python}

mkdir -p "$WORK"
"$PYTHON" launch/flickr8k_val_list.py "$DATA" "$WORK/val1000.txt" 1000 0
"$ITSIM" build-shards --captions "$DATA/captions.txt" --images "$DATA/images" --out "$WORK/shards96" \
    --image-size 96 --val-images "$WORK/val1000.txt" --splits 1,0,0 --shard-size 500 --min-count 3

# One OpenMP thread: on a busy 2-core machine oversubscribed threads spin-wait each other.
OMP_NUM_THREADS=${OMP_NUM_THREADS:-1} "$ITSIM" train --config launch/flickr8k_cpu.yaml \
    --shards "$WORK/shards96" --out "$WORK/run" --resume auto

"$ITSIM" eval --model "$WORK/run/model" --shards "$WORK/shards96" --split val \
    --pairs "$DATA/itm_dev.tsv" --images "$DATA/images" --out "$WORK/run/eval" --rank-by itc --rerank 20
