#!/usr/bin/env bash
# GPU checks of kd_lib, for a machine with CUDA (CI has none: there CPU bf16 autocast stands in, tests/test_precision.py).
#   1. every `#| cuda` notebook cell (nbdev-test --flags cuda, only the notebooks that have one) and pytest -m cuda tests
#   2. one bf16 step of every stage against fp32 (bench/gpu_stage_steps.py)
#   3. fused vs plain KD loss at vocabulary 128k: peak torch.cuda.max_memory_allocated and time (bench/bench_losses.py)
# Usage: bench/gpu_check.sh        (from anywhere; PYTHON=... picks the interpreter, default .venv/bin/python)
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-.venv/bin/python}
export PYTHONPATH=$PWD
if ! "$PY" -c 'import sys, torch; sys.exit(0 if torch.cuda.is_available() else 1)'; then
    echo "gpu_check.sh: no CUDA device: torch.cuda.is_available() is False (torch $("$PY" -c 'import torch; print(torch.__version__)')). Run it on a machine with an NVIDIA GPU and a CUDA build of torch." >&2
    exit 2
fi
"$PY" -c 'import torch; print("GPU:", torch.cuda.get_device_name(), "| torch", torch.__version__, "| bf16:", torch.cuda.is_bf16_supported())'

echo "== 1. #| cuda notebook cells and pytest -m cuda"
for nb in $(grep -l '#| cuda' nbs/*.ipynb); do
    echo "-- $nb"
    "$(dirname "$PY")/nbdev-test" --flags cuda "$nb"
done
set +e
"$PY" -m pytest -q -m cuda tests
rc=$?
set -e
if [ $rc -eq 5 ]; then echo "(no pytest test is marked cuda)"; elif [ $rc -ne 0 ]; then exit $rc; fi

echo "== 2. one bf16 step of every stage vs fp32"
"$PY" bench/gpu_stage_steps.py --device cuda

echo "== 3. fused vs plain KD loss at vocabulary 128k (bf16 inputs)"
"$PY" bench/bench_losses.py --device cuda --dtype bf16 --hidden 4096 --vocabs 131072 --tokens 4096 16384 --repeats 3
echo "gpu_check.sh: all GPU checks passed"
