#!/usr/bin/env bash
# Everything this project measures or tests on a GPU, in one command (a lent GPU machine is held for minutes):
# the GPU tests (tests/gpu/test_gpu.py), the step breakdown of VOC 513 ResNet-101 at bf16 channels-last and at fp32
# (img/s, method work %, host-device syncs, MFU), the method overhead at VOC and Cityscapes shapes, and both again
# with the method compiled (train.compile_method).
# The full output goes to $OUT/all.log (default OUT=/tmp/gpu_suite); each part's tail is printed as it ends.
#   bash benchmarks/gpu_suite.sh            # on the GPU machine, from the repository root
# A dry run of the same commands on a CPU (small shapes): GPU_SUITE_DRY=1 bash benchmarks/gpu_suite.sh
# Packages the GPU image lacks (webdataset, braceexpand) are installed from .whl/ when it exists.
set -u
cd "$(dirname "$0")/.."
export PYTHONUNBUFFERED=1 PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
# one Inductor cache for every part (a graph compiled by one part is loaded by the next)
export TORCHINDUCTOR_CACHE_DIR=${TORCHINDUCTOR_CACHE_DIR:-/tmp/gpu_suite_inductor}
OUT=${OUT:-/tmp/gpu_suite}
mkdir -p "$OUT"
if compgen -G ".whl/*.whl" >/dev/null; then
    python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
        && export PYTHONPATH="$PYTHONPATH:/tmp/site"
fi
if [ "${GPU_SUITE_DRY:-0}" = 1 ]; then
    DEV="--device cpu --backbone resnet18 --crop 65 --steps 1 --warmup 1"; MDEV="--device cpu --steps 2 --warmup 1"
else
    DEV="--device cuda --steps 60"; MDEV="--device cuda --steps 20 --warmup 5"
fi
run() {  # name, timeout, command...
    local name=$1 limit=$2; shift 2
    if [ -n "${GPU_SUITE_ONLY:-}" ] && [[ " $GPU_SUITE_ONLY " != *" $name "* ]]; then return; fi
    echo "=== $name: $*" | tee -a "$OUT/summary.txt"
    local start=$SECONDS
    timeout "$limit" "$@" >"$OUT/last.log" 2>&1
    local rc=$?
    { echo "=== $name: $*"; cat "$OUT/last.log"; } >>"$OUT/all.log"
    echo "=== $name: rc=$rc in $((SECONDS - start)) s" | tee -a "$OUT/summary.txt"
    tail -n 25 "$OUT/last.log"
}
date -u; nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.sm --format=csv 2>&1 | tee "$OUT/gpu.txt"
python3 -c "import torch, timm; print('torch', torch.__version__, 'timm', timm.__version__, 'cuda', torch.cuda.is_available())"
# the parts in order of what they decide (a lease can end early; GPU_SUITE_ONLY="name ..." runs only those named)
# the method's Triton kernels (the fused queue push and the compacted push's row copy against the CPU push, the
# percentiles against the torch ops and numpy), first: the timings below assume they are right
run test_gpu_push 120 python3 -m pytest -q -p no:cacheprovider tests/gpu/test_gpu.py -k "static_queue_push or triton_percentiles"
# train.compile_method_mode=cuda-graph (engine/graphed.py, new in stop 15, never run on a GPU yet): the eager method
# captured by hand as two CUDA graphs, no torch.compile; first its test against the eager method
run test_gpu_captured 120 python3 -m pytest -q -p no:cacheprovider tests/gpu/test_gpu.py -k "captured_by_hand or method-captured"
run breakdown_bf16_cl 100 python3 benchmarks/step_breakdown.py $DEV --precision bf16 --channels-last
run breakdown_bf16_cl_captured_method 100 python3 benchmarks/step_breakdown.py $DEV --precision bf16 --channels-last --compile-method cuda-graph
# train.compile_method: the method as one compiled graph replayed as CUDA graphs (launch-bound in eager on a GPU)
run breakdown_bf16_cl_compiled_method 300 python3 benchmarks/step_breakdown.py $DEV --precision bf16 --channels-last --compile-method --profile-method
# the eager run again, after the compiled one: in stop 15's three calls the compiled run (always second) was slower
# in its model parts too; this and each run's "without the method, before / after" rows tell drift from a cost of
# compiling
run breakdown_bf16_cl_again 100 python3 benchmarks/step_breakdown.py $DEV --precision bf16 --channels-last
run overhead_voc 60 python3 benchmarks/method_overhead.py $MDEV --shape voc --profile
run overhead_voc_captured 60 python3 benchmarks/method_overhead.py $MDEV --shape voc --compile cuda-graph --profile
# the eager device path's host work per step on this machine's CPU (tiny shapes): the launch-bound share above
run host_cost 60 python3 benchmarks/method_overhead.py --host-cost
run overhead_voc_compiled 240 python3 benchmarks/method_overhead.py $MDEV --shape voc --compile --profile
# the method replayed as CUDA graphs (train.compile_method_mode=reduce-overhead): no syncs, fresh inputs each replay
run test_gpu_graphs 240 python3 -m pytest -q -p no:cacheprovider tests/gpu/test_gpu.py -m "not slow" -k graphs
run test_gpu_fast 240 python3 -m pytest -q -p no:cacheprovider tests/gpu/test_gpu.py tests/unit/test_no_host_sync.py -m "not slow" -k "not graphs and not static_queue_push and not triton_percentiles and not captured_by_hand"
# train.cudnn_benchmark=false: what cuDNN's autotuning is worth to the model's part of the step
run breakdown_bf16_cl_no_cudnn_benchmark 100 python3 benchmarks/step_breakdown.py $DEV --precision bf16 --channels-last --no-cudnn-benchmark
run test_gpu_run_eager 120 python3 -m pytest -q -p no:cacheprovider --durations=0 tests/gpu/test_gpu.py -m slow -k "eager"
run test_gpu_run_method_compiled 180 python3 -m pytest -q -p no:cacheprovider --durations=0 tests/gpu/test_gpu.py -m slow -k method-compiled
run breakdown_fp32 100 python3 benchmarks/step_breakdown.py $DEV --precision fp32
run breakdown_bf16_cl_b8 100 python3 benchmarks/step_breakdown.py $DEV --precision bf16 --channels-last --batch 8
run overhead_cityscapes 60 python3 benchmarks/method_overhead.py $MDEV --shape cityscapes
# torch.compile of the student and teacher (several graphs: train/eval mode, batch sizes): minutes; on a timeout
# pytest-timeout prints where it was
run test_gpu_run_compiled 300 python3 -m pytest -q -p no:cacheprovider --durations=0 --timeout=280 tests/gpu/test_gpu.py -m slow -k all-compiled
rm -f "$OUT/last.log"
echo "=== summary"; cat "$OUT/summary.txt"
