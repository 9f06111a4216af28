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
# ray[data], pillow, webdataset, pyarrow, safetensors; s3fs for s3://) must already be installed on the nodes.
# MODEL_DIR, inputs, --images and OUT_DIR are store URLs (s3://bucket/...; credentials from each node's
# environment or instance role, extra settings with -- --storage-options '{"endpoint_url": ...}') or
# paths every node can read (and the writers can write): a shared filesystem. The model is read once
# by the driver and shipped to the actors through Ray's object store.
set -euo pipefail

if [[ $# -lt 3 ]]; then
  sed -n '2,15p' "$0" >&2
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
