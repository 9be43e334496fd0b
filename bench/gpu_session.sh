#!/usr/bin/env bash
# A GPU session's whole check in one `run` call (issues 3, 4, 6), most important first, each stage budgeted:
#   1. kernels: JIT build, smoke, CUDA tests (bench/gpu_kernels.sh without benches / sanitizers), then the
#      other GPU-marked tests (loaders, trainer, checkpoint)
#   2. DALI loader throughput: byol2 / dino, mixing on our device op vs inside the DALI graph (bench/gpu_dali.py)
#   3. ViT-S/16 SDMP-MoCo end to end from JPEG vs the same trainer on synthetic device data (sdmp-fast bench e2e)
#   4. kernel benches + compute-sanitizer (bench/gpu_kernels.sh, build cached by stage 1)
#   5. ViT-S/16 compiled, ViT-B/16 SDMP-MoCo and ViT-S/16 SDMP-DINO end to end, while budget is left
# then a short table of the issues' targets. Logs and JSON under $OUT; JSON copied to bench/results/.
#
#   export PYTHONPATH=/tmp/site                 # DALI unpacked from .dx1-3 (bench/README.md); optional
#   OUT=$OUT SDMP_PHOTOS_DIR=.gpu_photos bash bench/gpu_session.sh
#
# Knobs: BUDGET_S (default 540), PYTHON, NUM_IMAGES (4096), PACK_TO (tar $OUT there at the end: the device
# tool brings back 8 files at most), SDMP_SESSION_DEVICE=cpu (a smoke test of this
# script on a CPU machine: tiny sizes, no kernels stage). Without scikit-image the JPEG set is rendered from
# SDMP_PHOTOS_DIR (python -m sdmp_fast.benchmarks.make_data --export-photos .gpu_photos, carried along).
set -u -o pipefail

OUT=${OUT:-bench/results/gpu_session-$(date +%Y%m%d-%H%M%S)}
PY=${PYTHON:-python3}
BUDGET_S=${BUDGET_S:-540}
DEVICE=${SDMP_SESSION_DEVICE:-cuda}
WORK=${WORK:-/tmp/sdmp_gpu_session}
NUM_IMAGES=${NUM_IMAGES:-4096}
export PYTHONUNBUFFERED=1
mkdir -p "$OUT" "$WORK" bench/results
. "$(dirname "$0")/steps.sh"

# ------------------------------------------------------------------------------------------- environment
"$PY" -c "import sys, torch; print('python', sys.version.split()[0], '| torch', torch.__version__, '| cuda', torch.version.cuda, '|', torch.cuda.get_device_name(0) if torch.cuda.is_available() else 'NO GPU')" \
  > "$OUT/env.txt" 2>&1
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv >> "$OUT/env.txt" 2>&1
log "env: $(head -1 "$OUT/env.txt"); date $(date -u +%F)"
if ! "$PY" -c "import sdmp_fast.pipelines, sdmp_fast.kernels" 2> /dev/null; then
  # SDMP_KERNELS_AOT=0: the kernels are built in stage 1, within its budget, not unbudgeted here
  if ! SDMP_KERNELS_AOT=0 "$PY" -m pip install -e . --no-deps --no-build-isolation -q > "$OUT/install.log" 2>&1; then
    use_shim "$WORK/pyshim"
  fi
fi
"$PY" -c "import sdmp_fast.pipelines, sdmp_fast.kernels" || { log "FATAL: sdmp_fast does not import"; exit 1; }
HAVE_DALI=0
"$PY" -c "import nvidia.dali" 2> /dev/null && HAVE_DALI=1
log "DALI importable: $HAVE_DALI"

if [ "$DEVICE" = cpu ]; then  # smoke-test sizes
  NUM_IMAGES=64
  S_ARGS=(--arch vit_tiny_patch16_224 --img-size 32 --patch-size 8 --depth 2 --embed-dim 64 --num-heads 2
          --proj-hidden-dim 128 --proj-dim 64 --batch-size 16 --steps 3 --warmup 1 --device cpu --modes eager)
  B_ARGS=("${S_ARGS[@]}")
  D_ARGS=("${S_ARGS[@]}" --method dino --dino-out-dim 256 --dino-hidden-dim 128 --dino-bottleneck-dim 64 --local-size 16
          --n-local 2 --n-local-mixed 1)
  DALI_ARGS=(--device cpu --batch-size 16 --dino-batch-size 8 --warmup 1 --batches 3 --configs feed-only,byol2-sololearn,byol2-mix,byol2-graphmix)
else
  S_ARGS=(--arch vit_small_patch16_224 --batch-size 256 --steps 30 --warmup 10 --modes eager)
  B_ARGS=(--arch vit_base_patch16_224 --batch-size 128 --steps 20 --warmup 5 --modes eager)
  D_ARGS=(--method dino --arch vit_small_patch16_224 --batch-size 128 --steps 20 --warmup 5 --modes eager)
  DALI_ARGS=(--batches 40 --configs decode-only,feed-only,byol2-sololearn,byol2-mix,byol2-mix-bilinear,byol2-graphmix,byol2-nomix,dino-sololearn,dino-mix,dino-graphmix,mix-only,byol2-torchphoto,dino-torchphoto)  # the optional rows last: a step cut short keeps the anchors
