#!/usr/bin/env bash
# Train every model of the miniature world on the GPU machine, then measure coherence on the new weights, in one
# call that ends by itself inside TOTAL_S seconds (default 555). Run from the repository root:
#
#   bash miniworld/run_on_device.sh            (carry: .comfyui/ComfyUI, .whl, bench/.commit)
#
# Training (classifier, VAE, SD1.x UNet, flow model) gets TRAIN_S seconds as its --budget-s; the evaluation gets
# what is left less a margin, as its --budget-s: SD1.x and the flow model at sync_weight 0 and 20 on up to 100
# seeds, and the flow model's sweep on the first 16, seed by seed, so a cut leaves balanced results. Everything
# written to $OUT survives a timeout (the evaluation rewrites its json after every panorama). $OUT gets 8 files:
#   run.log, eval.json, assets/{classifier,vae,unet,flow}.safetensors, assets/checksums.json,
#   assets/train_report.json  -- copy assets/ to miniworld/assets to commit the weights.
# TRAIN_ARGS / EVAL_ARGS add arguments to either step.
set -uo pipefail
cd "$(dirname "$0")/.."
START=$(date +%s)
OUT=${OUT:-/tmp/miniworld-out}
TOTAL_S=${TOTAL_S:-555}
TRAIN_S=${TRAIN_S:-240}
mkdir -p "$OUT/assets"
LOG="$OUT/run.log"
if ls .whl/*.whl >/dev/null 2>&1; then  # torchsde, trampoline, lpips: not on the machine
    python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
        || { echo "installing the carried wheels failed" | tee "$LOG" >&2; exit 3; }
    export PYTHONPATH=/tmp/site${PYTHONPATH:+:$PYTHONPATH}
fi
python3 -c "import av" 2>/dev/null || export PYTHONPATH=$PWD/bench/stubs${PYTHONPATH:+:$PYTHONPATH}
export PYTHONUNBUFFERED=1 COMFYUI_PATH=$PWD/.comfyui/ComfyUI
{ echo "commit $(cat bench/.commit 2>/dev/null || echo unknown)"
  nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv 2>&1; } | tee "$LOG"

python3 -m miniworld.train --out "$OUT/assets" --device cuda --budget-s "$TRAIN_S" ${TRAIN_ARGS:-} 2>&1 | tee -a "$LOG"
rc=${PIPESTATUS[0]}
[ "$rc" = 0 ] || { echo "training failed (exit $rc)" | tee -a "$LOG"; exit "$rc"; }

# what is left, less the evaluation's start-up, its last panorama and the trunk AUC at the end
EVAL_S=$(( TOTAL_S - ($(date +%s) - START) - 45 ))
echo "evaluation budget ${EVAL_S} s" | tee -a "$LOG"
[ "$EVAL_S" -gt 30 ] || { echo "no time left for the evaluation" | tee -a "$LOG"; exit 5; }
timeout $(( EVAL_S + 40 )) python3 -m miniworld.evaluate --gpu --assets "$OUT/assets" --model sd1,flow \
    --seeds 100 --weights 0,20 --sweep 5,10,40,80,160 --sweep-seeds 16 --sweep-models flow \
    --budget-s "$EVAL_S" --json "$OUT/eval.json" ${EVAL_ARGS:-} 2>&1 | tee -a "$LOG"
rc=${PIPESTATUS[0]}
echo "total $(( $(date +%s) - START )) s, evaluation exit $rc" | tee -a "$LOG"
exit "$rc"
