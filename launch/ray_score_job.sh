#!/usr/bin/env bash
# Submit `itsim score` to an existing Ray cluster as a Ray job.
#
#   RAY_ADDRESS=http://HEAD:8265 launch/ray_score_job.sh MODEL_DIR OUT_DIR INPUT [INPUT ...] [-- EXTRA FLAGS]
#
# e.g. RAY_ADDRESS=http://10.0.0.5:8265 launch/ray_score_job.sh /shared/runs/r1/model /shared/scores/r1 \
#        '/shared/pairs/*.parquet' -- --images /shared/images --workers 8 --batch-size 512
#
# The job's driver runs on the cluster and joins it with `--address auto`. This checkout is uploaded
# as the job's working dir (so the cluster runs this version of itsim); its dependencies (torch,
# ray[data], pillow, webdataset, pyarrow, safetensors) must already be installed on the nodes.
# Inputs, --images and OUT_DIR must be paths every node can read (and the writers can write): a
# shared filesystem. The model is shipped to the actors through the object store.
set -euo pipefail

if [[ $# -lt 3 ]]; then
  sed -n '2,14p' "$0" >&2
  exit 2
fi
MODEL=$1
OUT=$2
shift 2
INPUTS=()
while [[ $# -gt 0 && $1 != "--" ]]; do INPUTS+=("$1"); shift; done
[[ ${1:-} == "--" ]] && shift

cd "$(dirname "$0")/.."
exec ray job submit \
  --address "${RAY_ADDRESS:-http://127.0.0.1:8265}" \
  --working-dir . \
  --runtime-env-json '{"excludes": [".venv", ".git", "runs", "shared", "*.tar", "*.parquet"]}' \
  -- python -m itsim.cli score --address auto --model "$MODEL" --output "$OUT" --input "${INPUTS[@]}" "$@"
