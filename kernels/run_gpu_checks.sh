#!/usr/bin/env bash
# GPU checks of the fused soft-MoME mixing op, from the repository root on a CUDA machine:
#   bash kernels/run_gpu_checks.sh [OUT_DIR]
# 1. builds the CUDA C++ extension (JIT, cached), 2. runs the GPU correctness tests (triton + cuda backends
# against float64, bf16 included), 3. runs the full benchmark (CSV, PNG, meta.json with target checks).
# Works without installing the package: mks2_kernels is exposed through a symlink on PYTHONPATH.
set -euo pipefail
OUT="${1:-outputs/bench_kernels}"
mkdir -p "$OUT"
PP="$(mktemp -d)"
ln -sfn "$PWD/kernels" "$PP/mks2_kernels"
export PYTHONPATH="$PWD:$PP${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1
nvidia-smi --query-gpu=name,driver_version --format=csv,noheader
python -c "from mks2_kernels import cuda_mix; cuda_mix.load(); print('CUDA extension built')"
python -m pytest -q -p no:cacheprovider tests/kernels/test_mix_gpu.py 2>&1 | tee "$OUT/gpu_tests.log"
python kernels/bench.py --out "$OUT" 2>&1 | tee "$OUT/bench.log"
