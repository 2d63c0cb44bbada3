#!/usr/bin/env bash
# GPU checks of kd_lib, for a machine with CUDA (CI has none: there CPU bf16 autocast stands in, tests/test_precision.py).
#   1. every `#| cuda` notebook cell (nbdev-test --flags cuda, only the notebooks that have one) and the `cuda` tests of
#      tests/test_gpu.py (bf16 KD with on-policy steps and exact resume, HF teacher + pruned HF student, FSDP2 over NCCL)
#   2. one bf16 step of every stage against fp32 (bench/gpu_stage_steps.py)
#   3. fused vs plain KD loss at vocabulary 128k: peak torch.cuda.max_memory_allocated and time (bench/bench_losses.py),
#      with the auto chunk (CUDA: up to 2048 tokens at this vocabulary) and with the CPU's 32-token chunk
# Usage: bench/gpu_check.sh        (from anywhere; PYTHON=... picks the interpreter, default .venv/bin/python, and
#                                  NBDEV_TEST=... the nbdev-test command, default the one beside it)
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-.venv/bin/python}
NBDEV_TEST=${NBDEV_TEST:-$(dirname "$PY")/nbdev-test}
export PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH}
if ! "$PY" -c 'import sys, torch; sys.exit(0 if torch.cuda.is_available() else 1)'; then
    echo "gpu_check.sh: no CUDA device: torch.cuda.is_available() is False (torch $("$PY" -c 'import torch; print(torch.__version__)')). Run it on a machine with an NVIDIA GPU and a CUDA build of torch." >&2
    exit 2
fi
"$PY" -c 'import torch; print("GPU:", torch.cuda.get_device_name(), "| torch", torch.__version__, "| bf16:", torch.cuda.is_bf16_supported())'

failed=()
check() {  # run one check; a failure is reported at the end, after the other checks ran
    echo "== $1"
    local t0=$SECONDS
    if "${@:2}"; then echo "-- ok ($((SECONDS - t0)) s): $1"; else echo "-- FAILED ($((SECONDS - t0)) s): $1"; failed+=("$1"); fi
}
for nb in $(grep -l '#| cuda' nbs/*.ipynb); do
    check "#| cuda cells of $nb" "$NBDEV_TEST" --flags cuda "$nb"
done
check "cuda tests (tests/test_gpu.py)" "$PY" -m pytest -q -m cuda tests/test_gpu.py
check "one bf16 step of every stage vs fp32" "$PY" bench/gpu_stage_steps.py --device cuda
check "fused vs plain KD loss at vocabulary 128k (bf16 inputs)" \
    "$PY" bench/bench_losses.py --device cuda --dtype bf16 --hidden 4096 --vocabs 131072 --tokens 4096 16384 --repeats 3
check "fused KD loss with the CPU's auto chunk (32 tokens at vocabulary 128k)" \
    "$PY" bench/bench_losses.py --device cuda --dtype bf16 --hidden 4096 --vocabs 131072 --tokens 16384 --repeats 3 --chunk-size 32
if [ ${#failed[@]} -gt 0 ]; then printf 'gpu_check.sh: FAILED: %s\n' "${failed[@]}" >&2; exit 1; fi
echo "gpu_check.sh: all GPU checks passed"
