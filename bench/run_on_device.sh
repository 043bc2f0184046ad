#!/usr/bin/env bash
# Run a benchmark (default bench.gpu_bench) or the GPU tests on the GPU machine, from the repository root.
#
# The machine has torch and most of ComfyUI's needs but not torchsde, trampoline or lpips: they travel as
# pure-python wheels in .whl/ (git-ignored; carried with the call, see docs/dev/performance-history.md), and .comfyui/
# (ComfyUI itself) is carried too. The commit is read from bench/.commit (git-ignored, carried), since .git
# may not travel. Arguments go to gpu_bench.py; results land in $OUT (results.json, log.txt, nvidia-smi.txt).
#
#   here:   git rev-parse HEAD > bench/.commit   (add "+dirty" if bench/ or syncdiff_core/ has changes)
#   device: bash bench/run_on_device.sh --plan compile                        (bench.gpu_bench)
#           BENCH=bench.memory_bench bash bench/run_on_device.sh              (the memory plan on emulated cards)
#           bash bench/run_on_device.sh gpu-tests                              (tests marked gpu; pytest in .whl/)
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-/tmp/bench-out}
mkdir -p "$OUT"
if ls .whl/*.whl >/dev/null 2>&1; then
    python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
        || { echo "installing the carried wheels failed" >&2; exit 3; }
    export PYTHONPATH=/tmp/site${PYTHONPATH:+:$PYTHONPATH}
fi
export PYTHONUNBUFFERED=1
# PyAV is over the carry limit: where it is missing, its benchmark-only placeholder (video I/O is never used)
python3 -c "import av" 2>/dev/null || export PYTHONPATH=$PWD/bench/stubs${PYTHONPATH:+:$PYTHONPATH}
nvidia-smi --query-gpu=name,driver_version,clocks.sm,clocks.max.sm,temperature.gpu,power.draw,power.limit,memory.used,memory.total \
    --format=csv > "$OUT/nvidia-smi.txt" 2>&1 || true
cat "$OUT/nvidia-smi.txt"
python3 - <<'EOF' || { echo "imports failed: see above" >&2; exit 4; }
import sys
sys.path[:0] = [".comfyui/ComfyUI", "."]
import torch, torchsde, lpips  # noqa: F401
import comfy.sd, comfy.samplers, comfy.supported_models  # noqa: F401
import syncdiff_core.comfy.sampling, syncdiff_core.comfy.decode  # noqa: F401
print("imports ok; torch", torch.__version__, "cuda", torch.cuda.is_available())
EOF
if [ "${1:-}" = gpu-tests ]; then
    shift
    SYNCDIFF_GPU_TESTS=1 python3 -m pytest -q -m gpu tests/comfy/test_gpu_reliability.py "$@" 2>&1 | tee "$OUT/log.txt"
    exit "${PIPESTATUS[0]}"
fi
python3 -m "${BENCH:-bench.gpu_bench}" --out "$OUT" "$@" 2>&1 | tee "$OUT/log.txt"
exit "${PIPESTATUS[0]}"
