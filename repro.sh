#!/usr/bin/env bash
# CrOC's claim on the synthetic scenes (synthetic.py): the same ViT (vit_nano/8, a CPU size, not the paper's ViT-S/16)
# pretrained the same way with the same budget and seed as plain DINO (--alpha 0) and as CrOC (--alpha 1), and a
# random init, each evaluated with eval_linear, eval_kmeans and eval_davis on the synthetic val data. Prints the
# table at the end.
#   bash repro.sh [OUT]        (default OUT=repro)
#   SEED=1 bash repro.sh OUT   (another seed for pretraining, the random init and the linear head; same data)
#   EPOCHS=6 bash repro.sh OUT (a longer pretraining; the schedules stretch with it)
#   QUICK=1 bash repro.sh OUT  (the same steps on tiny data in under a minute, the independent ones side by side:
#                              CI runs it so that the recipe cannot rot; its numbers mean nothing)
# Each pretraining also writes OUT/{dino,croc}/curves.png (visualize.py --log) with the k-means mIoU of the teacher
# after every epoch (--eval_every 1).
# The two pretrainings run side by side, one core each (one thread each is faster in total than two in turn).
# Settings chosen on DINO alone, before any CrOC run (BENCHMARKS.md, "Pilots: does DINO learn on the synthetic
# scenes?"; they are pilot P7's): 64-px scenes, 48-px views, a 256-d output for both heads, a sharp teacher (0.02)
# without warm-up, a trainable last layer, constant weight decay, gradient clipping at 3, a peak lr of 0.004 per
# 256 images (5e-4 at batch 32, DINO's). Not yet a recipe in which DINO beats the random init: every pilot so far
# ended in DINO's uniform collapse, so CrOC against DINO is not yet worth running with them.
set -euo pipefail
OUT=${1:-repro}
PY=${PYTHON:-python}
SEED=${SEED:-0}
EPOCHS=${EPOCHS:-3}
if [ "${QUICK:-0}" = 1 ]; then
  EPOCHS=1 IMAGES=32 BATCH=8 DATA="--n-train 8 --n-val 4 --n-videos 1 --n-frames 4" LINEAR_EPOCHS=1 KSEEDS=0
  RUNS="croc" WORKERS=0  # one evaluated model: every command of the recipe runs once
else
  IMAGES=2000 BATCH=32 DATA="--n-train 300 --n-val 100 --n-videos 5" LINEAR_EPOCHS=20 KSEEDS="0 1 2 3 4"
  RUNS="random dino croc" WORKERS=4
fi
COMMON="--arch vit_nano --patch_size 8 --img_size 48 --synthetic_size 64 --synthetic_images $IMAGES
        --batch_size_per_gpu $BATCH --epochs $EPOCHS --warmup_epochs 1 --lr 0.004 --clip_grad 3.0
        --momentum_teacher 0.99 --out_dim 256 --out_dim_c 256 --warmup_teacher_temp 0.02 --teacher_temp 0.02
        --norm_last_layer false --freeze_last_layer 0 --weight_decay_end 0.04 --num_workers 1 --seed $SEED"
# A command of the recipe: run in turn; with QUICK=1 (seconds each, mostly imports) side by side with the next ones
# that do not need its output, until steps_done waits for them
step_pids=""
step() { if [ "${QUICK:-0}" = 1 ]; then "$@" & step_pids="$step_pids $!"; else "$@"; fi; }
steps_done() {
  for pid in $step_pids; do wait "$pid" || { echo "a step failed: see the logs in $OUT" >&2; exit 1; }; done
  step_pids=""
}
mkdir -p "$OUT"
[ -d "$OUT/data" ] || step $PY data.py --write-synthetic "$OUT/data" $DATA --size 64 > "$OUT/data.log" 2>&1
pids=""
for alpha in 0 1; do
  name=$([ $alpha = 0 ] && echo dino || echo croc)
  OMP_NUM_THREADS=1 $PY train.py $COMMON --alpha $alpha --eval_every 1 \
      --eval_args "--img_size 64 --n_last_blocks 1 --seeds 0 --n_pictures 0" --output_dir "$OUT/$name" \
      > "$OUT/$name.log" 2>&1 &
  pids="$pids $!"
done
for pid in $pids; do wait "$pid" || { echo "a pretraining failed: see $OUT/dino.log and $OUT/croc.log" >&2; exit 1; }; done
steps_done  # the data
for name in dino croc; do
  step $PY visualize.py --log "$OUT/$name/log.txt" --output "$OUT/$name/curves.png" > /dev/null
done
for run in $RUNS; do
  if [ $run = random ]; then W="--random_init"; else W="--weights $OUT/$run/checkpoint.pth"; fi
  B="--arch vit_nano --patch_size 8 --seed $SEED --num_workers $WORKERS $W"  # eval_davis reads no workers
  step $PY eval_linear.py --dataset synthetic --data_path "$OUT/data" $B --img_size 64 --epochs $LINEAR_EPOCHS \
      --output_dir "$OUT/$run/linear" > "$OUT/$run.linear.log" 2>&1
  step $PY eval_kmeans.py --dataset synthetic --data_path "$OUT/data" $B --img_size 64 --seeds $KSEEDS \
      --output_dir "$OUT/$run/kmeans" > "$OUT/$run.kmeans.log" 2>&1
  step $PY eval_davis.py --data_path "$OUT/data/DAVIS" --arch vit_nano --patch_size 8 --seed $SEED $W \
      --short_side 96 --output_dir "$OUT/$run/davis" > "$OUT/$run.davis.log" 2>&1
done
steps_done
$PY - "$OUT" $RUNS <<'PYEOF'
import csv, json, sys
out, runs = sys.argv[1], sys.argv[2:]
print("| vit_nano/8 | linear mIoU | k-means mIoU | J&F | J | F |\n|---|---|---|---|---|---|")
for run in runs:
    lin = json.load(open(f"{out}/{run}/linear/results.json"))["miou"]
    km = json.load(open(f"{out}/{run}/kmeans/results.json"))
    davis = next(csv.DictReader(open(f"{out}/{run}/davis/scores/global_results-val.csv")))
    print(f"| {run} | {100 * lin:.2f} | {100 * km['miou_mean']:.2f} +- {100 * km['miou_std']:.2f} | "
          f"{float(davis['J&F-Mean']):.3f} | {float(davis['J-Mean']):.3f} | {float(davis['F-Mean']):.3f} |")
PYEOF
