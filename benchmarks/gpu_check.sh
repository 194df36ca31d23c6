#!/usr/bin/env bash
# Run the GPU check (benchmarks/gpu_check.py) from the repository root; the JSON summary goes to
# gpu_check.json unless --out is given. Extra arguments pass through (--device cuda:1, --quick, --strict).
set -euo pipefail
cd "$(dirname "$0")/.."
case " $* " in *" --out "*) exec python benchmarks/gpu_check.py "$@" ;; esac
exec python benchmarks/gpu_check.py --out gpu_check.json "$@"
