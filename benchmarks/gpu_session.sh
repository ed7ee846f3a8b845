#!/usr/bin/env bash
# Everything GPU-related in one call on a lent GPU machine (the device tool: no network, no
# TensorRT, its own python3 with torch, triton and torchvision; surgeon runs from the working tree):
#
#   run(command="bash benchmarks/gpu_session.sh", timeout_s=570)
#
# 1. the GPU tests (pytest -m gpu tests/plugins): the fused kernel inside GrowNorm on CUDA, the
#    engine's PTX launched as TensorRT launches it (TensorRT's own test skips there); and growth of
#    a model already on CUDA (tests/grow/test_device.py: every new tensor on the device, in its dtype);
# 2. benchmarks/gpu_check.py: correctness and timings, written to $OUT/gpu_check.{json,md} after
#    every part, so a run cut short keeps what it measured.
# Copy the table from gpu_check.md into BENCHMARKS.md with the card's name.
set -uo pipefail
OUT=${OUT:-gpu-results}
mkdir -p "$OUT"
export PYTHONPATH="$PWD:$PWD/plugins${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1
PY=${PYTHON:-python3}
{
    nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.sm,clocks.mem --format=csv
    "$PY" -c "import torch, triton; print('torch', torch.__version__, 'triton', triton.__version__, torch.cuda.get_device_name())"
} > "$OUT/env.txt" 2>&1
cat "$OUT/env.txt"
timeout 120 "$PY" -m pytest -q -m gpu -p no:cacheprovider tests/plugins 2>&1 | tee "$OUT/pytest-gpu.log"
tests=${PIPESTATUS[0]}
timeout 90 "$PY" -m pytest -q -m gpu -p no:cacheprovider tests/grow/test_device.py 2>&1 | tee "$OUT/pytest-gpu-growth.log"
growth=${PIPESTATUS[0]}
timeout 350 "$PY" benchmarks/gpu_check.py --out "$OUT" 2>&1 | tee "$OUT/gpu_check.log"
check=${PIPESTATUS[0]}
echo "gpu tests exit $tests, growth on CUDA exit $growth, gpu_check exit $check"
[ "$tests" -eq 0 ] && [ "$growth" -eq 0 ] && [ "$check" -eq 0 ]
