#!/usr/bin/env bash
# The fast path's GPU measurement, as one command on a lent GPU machine (README, "Speed").
#
# Here (a machine with PyPI, from the repository root), once:
#   bash tools/gpu_check.sh prepare
# puts into .gpu/ (git-ignored through .git/info/exclude) the Python 3.12 wheels the GPU machine lacks (the repacked
# detectron2, its pure-Python dependencies, pycocotools, shapely, cityscapesscripts; the versions of .venv) and
# ../shared/bench/gpu_anchor.py, about 5 MB.
# Then on the GPU machine (the device tool's run, carry [".gpu"], timeout 600):
#   bash tools/gpu_check.sh
# runs in under 10 minutes, each step with its own time limit, all output in $OUT/steps.log (default
# output/gpu_check; the benchmarks' figures also in $OUT/*.json):
#   1. ../shared/bench/gpu_anchor.py: plain detectron2 and torchvision at 1024x2048, batch 8 (the issue's anchor);
#   2. tools/benchmark_speed.py --mode train against stock fp32 (DefaultTrainer) and stock AMP (AMPTrainer), R50-FPN,
#      synthetic 2048x1024 files with 20 instances per image, batch 8;
#   3. tools/benchmark_speed.py --mode inference (evaluation included) against DefaultPredictor;
#   4. smoke runs of what never ran on a GPU: train_net.py with the fast quickstart config (bf16) for 20
#      iterations and an evaluation, train_net.py --eval-only with the fast evaluator, predict.py.
# The last lines printed are each step's exit code and the benchmarks' summary tables. With device time left (the
# session has 15 minutes), `bash tools/gpu_check.sh ablation` (about 4 minutes) splits the gain between bfloat16 and
# the structural switches and tries grouped NMS and channels_last.
set -uo pipefail
cd "$(dirname "$0")/.."

if [ "${1:-}" = prepare ]; then
    grep -qx '/.gpu/' .git/info/exclude 2>/dev/null || echo '/.gpu/' >> .git/info/exclude
    rm -rf .gpu/wheels && mkdir -p .gpu/wheels
    cp ../shared/bench/gpu_anchor.py .gpu/
    cp .cache/setup/sal_detectron2-*.whl .gpu/wheels/ || { echo "no .cache/setup/sal_detectron2 wheel: run make setup first"; exit 1; }
    python3 -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
        --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 \
        -d .gpu/wheels iopath==0.1.9 yacs==0.1.8 termcolor==3.3.0 omegaconf==2.3.1 hydra-core==1.3.8 \
        pycocotools==2.0.11 shapely==2.2.0 cityscapesscripts==2.3.0 pyquaternion==0.9.9 coloredlogs==15.0.1 \
        humanfriendly==10.0 appdirs==1.4.4 || exit 1
    # Published as source only; pure Python, so a wheel built here installs there.
    python3 -m pip wheel -q --no-deps -w .gpu/wheels fvcore==0.1.5.post20221221 antlr4-python3-runtime==4.9.3 || exit 1
    ls .gpu/wheels && du -sh .gpu
    exit 0
fi

