#!/usr/bin/env bash
# Build shards on a Ray cluster: `itsim build-shards --engine ray --ray-address auto`, submitted as a
# Ray job, so the driver runs on the cluster and every shard is a Ray task (one CPU each).
#
#   RAY_ADDRESS=http://HEAD:8265 launch/ray_build_shards.sh CAPTIONS IMAGES OUT [build-shards flags]
#
# e.g. RAY_ADDRESS=http://127.0.0.1:8265 launch/ray_build_shards.sh \
#        /shared/data/flickr8k/captions.txt /shared/data/flickr8k/images /shared/shards/flickr8k-299 \
#        --config launch/flickr8k_shards.yaml
#
# CAPTIONS, IMAGES and OUT must be paths every node sees (a shared filesystem): the tasks read the
# images and write the shards straight into OUT. This checkout is uploaded as the job's working dir,
# so the tasks run this version of itsim; the nodes need its dependencies installed. Re-running the
# same command resumes: complete shards are kept, missing ones are written. Needs `ray[default]` on
# the submitting machine (the `ray job` CLI). Without a cluster, drop `--engine ray` to use processes.
set -euo pipefail

if [[ $# -lt 3 ]]; then
  sed -n '2,/^[^#]/{/^#/p}' "$0" >&2
  exit 2
fi
CAPTIONS=$1
IMAGES=$2
OUT=$3
shift 3

cd "$(dirname "$0")/.."
exec ray job submit \
  --address "${RAY_ADDRESS:-http://127.0.0.1:8265}" \
  --working-dir . \
  --runtime-env-json '{"excludes": [".venv", ".git", "runs", "shared", "*.tar", "*.parquet"]}' \
  -- python -m itsim.cli build-shards --engine ray --ray-address auto \
  --captions "$CAPTIONS" --images "$IMAGES" --out "$OUT" "$@"
