#!/usr/bin/env bash
# The prepared GPU check of issue 13, one command (at most 8 minutes on one H200):
#   benchmarks/gpu_check.sh               # on the GPU machine; results under benchmarks/results/
#   benchmarks/gpu_check.sh --cpu-smoke   # the CPU-runnable parts at tiny sizes (CI: tests/test_gpu_check_smoke.py)
# Other options (--out, --budget-s, --parts, --modes, --keep): benchmarks/gpu_check.py --help.
set -euo pipefail
cd "$(dirname "$0")/.."
# The first of python3/python that has torch (the GPU machine's image: python3; a bare `python` may lack it).
if [ -z "${PYTHON:-}" ]; then
    for candidate in python3 python; do
        if command -v "$candidate" >/dev/null && "$candidate" -c "import torch" 2>/dev/null; then
            PYTHON="$(command -v "$candidate")"
            break
        fi
    done
fi
: "${PYTHON:?no python3 or python with torch found: set PYTHON}"
export PYTHON
# A hard stop a little past the script's own budget, so a hang can never hold the machine.
exec timeout --kill-after=15 480 "$PYTHON" benchmarks/gpu_check.py "$@"
