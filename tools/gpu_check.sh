#!/usr/bin/env bash
# The GPU checks in one call, for a machine with one NVIDIA GPU (offline: packages it lacks come
# from the .whl/ bundle, `make gpu-bundle`):
#
#   bash tools/gpu_check.sh [--dry-run] [op|train|all ...]        (default: all = op + train)
#
#   op     install the bundle when detectron2 is missing (.whl/, `make gpu-bundle`), build the
#          op for the visible card, the op's CUDA tests (all dtypes, against the reference),
#          compute-sanitizer memcheck and racecheck on a tiny forward + backward, and the op
#          benchmark at the 1024 px pixel-decoder shapes (fp32/fp16/bf16, time, GB/s, % of the
#          copy bandwidth, the grid_sample reference)
#   train  AMP training smoke run (Swin-S 1024 px, random weights, synthetic 1024 px data, ~50
#          iterations, evaluation and checkpoints), --resume, a run under torchrun
#          (--nproc-per-node 1), --eval-only, tools/predict.py and
#          windows/s on a 4096 px GeoTIFF, benchmarks/benchmark.py --device cuda (ours vs HF)
#          (GPU_CHECK_TRAIN_ITERS, GPU_CHECK_TRAIN_IMAGES, GPU_CHECK_PIXEL_DECODER_AUTOCAST)
#
# Each step runs under `timeout` and logs to $OUT (when set) or output/gpu_check/: <step>.log, a
# JSON per measurement, and summary.json (every step's status, time and results). Exit status 0
# when every step passed (or was skipped).
#
# Without a GPU (or with --dry-run) every step still runs what it can on the CPU, at tiny sizes
# where it would take long, and says what it skips; the bundle (built for the GPU machine's
# Python 3.12) is then checked with `pip install --dry-run` instead of installed.
#
# Python: $PY, else $VENV/bin/python (default .venv), else python3. The bundle goes to
# $GPU_CHECK_SITE (default: a temporary folder), put first on PYTHONPATH with the repo, ops/ and
# datasets/ (the package, the op and the synthetic data generator; the scripts add no paths).
set -uo pipefail
# PY absolute, from the caller's folder: some steps run in ops/ (make gpu-check passes the
# relative .venv/bin/python).
case ${PY:-} in "" | /*) ;; */*) PY=$PWD/$PY ;; *) PY=$(command -v "$PY") ;; esac
cd "$(dirname "$0")/.."
REPO=$PWD

DRY=0
STAGES=()
for arg in "$@"; do
  case "$arg" in
    --dry-run) DRY=1 ;;
    op|train) STAGES+=("$arg") ;;
    all) STAGES+=(op train) ;;
    -h|--help) sed -n '2,28p' "$0"; exit 0 ;;
    *) echo "gpu_check: unknown argument $arg (stages: op, train, all; --dry-run)" >&2; exit 2 ;;
  esac
