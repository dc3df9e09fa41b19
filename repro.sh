#!/usr/bin/env bash
# The paper's claim on the synthetic scenes (issue 6): the same ViT-Ti/8 pretrained the same way with the same
# budget and seed as plain DINO (--alpha 0) and as CrOC (--alpha 1), and a random init, each evaluated with
# eval_linear, eval_kmeans and eval_davis on the synthetic val data. Prints the table at the end.
#   bash repro.sh [OUT]        (default OUT=repro; under half an hour on a 2-core CPU)
#   SEED=1 bash repro.sh OUT   (another seed for pretraining, the random init and the linear head; same data)
#   EPOCHS=24 bash repro.sh OUT (a longer pretraining; the schedules stretch with it)
# The two pretrainings run side by side, one core each (one thread each is faster in total than two in turn).
# Small-scale settings (see README, "Results on the synthetic scenes"): a 256-d output for both heads, a sharp
# teacher (0.02) without warm-up, a trainable last layer, constant weight decay; everything else is DINO's.
set -euo pipefail
OUT=${1:-repro}
PY=${PYTHON:-python}
SEED=${SEED:-0}
EPOCHS=${EPOCHS:-8}
COMMON="--arch vit_tiny --patch_size 8 --img_size 64 --synthetic_size 96 --synthetic_images 2000
        --batch_size_per_gpu 32 --epochs $EPOCHS --warmup_epochs 1 --lr 0.001 --momentum_teacher 0.99
        --out_dim 256 --out_dim_c 256 --warmup_teacher_temp 0.02 --teacher_temp 0.02
        --norm_last_layer false --freeze_last_layer 0 --weight_decay_end 0.04 --num_workers 1 --seed $SEED"
mkdir -p "$OUT"
[ -d "$OUT/data" ] || $PY data.py --write-synthetic "$OUT/data" --n-train 300 --n-val 100 --n-videos 5 --size 96 > "$OUT/data.log" 2>&1
for alpha in 0 1; do
  name=$([ $alpha = 0 ] && echo dino || echo croc)
  OMP_NUM_THREADS=1 $PY train.py $COMMON --alpha $alpha --output_dir "$OUT/$name" > "$OUT/$name.log" 2>&1 &
done
wait
for run in random dino croc; do
  if [ $run = random ]; then W="--random_init"; else W="--weights $OUT/$run/checkpoint.pth"; fi
  B="--arch vit_tiny --patch_size 8 --seed $SEED $W"
  $PY eval_linear.py --dataset synthetic --data_path "$OUT/data" $B --img_size 96 --epochs 20 \
      --output_dir "$OUT/$run/linear" > "$OUT/$run.linear.log" 2>&1
  $PY eval_kmeans.py --dataset synthetic --data_path "$OUT/data" $B --img_size 96 \
      --output_dir "$OUT/$run/kmeans" > "$OUT/$run.kmeans.log" 2>&1
  $PY eval_davis.py --data_path "$OUT/data/DAVIS" $B --short_side 96 \
      --output_dir "$OUT/$run/davis" > "$OUT/$run.davis.log" 2>&1
done
$PY - "$OUT" <<'PYEOF'
import csv, json, sys
out = sys.argv[1]
print("| ViT-Ti/8 | linear mIoU | k-means mIoU (5 seeds) | J&F | J | F |\n|---|---|---|---|---|---|")
for run in ("random", "dino", "croc"):
    lin = json.load(open(f"{out}/{run}/linear/results.json"))["miou"]
    km = json.load(open(f"{out}/{run}/kmeans/results.json"))
    davis = next(csv.DictReader(open(f"{out}/{run}/davis/scores/global_results-val.csv")))
    print(f"| {run} | {100 * lin:.2f} | {100 * km['miou_mean']:.2f} +- {100 * km['miou_std']:.2f} | "
          f"{float(davis['J&F-Mean']):.3f} | {float(davis['J-Mean']):.3f} | {float(davis['F-Mean']):.3f} |")
PYEOF
