#!/usr/bin/env bash
# The one-command GPU acceptance run (see benchmarks/gpu_check.py); target: under 8 minutes on one H200 (not yet run on one).
#   benchmarks/gpu_check.sh [--out gpu_check.json] [--steps 300]
# PYTHON (default: .venv/bin/python if present, else python3) runs it; the JSON and a Markdown table are written.
set -euo pipefail
here=$(cd "$(dirname "$0")" && pwd)
PYTHON=${PYTHON:-$( [[ -x "$here/../.venv/bin/python" ]] && echo "$here/../.venv/bin/python" || echo python3 )}
exec "$PYTHON" "$here/gpu_check.py" "$@"