done
[ ${#STAGES[@]} -eq 0 ] && STAGES=(op train)

OUT_DIR=${OUT:-$REPO/output/gpu_check}
mkdir -p "$OUT_DIR"
OUT_DIR=$(cd "$OUT_DIR" && pwd)
WORK=$(mktemp -d "${TMPDIR:-/tmp}/rooftop_gpu_check.XXXXXX")
STEPS=$OUT_DIR/steps.tsv
: > "$STEPS"
export OMP_WAIT_POLICY=${OMP_WAIT_POLICY:-PASSIVE} PYTHONUNBUFFERED=1 PYTHONWARNINGS=ignore

VENV=${VENV:-.venv}
if [ -z "${PY:-}" ]; then
  case $VENV in /*) ;; *) VENV=$REPO/$VENV ;; esac
  if [ -x "$VENV/bin/python" ]; then PY=$VENV/bin/python; else PY=$(command -v python3); fi
fi
export PYTHONPATH="$REPO:$REPO/ops:$REPO/datasets${PYTHONPATH:+:$PYTHONPATH}"

if [ "$DRY" = 0 ] && ! { nvidia-smi -L 2>/dev/null | grep -q '^GPU'; } \
    && ! "$PY" -c "import sys, torch; sys.exit(0 if torch.cuda.is_available() else 1)" 2>/dev/null; then
  echo "gpu_check: no NVIDIA GPU (neither nvidia-smi nor torch sees one): dry run, CUDA parts skipped"
  DRY=1
fi
STAGE=setup
say() { echo "[gpu_check $(date -u +%H:%M:%S)] $*"; }
skip() {  # skip NAME REASON
  say "$1: SKIPPED ($2)"
  printf '%s\t%s\tskipped\t\t0\t0\t%s\n' "$STAGE" "$1" "$2" >> "$STEPS"
}
step() {  # step NAME LIMIT_S COMMAND...: run under timeout, log, record
  local name=$1 limit=$2; shift 2
  local log=$OUT_DIR/$name.log start rc status ms secs
  say "$name (limit ${limit} s): $*"
  start=$(date +%s%N)
  timeout --kill-after=10 "$limit" "$@" > "$log" 2>&1
  rc=$?
  ms=$(( ($(date +%s%N) - start) / 1000000 ))
  secs=$((ms / 1000)).$(printf %03d $((ms % 1000)))
  case $rc in 0) status=passed ;; 124|137) status=timeout ;; *) status=failed ;; esac
  tail -n 4 "$log" | sed 's/^/    /'
  say "$name: $status (rc $rc, ${secs%.*} s)"
  printf '%s\t%s\t%s\t%s\t%s\t%s\t%s\n' "$STAGE" "$name" "$status" "$rc" "$secs" "$limit" \
    "$(basename "$log")" >> "$STEPS"
  return $rc
}

# ---- setup: packages and the op --------------------------------------------------------------
setup() {
  STAGE=setup
  if [ "$DRY" = 1 ]; then
    # The bundle is for the GPU machine's Python: prove it would install there.
    if [ -d .whl ]; then
      step check_bundle 300 "$PY" tools/gpu_bundle.py --check
    else
      skip check_bundle "no .whl/ bundle here (make gpu-bundle)"
    fi
    skip install_bundle "dry run: the bundle is for the GPU machine's Python 3.12"
  elif "$PY" -c "import detectron2, mask2former, fvcore, yacs" 2>/dev/null; then
    skip install_bundle "detectron2 and Mask2Former already importable by $PY"
  elif [ -d .whl ]; then
    SITE=${GPU_CHECK_SITE:-$WORK/site}
    # cp312 / pure-Python wheels as they are; sal-detectron2 is tagged cp310 (its compiled _C is
    # never loaded), hence installed for 3.10 (tools/setup_env.sh does the same).
    step install_bundle 300 bash -c "'$PY' -m pip install -q --no-index --no-deps --no-compile \
        --target '$SITE' .whl/*.whl && '$PY' -m pip install -q --no-index --no-deps --no-compile \
        --target '$SITE' --python-version 3.10 --implementation cp --only-binary=:all: \
        --platform manylinux2014_x86_64 .whl/cp310/*.whl"
    export PYTHONPATH="$SITE:$PYTHONPATH"
  else
    echo "gpu_check: detectron2 is not importable and there is no .whl/ bundle (make gpu-bundle)" >&2
    exit 1
  fi
  step imports 120 "$PY" -c "from rooftop_m2f import compat; compat.apply(); import detectron2, mask2former, torch; \
print('torch', torch.__version__, 'cuda', torch.version.cuda, 'gpu', torch.cuda.is_available() \
and torch.cuda.get_device_name(0)); import rooftop_m2f.modeling.meta_arch"
  if [ "$DRY" = 1 ]; then
    if command -v nvcc > /dev/null; then
      step build_op 600 env FORCE_CUDA=1 TORCH_CUDA_ARCH_LIST="${TORCH_CUDA_ARCH_LIST:-9.0}" \
        bash -c "cd ops && '$PY' setup.py -q build_ext --inplace"
    else
      step build_op 600 env FORCE_CUDA=0 bash -c "cd ops && '$PY' setup.py -q build_ext --inplace"
    fi
  else
    # the visible card's architecture, e.g. 9.0 for an H100/H200
    local arch=${TORCH_CUDA_ARCH_LIST:-$("$PY" -c "import torch; print('%d.%d' % torch.cuda.get_device_capability(0))")}
    step build_op 600 env FORCE_CUDA=1 TORCH_CUDA_ARCH_LIST="$arch" MAX_JOBS="$(nproc)" \
      bash -c "cd ops && '$PY' setup.py -q build_ext --inplace"
  fi
  step op_info 60 "$PY" -c "from rooftop_m2f.modeling.msdeform import describe_compiled_op as d; print(d())"
}

# ---- op --------------------------------------------------------------------------------------
stage_op() {
  STAGE=op
  # CUDA tests of the op (every dtype, against the reference) and of its wiring; without a GPU
  # the same files run their CPU tests and skip the CUDA ones (-rs lists why).
  step op_tests 300 "$PY" -m pytest -q -rs -p no:cacheprovider \
    tests/test_ms_deform_attn_op.py tests/test_msdeform_wiring.py
  local sanitizer
  sanitizer=$(command -v compute-sanitizer || ls "${CUDA_HOME:-/usr/local/cuda}"/bin/compute-sanitizer 2>/dev/null || true)
  if [ "$DRY" = 1 ]; then
    step sanitizer_case_cpu 120 "$PY" tools/msda_sanitizer_case.py --device cpu
    skip memcheck "no GPU: compute-sanitizer --tool memcheck not run"
    skip racecheck "no GPU: compute-sanitizer --tool racecheck not run"
  elif [ -z "$sanitizer" ]; then
    skip memcheck "compute-sanitizer not found (PATH, \$CUDA_HOME/bin, /usr/local/cuda/bin)"
    skip racecheck "compute-sanitizer not found"
  else
    # No caching allocator: every tensor its own allocation, so an out-of-bounds access is not
    # hidden inside a larger cached block.
    step memcheck 150 env PYTORCH_NO_CUDA_MEMORY_CACHING=1 "$sanitizer" --tool memcheck \
      --error-exitcode 1 --leak-check no --print-limit 20 "$PY" tools/msda_sanitizer_case.py
    step racecheck 150 env PYTORCH_NO_CUDA_MEMORY_CACHING=1 "$sanitizer" --tool racecheck \
      --error-exitcode 1 --print-limit 20 "$PY" tools/msda_sanitizer_case.py
  fi
  if [ "$DRY" = 1 ]; then
    step op_bench 300 "$PY" benchmarks/benchmark_ms_deform_attn.py --levels 32x32,16x16,8x8 \
      --repeats 2 --no-memory --dtypes float32,float16,bfloat16 --json "$OUT_DIR/op_bench.json"
  else
    step op_bench 240 "$PY" benchmarks/benchmark_ms_deform_attn.py --device cuda --repeats 20 \
      --warmup 3 --dtypes float32,float16,bfloat16 --json "$OUT_DIR/op_bench.json"
  fi
}

# ---- train -----------------------------------------------------------------------------------
stage_train() {
  STAGE=train
  local data=$WORK/datasets run=$WORK/train config size iters period images
  if [ "$DRY" = 1 ]; then
    # The same steps at tiny sizes on the CPU (AMP needs CUDA: off).
    config=configs/capetown_tiny_cpu.yaml; size=128; iters=6; period=3; images=4
    local opts=(MODEL.DEVICE cpu SOLVER.AMP.ENABLED False SOLVER.IMS_PER_BATCH 2
                DATALOADER.NUM_WORKERS 0 TEST.EVAL_PERIOD $period SOLVER.CHECKPOINT_PERIOD $period)
    local tif_size=512 tile_opts=(ROOFTOP.TILE.SIZE 256 ROOFTOP.TILE.OVERLAP 64 MODEL.DEVICE cpu)
    skip amp "no GPU: the training smoke run uses the tiny config on the CPU without AMP"
  else
    config=configs/capetown_swinS_1024.yaml; size=1024; iters=${GPU_CHECK_TRAIN_ITERS:-50}
    period=25; images=${GPU_CHECK_TRAIN_IMAGES:-12}
    local opts=(MODEL.DEVICE cuda SOLVER.AMP.ENABLED True SOLVER.IMS_PER_BATCH 1
                DATALOADER.NUM_WORKERS 4 TEST.EVAL_PERIOD $period SOLVER.CHECKPOINT_PERIOD $period
                SOLVER.WARMUP_ITERS 10)
    local tif_size=4096 tile_opts=(MODEL.DEVICE cuda)
  fi
  # random weights (MODEL.WEIGHTS "": the model starts from its initialisation, no download)
  # GPU_CHECK_PIXEL_DECODER_AUTOCAST=True trains with the pixel decoder under AMP too.
  local common=(MODEL.WEIGHTS "" ROOFTOP.EPOCHS 0.0 ROOFTOP.EVAL_EVERY_EPOCHS 0.0
                ROOFTOP.CHECK_DATASET True
                ROOFTOP.PIXEL_DECODER_AUTOCAST "${GPU_CHECK_PIXEL_DECODER_AUTOCAST:-False}"
                "${opts[@]}")
  step synthetic_data 300 "$PY" datasets/make_synthetic_capetown.py --root "$data/capetown" \
    --num-train "$images" --num-val 2 --num-test 2 --size "$size"
  step train 420 env DETECTRON2_DATASETS="$data" "$PY" tools/train_net.py --config-file "$config" \
    --num-gpus 1 "${common[@]}" SOLVER.MAX_ITER "$iters" OUTPUT_DIR "$run"
  "$PY" tools/gpu_check_report.py train-summary "$run" --warmup $((iters / 5)) \
    > "$OUT_DIR/train_summary.json" 2> "$OUT_DIR/train_summary.log" \
    && say "train summary: $(tr -d '\n' < "$OUT_DIR/train_summary.json" | cut -c1-400)"
  step resume 240 env DETECTRON2_DATASETS="$data" "$PY" tools/train_net.py --config-file "$config" \
    --num-gpus 1 --resume "${common[@]}" SOLVER.MAX_ITER $((iters + 4)) OUTPUT_DIR "$run"
  "$PY" tools/gpu_check_report.py train-summary "$run" --warmup $((iters / 5)) \
    > "$OUT_DIR/resume_summary.json" 2>> "$OUT_DIR/train_summary.log"
  # the same run started as a cluster starts it: torchrun, ranks from the environment
  step torchrun 240 env DETECTRON2_DATASETS="$data" "$PY" -m torch.distributed.run --standalone \
    --nproc-per-node 1 tools/train_net.py --config-file "$config" "${common[@]}" \
    SOLVER.MAX_ITER "$period" OUTPUT_DIR "$WORK/torchrun"
  step eval_only 240 env DETECTRON2_DATASETS="$data" "$PY" tools/train_net.py --config-file "$config" \
    --num-gpus 1 --eval-only "${common[@]}" MODEL.WEIGHTS "$run/model_final.pth" \
    OUTPUT_DIR "$WORK/eval"
  step geotiff 300 "$PY" tools/gpu_check_report.py geotiff "$WORK/ortho.tif" --size "$tif_size"
  step predict 300 "$PY" tools/predict.py --config-file "$config" --input "$WORK/ortho.tif" \
    --output-dir "$WORK/pred" --outputs index,geotiff,geojson MODEL.WEIGHTS "$run/model_final.pth" "${tile_opts[@]}"
  step tiled_rate 300 bash -c "set -o pipefail; '$PY' tools/gpu_check_report.py tiled-rate --config-file '$config' \
    --input '$WORK/ortho.tif' --opts MODEL.WEIGHTS '$run/model_final.pth' ${tile_opts[*]} \
    | tail -n 1 | tee '$OUT_DIR/tiled_rate.json'"
  if [ "$DRY" = 1 ]; then
    step end_to_end 900 "$PY" benchmarks/benchmark.py --random-weights --device cpu --config-file "$config" \
      --sizes 64 --precisions fp32 bf16 --iters 1 --warmup 0 --train-sizes 64 \
      --train-precisions bf16 --no-loader --threads 1 --json "$OUT_DIR/end_to_end.json"
  else
    # ours vs HF, 1024 and 320 px, batch 1 and 8, fp32 and bf16 autocast; one training step
    # each in fp32 and bf16 autocast. On CUDA one process per model and size runs every pair.
    step end_to_end 420 "$PY" benchmarks/benchmark.py --random-weights --device cuda --sizes 1024 320 --batches 1 8 \
      --precisions fp32 bf16 --iters 3 --warmup 1 --train-sizes 1024 320 \
      --train-precisions fp32 bf16 --no-loader --json "$OUT_DIR/end_to_end.json"
  fi
}

say "stages: ${STAGES[*]}; $([ "$DRY" = 1 ] && echo 'DRY RUN (no GPU): CUDA parts skipped' || nvidia-smi -L 2>/dev/null | head -1); python $PY; output $OUT_DIR"
nvidia-smi > "$OUT_DIR/nvidia-smi.txt" 2>&1 || true
setup
for s in "${STAGES[@]}"; do "stage_$s"; done
"$PY" tools/gpu_check_report.py summary "$STEPS" "$OUT_DIR/summary.json"
rc=$?
rm -rf "$WORK"
exit $rc
