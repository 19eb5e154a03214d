#!/usr/bin/env bash
# One short GPU loan's checks, written to survive its clock: run from the repository root on the lent machine,
#   bash bench/gpu_loan.sh [BUDGET_SECONDS]        (default 300; leave ~3 min of the loan for the start and copies)
# The machine's image has torch and peft but not diffusers: carry its wheel (docs/real-path.md, "On a lent GPU").
# Every result lands in $OUT (or runs/gpu-loan) the moment it exists: the sd35m-gpu cases as JSON lines, then
# BENCHMARKS.json/md merged from them even if the run is cut short, then the CUDA tests' log.
set -u
OUT=${OUT:-runs/gpu-loan}
mkdir -p "$OUT"
if ls .whl/*.whl >/dev/null 2>&1; then
    python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
        && export PYTHONPATH=/tmp/site
fi
export PYTHONUNBUFFERED=1
nvidia-smi --query-gpu=name,memory.total --format=csv > "$OUT/gpu.txt" 2>&1
timeout "${1:-300}" python3 -m bench sd35m-gpu --budget-seconds "$(( ${1:-300} - 30 ))" --log "$OUT/sd35m-gpu.jsonl" \
    2>&1 | tee "$OUT/bench.log"
cp BENCHMARKS.json BENCHMARKS.md "$OUT/" 2>/dev/null
FLOW_OPD_GPU_TESTS=1 timeout 120 python3 -m pytest -q -x tests/test_gpu.py > "$OUT/test_gpu.log" 2>&1
tail -3 "$OUT/test_gpu.log"
