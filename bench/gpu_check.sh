#!/usr/bin/env bash
# The GPU checks, as one script of under 8 minutes on one GPU (H100 / H200), run from the repository root:
#
#   bash bench/gpu_check.sh            # OUT=<dir> to keep the JSON and logs elsewhere (default: $OUT or ./gpu_check)
#
# 1. tests/gpu (scoring and training on CUDA, against the CPU results)
# 2. bench/kernel.py --device cuda on tiny-llama and SmolLM2: eager vs compiled (e), layouts and auto (d)
# 3. bench/ray_pipeline.py --device cuda on SmolLM2: Ray Data scoring throughput
# 4. where vLLM is installed (pip install 'sqsd-ray[vllm]'): tests/unit/test_vllm_gpu.py, greedy answers of the HF
#    and vLLM engines on SmolLM2 (>= 95 % identical); up to 5 minutes more (an engine start is about a minute)
# and prints the figures docs/benchmarks.md takes. Each step has its own time limit, so one that hangs leaves the
# others their time; the exit status is that of the first step that failed.
set -uo pipefail
OUT="${OUT:-gpu_check}"
mkdir -p "$OUT"
PY="${PYTHON:-.venv/bin/python}"
export PYTHONPATH="${PYTHONPATH:-.}"
status=0
step() {  # step NAME SECONDS CMD...
    local name=$1 limit=$2
    shift 2
    echo "=== $name (limit ${limit}s): $*"
    local started=$SECONDS
    timeout "$limit" "$@" > "$OUT/$name.log" 2>&1
    local rc=$?
    echo "=== $name: rc=$rc in $((SECONDS - started)) s"
    tail -n 40 "$OUT/$name.log"
    if [ $rc -ne 0 ] && [ $status -eq 0 ]; then status=$rc; fi
}
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader || true
"$PY" -c "import torch; print('torch', torch.__version__, 'cuda', torch.version.cuda, torch.cuda.get_device_name(0))"
step gpu_tests 120 "$PY" -m pytest tests/gpu -q -x
step kernel 240 "$PY" bench/kernel.py --device cuda --dtype bfloat16 --models tiny-llama,smollm2-135m \
    --n-samples-small 16 --repeats 3 --out "$OUT/kernel.json"
step ray_pipeline 100 "$PY" bench/ray_pipeline.py --device cuda --dtype bfloat16 --model smollm2-135m \
    --n-samples 2000 --skip-in-process --out "$OUT/ray_pipeline.json"
if "$PY" -c "import importlib.util, sys; sys.exit(importlib.util.find_spec('vllm') is None)"; then
    step vllm_generation 300 "$PY" -m pytest tests/unit/test_vllm_gpu.py -q -x -s
else
    echo "=== vllm_generation: skipped, vLLM is not installed (pip install 'sqsd-ray[vllm]')"
fi
exit $status