fi
LOADER=dali
# without DALI: nvJPEG + device ops on a GPU; the CPU smoke test takes torchvision (torch-gpu refuses --device cpu)
[ $HAVE_DALI = 1 ] || LOADER=$([ "$DEVICE" = cpu ] && echo torchvision || echo torch-gpu)

# ------------------------------------------------------------------------------------------- 1. kernels
if [ "$DEVICE" != cpu ]; then
  # build for this card only: half the nvcc time of the default sm_80 + sm_90
  [ -n "${SDMP_KERNELS_ARCHS:-}" ] || export SDMP_KERNELS_ARCHS=$("$PY" -c "import torch; print('%d%d' % torch.cuda.get_device_capability())" 2> /dev/null || echo "80;90")
  log "kernels for sm_$SDMP_KERNELS_ARCHS"
  kb=$(inner_budget 220)  # the nested script must end before this step's limit (module note on inner_budget)
  [ "$kb" -gt 0 ] && step kernels_tests $((kb + 10)) env PACK_TO= OUT="$OUT/kernels" BUDGET_S=$kb SKIP_INSTALL=1 \
    SKIP_BENCH=1 SKIP_SANITIZER=1 PYTHON="$PY" bash bench/gpu_kernels.sh
fi

# ------------------------------------------------------------------------------------------- 1b. other CUDA tests
# the loaders', trainer's and checkpoint's GPU-marked tests (DALI / FFCV ones skip where not importable); the
# kernels are built by stage 1 (same cache), so this is test time only
if [ "$DEVICE" != cpu ] && "$PY" -c "import pytest" 2> /dev/null; then
  TIMEOUT_OPT=""
  "$PY" -c "import pytest_timeout" 2> /dev/null && TIMEOUT_OPT="--timeout=90"
  step cuda_tests 150 "$PY" -m pytest -m cuda tests --ignore=tests/test_kernels.py -q -rfE --durations=10 -p no:cacheprovider \
    $TIMEOUT_OPT
fi

# ------------------------------------------------------------------------------------------- 2. data + DALI
step jpegs 90 "$PY" -c "import sys; sys.path.insert(0, 'bench'); from gpu_dali import build_jpegs; build_jpegs('$WORK/jpegs', $NUM_IMAGES)"
if [ $HAVE_DALI = 1 ]; then
  step dali 150 "$PY" bench/gpu_dali.py --data "$WORK/jpegs" --out "$OUT" "${DALI_ARGS[@]}"
else
  log "SKIP  dali (not importable: unpack .dx1-3 first, see bench/README.md)"
fi

# ------------------------------------------------------------------------------------------- 3. ViT-S e2e
step e2e_vit_s 200 "$PY" -m sdmp_fast.cli bench e2e --loader $LOADER --data "$WORK/jpegs" "${S_ARGS[@]}" \
  --json "$OUT/e2e_vit_s.json"

# ------------------------------------------------------------------------------------------- 4. kernel benches
if [ "$DEVICE" != cpu ]; then
  # a cluster forward that failed or hung in stage 1 is not tried again here (its smoke check alone may take 55 s)
  grep -qs "cluster path left out" "$OUT/kernels/summary.txt" && export SKIP_CLUSTER=1
  kb=$(inner_budget 150)
  [ "$kb" -gt 0 ] && step kernels_bench $((kb + 10)) env PACK_TO= OUT="$OUT/kernels_bench" BUDGET_S=$kb \
    SKIP_INSTALL=1 SKIP_TESTS=1 PYTHON="$PY" bash bench/gpu_kernels.sh
fi

# ------------------------------------------------------------------------------------------- 5. compiled ViT-S, ViT-B, DINO
# torch.compile in a stage of its own: a compile that overruns must not cost the eager numbers above
step e2e_vit_s_compile 200 "$PY" -m sdmp_fast.cli bench e2e --loader $LOADER --data "$WORK/jpegs" "${S_ARGS[@]}" \
  --compile --modes compile --json "$OUT/e2e_vit_s_compile.json"
step e2e_vit_b 120 "$PY" -m sdmp_fast.cli bench e2e --loader $LOADER --data "$WORK/jpegs" "${B_ARGS[@]}" \
  --json "$OUT/e2e_vit_b.json"
step e2e_dino_s 120 "$PY" -m sdmp_fast.cli bench e2e --loader $LOADER --data "$WORK/jpegs" "${D_ARGS[@]}" \
  --json "$OUT/e2e_dino_s.json"

# ------------------------------------------------------------------------------------------- table
STAMP=$(date -u +%Y%m%d)
[ "$DEVICE" = cpu ] || for f in "$OUT"/*.json; do [ -f "$f" ] && cp "$f" "bench/results/session-$(basename "${f%.json}")-$DEVICE-$STAMP.json"; done
"$PY" bench/session_table.py "$OUT" 2>&1 | tee -a "$SUMMARY"
log "total $((SECONDS - T0))s; everything under $OUT (summary.txt first)"
pack_results session