OUT=${OUT:-output/gpu_check}
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .gpu/wheels/*.whl \
    || { echo "wheel install failed: run 'bash tools/gpu_check.sh prepare' here and carry .gpu"; exit 1; }
export PYTHONPATH=/tmp/site:$PWD
summary=()

LOG=$OUT/steps.log
step() {  # step NAME SECONDS COMMAND...: run with a time limit, append its output to $LOG, show its end
    local name=$1 limit=$2
    shift 2
    echo "=== $name: $*" | tee -a "$LOG"
    local start=$SECONDS
    timeout "$limit" "$@" > "$OUT/step.tmp" 2>&1
    local code=$?
    cat "$OUT/step.tmp" >> "$LOG"
    tail -n 12 "$OUT/step.tmp"
    rm -f "$OUT/step.tmp"
    summary+=("$name: exit $code in $((SECONDS - start)) s")
}

{
    nvidia-smi --query-gpu=name,memory.total,clocks.sm,clocks.mem --format=csv
    python3 -c "import torch, detectron2; print('torch', torch.__version__, 'detectron2', detectron2.__version__)"
    echo "load average $(cat /proc/loadavg), $(nproc) cores"
} 2>&1 | tee -a "$LOG"

DATA=/tmp/cityseg_gpu_check
BENCH=(--device cuda --batch 8 --width 2048 --height 1024 --instances 20 --images 32 --iters 8 --warmup 3 --rounds 3
       --data-dir "$DATA/bench")

if [ "${1:-}" = ablation ]; then
    # A second, short command (about 2 minutes) for what the first leaves undecided: against stock AMP, ours with
    # bfloat16 and our training loop only (no batched heads, no tensor mask targets, no data path), then the full
    # fast path with grouped NMS and channels_last. With train_vs_amp's ratio, this splits the gain between
    # precision and structure and says whether the two switches left off should be on.
    step ablation_bf16_loop 100 python3 tools/benchmark_speed.py --config-file configs/mask_rcnn_R_50_FPN_coco_amp.yaml \
        --mode train "${BENCH[@]}" --rounds 2 --no-fast-defaults --json "$OUT/ablation_bf16_loop.json" \
        --ours-opts "SOLVER.AMP.PRECISION bfloat16 CITYSEG.FAST.TRAIN_LOOP True" DATALOADER.NUM_WORKERS 7
    step ablation_grouped_cl 100 python3 tools/benchmark_speed.py --config-file configs/mask_rcnn_R_50_FPN_coco_amp.yaml \
        --mode train "${BENCH[@]}" --rounds 2 --json "$OUT/ablation_grouped_cl.json" \
        --ours-opts "CITYSEG.FAST.NMS grouped CITYSEG.FAST.CHANNELS_LAST True" DATALOADER.NUM_WORKERS 7
    printf '%s\n' "${summary[@]}"
    grep -A 5 "timed iterations" "$LOG"
    exit 0
fi

step anchor 100 python3 .gpu/gpu_anchor.py --iters 8 --warmup 3
step train_vs_fp32 110 python3 tools/benchmark_speed.py --config-file configs/mask_rcnn_R_50_FPN_coco.yaml --mode train \
    "${BENCH[@]}" --json "$OUT/train_vs_fp32.json" DATALOADER.NUM_WORKERS 7
step train_vs_amp 100 python3 tools/benchmark_speed.py --config-file configs/mask_rcnn_R_50_FPN_coco_amp.yaml --mode train \
    "${BENCH[@]}" --json "$OUT/train_vs_amp.json" DATALOADER.NUM_WORKERS 7
step inference 80 python3 tools/benchmark_speed.py --config-file configs/mask_rcnn_R_50_FPN_coco.yaml --mode inference \
    "${BENCH[@]}" --json "$OUT/inference.json" DATALOADER.NUM_WORKERS 7

# Smoke runs on the builtin cityscapes_synthetic_instance_* names, pointed at a small synthetic set.
python3 tools/make_synthetic_cityscapes.py --out "$DATA/datasets/cityscapes_synthetic" --train 16 --val 4 \
    --width 1024 --height 512 --instances 12 --workers 8 >> "$LOG" 2>&1
export DETECTRON2_DATASETS=$DATA/datasets
FAST=configs/quickstart/mask_rcnn_R_18_FPN_GN_synthetic_fast.yaml
# grouped NMS and channels_last too: switches the benchmarks above leave off, run here once on a GPU.
SMOKE=(MODEL.DEVICE cuda OUTPUT_DIR "$DATA/smoke" SOLVER.IMS_PER_BATCH 4 DATALOADER.NUM_WORKERS 4 CITYSEG.FAST.NMS grouped
       CITYSEG.FAST.CHANNELS_LAST True)
step smoke_train 80 python3 tools/train_net.py --config-file $FAST "${SMOKE[@]}" SOLVER.MAX_ITER 20 \
    TEST.EVAL_PERIOD 20 SOLVER.CHECKPOINT_PERIOD 20
step smoke_eval_only 45 python3 tools/train_net.py --config-file $FAST --eval-only "${SMOKE[@]}" \
    MODEL.WEIGHTS "$DATA/smoke/model_final.pth" TEST.EVALUATORS '["cityscapes_fast"]'
step smoke_predict 45 python3 tools/predict.py --config-file $FAST --input "$DATA/datasets/cityscapes_synthetic/leftImg8bit/val" \
    --output "$DATA/smoke/predictions" --opts "${SMOKE[@]}" MODEL.WEIGHTS "$DATA/smoke/model_final.pth"

echo "=== summary"
printf '%s\n' "${summary[@]}" | tee "$OUT/summary.txt"
grep -A 5 "timed iterations" "$LOG"
