#!/usr/bin/env bash
# CrOC's claim on the synthetic scenes (synthetic.py): the same ViT (vit_nano/8, a CPU size, not the paper's ViT-S/16)
# pretrained the same way with the same budget and seed as plain DINO (--alpha 0) and as CrOC (--alpha 1), and a
# random init, each evaluated with eval_linear, eval_kmeans and eval_davis on the synthetic val data. Prints the
# table at the end, with CrOC's K statistics (its last epoch's log.txt). About 50 min on 2 CPU cores.
#   bash repro.sh [OUT]          (default OUT=repro)
#   SEED=1 bash repro.sh OUT     (another seed for pretraining, the random init and the linear head; same data)
#   bash repro.sh --table OUT... (the tables of finished runs, e.g. one per seed, and their mean +- std)
#   LAMBDA_POS=1 bash repro.sh OUT (the ablation: CrOC with another --lambda_pos, in OUT/croc_lambda_pos1; the DINO
#                                run and the evaluations already in OUT are reused)
#   K_MAX=4 / K_START=8 bash repro.sh OUT (the same for --k_max / --k_start, in OUT/croc_k_max4 / OUT/croc_k_start8;
#                                several variables together name the run after each: croc_k_start8_k_max4)
#   DINO=0 bash repro.sh OUT     (the CrOC pipeline alone: no DINO pretraining, no DINO or random-init evaluation)
#   QUICK=1 bash repro.sh OUT    (the same steps on tiny data in about a minute, CrOC's evaluations only: CI runs it
#                                so that the recipe cannot rot; its numbers mean nothing)
# Other recipes (each in its own OUT):
#   EPOCHS=N                     (another pretraining length; the schedules stretch with it)
#   HEAD_HIDDEN=2048             (both heads' hidden width, train.py --head_hidden_dim; 2048 is the paper's, 512
#                                DINO's width for ViT-S scaled to vit_nano's 96-d tokens)
#   BN=0                         (no BatchNorm in the heads, and 100 epochs unless EPOCHS says otherwise: DINO
#                                does not learn the patches there, CrOC does; see BENCHMARKS.md)
#   GREY=1                       (every scene and video in one grey palette: data.py --grey, train.py
#                                --synthetic_grey true; only the texture tells instances apart)
# Re-running resumes: train.py continues from OUT/NAME/checkpoint.pth, and an evaluation whose results exist is
# skipped. Each pretraining writes OUT/NAME/curves.png (visualize.py --log) with the teacher's k-means mIoU every
# 20 epochs (--eval_every 20).
# The two pretrainings run side by side, one core each (one thread each is faster in total than two in turn); each
# model is evaluated as soon as its pretraining ends, the random init after DINO.
# Settings: 64-px scenes, 48-px views from crops of 0.5-1 of the scene, 640 scenes x 300 epochs of 20 steps of 32
# images, DINO's BatchNorm head (train.py --use_bn_in_head true) 512 wide with a 256-d output for both heads, a sharp
# teacher (0.02) without warm-up, a trainable last layer, teacher momentum 0.996, no stochastic depth, constant
# weight decay, gradient clipping at 3, a peak lr of 0.002 per 256 images. They were chosen for DINO; CrOC runs
# with its own defaults (K_start 12, lambda_pos 4, ...), untuned.
# k-means: 5 seeds of 5 restarts each (eval_kmeans.py --n_init 5, Leopart's nredo): with one restart a seed's fit
# may land in a poor optimum, and the 5-seed mean of one checkpoint moved by up to 2.3 mIoU (BENCHMARKS.md).
set -euo pipefail
PY=${PYTHON:-python}
if [ "${1:-}" = --table ]; then
  shift; exec $PY - "$@" <<'PYEOF'
import csv, json, os, statistics, sys

def row(out, run):
    lin = json.load(open(f"{out}/{run}/linear/results.json"))["miou"]
    km = json.load(open(f"{out}/{run}/kmeans/results.json"))
    davis = next(csv.DictReader(open(f"{out}/{run}/davis/scores/global_results-val.csv")))
    r = {"linear": 100 * lin, "kmeans": 100 * km["miou_mean"], "kmeans_std": 100 * km["miou_std"],
         "J&F": float(davis["J&F-Mean"]), "J": float(davis["J-Mean"]), "F": float(davis["F-Mean"])}
    if os.path.exists(f"{out}/{run}/log.txt"):
        with open(f"{out}/{run}/log.txt") as f:
            last = json.loads(f.read().splitlines()[-1])
        if "mean_k" in last:
            r.update(mean_k=last["mean_k"], kept=last["kept_centroids"], none=last["share_images_no_centroid"])
    return r


def k_stats(r):
    return f"{r['mean_k']:.2f} | {r['kept']:.1f} | {100 * r['none']:.1f}%" if "mean_k" in r else "- | - | -"


def mean_std(rs, key, fmt):
    values = [r[key] for r in rs]
    std = statistics.stdev(values) if len(values) > 1 else float("nan")
    return f"{statistics.mean(values):{fmt}} +- {std:{fmt}}"


def gaps(outs, rows):
    """Per run folder (one per seed), the gaps CrOC - DINO and DINO - random, and in how many folders each is > 0:
    "in every seed" is then read off the script, not the table."""
    pairs = [(a, b) for a, b in [("croc", "dino"), ("dino", "random")] if a in rows and b in rows]
    by_out = {run: {r["out"]: r for r in rs} for run, rs in rows.items()}
    keys = [("linear", ".2f"), ("kmeans", ".2f"), ("J&F", ".3f")]
    for a, b in pairs:
        both = [o for o in outs if o in by_out[a] and o in by_out[b]]
        if not both:
            continue
        print(f"\n| {a} - {b} | linear mIoU | k-means mIoU | J&F |")
        print("|---|---|---|---|")
        diffs = {k: [by_out[a][o][k] - by_out[b][o][k] for o in both] for k, _ in keys}
        for i, o in enumerate(both):
            print(f"| {o} | " + " | ".join(f"{diffs[k][i]:+{f}}" for k, f in keys) + " |")
        std = {k: statistics.stdev(v) if len(v) > 1 else float("nan") for k, v in diffs.items()}
        print("| mean +- std | " + " | ".join(f"{statistics.mean(diffs[k]):+{f}} +- {std[k]:{f}}" for k, f in keys)
              + " |")
        print(f"| {a} > {b} in | " + " | ".join(f"{sum(d > 0 for d in diffs[k])} of {len(both)}" for k, _ in keys)
              + " |")


outs, rows = sys.argv[1:], {}
if not outs:
    sys.exit("usage: bash repro.sh --table OUT [OUT ...] (folders of finished repro.sh runs)")
print("| vit_nano/8 | linear mIoU | k-means mIoU | J&F | J | F | CrOC: mean K | kept centroids | no centroid |")
print("|---|---|---|---|---|---|---|---|---|")
for out in outs:
    croc_variants = sorted(d for d in os.listdir(out) if d.startswith("croc_"))
    for run in ["random", "dino", "croc"] + croc_variants:
        if not os.path.isdir(f"{out}/{run}/linear"):  # not evaluated (QUICK=1 evaluates CrOC only)
            continue
        try:
            r = row(out, run)
        except FileNotFoundError as e:
            sys.exit(f"{out}: no results for {run} ({e.filename}): run repro.sh on it first")
        r["out"] = out
        rows.setdefault(run, []).append(r)
        name = run if len(outs) == 1 else f"{run}, {out}"
        print(f"| {name} | {r['linear']:.2f} | {r['kmeans']:.2f} +- {r['kmeans_std']:.2f} | {r['J&F']:.3f} | "
              f"{r['J']:.3f} | {r['F']:.3f} | {k_stats(r)} |")
if len(outs) > 1:  # mean +- sample std over the runs; for k-means, of each run's mean over the k-means seeds
    print("\n| mean +- std (n runs) | linear mIoU | k-means mIoU | J&F | CrOC: mean K | kept centroids |")
    print("|---|---|---|---|---|---|")
    for run, rs in rows.items():
        ks = f"{mean_std(rs, 'mean_k', '.2f')} | {mean_std(rs, 'kept', '.1f')}" if "mean_k" in rs[0] else "- | -"
        print(f"| {run} ({len(rs)}) | {mean_std(rs, 'linear', '.2f')} | {mean_std(rs, 'kmeans', '.2f')} | "
              f"{mean_std(rs, 'J&F', '.3f')} | {ks} |")
    gaps(outs, rows)
PYEOF
fi
OUT=${1:-repro}
SEED=${SEED:-0}
LAMBDA_POS=${LAMBDA_POS:-4}  # CrOC's defaults: lambda_pos 4, K_start 12, K_max = K_start
CROC=croc CROC_FLAGS="--lambda_pos $LAMBDA_POS"
[ "$LAMBDA_POS" = 4 ] || CROC="${CROC}_lambda_pos$LAMBDA_POS"
[ -z "${K_START:-}" ] || CROC="${CROC}_k_start$K_START" CROC_FLAGS="$CROC_FLAGS --k_start $K_START"
[ -z "${K_MAX:-}" ] || CROC="${CROC}_k_max$K_MAX" CROC_FLAGS="$CROC_FLAGS --k_max $K_MAX"
BN=${BN:-1}
DINO=${DINO:-1}
[ "$DINO" = 0 ] || [ "$DINO" = 1 ] || { echo "repro.sh: DINO must be 0 or 1, not '$DINO'" >&2; exit 2; }
EPOCHS=${EPOCHS:-$([ "$BN" = 1 ] && echo 300 || echo 100)}
HEAD="$([ "$BN" = 1 ] && echo "--use_bn_in_head true" || true) --head_hidden_dim ${HEAD_HIDDEN:-512}"
GREY=${GREY:-0}
if [ "${QUICK:-0}" = 1 ]; then
  EPOCHS=1 IMAGES=32 BATCH=8 DATA="--n-train 8 --n-val 4 --n-videos 1 --n-frames 4" LINEAR_EPOCHS=1 KSEEDS=0
  WORKERS=0 EVAL_EVERY=1  # CrOC alone is evaluated (below): every command of the recipe runs once
else
  IMAGES=640 BATCH=32 DATA="--n-train 300 --n-val 100 --n-videos 5" LINEAR_EPOCHS=20 KSEEDS="0 1 2 3 4"
  WORKERS=4 EVAL_EVERY=20
fi
COMMON="--arch vit_nano --patch_size 8 --img_size 48 --synthetic_size 64 --synthetic_images $IMAGES
        --batch_size_per_gpu $BATCH --epochs $EPOCHS --warmup_epochs 1 --lr 0.002 --clip_grad 3.0
        --momentum_teacher 0.996 --out_dim 256 --out_dim_c 256 --warmup_teacher_temp 0.02 --teacher_temp 0.02
        --norm_last_layer false --freeze_last_layer 0 --weight_decay_end 0.04 --global_crops_scale 0.5 1.0
        --drop_path_rate 0 --precision fp32 --num_workers 1 --seed $SEED $HEAD"
WORLD=""
if [ "$GREY" = 1 ]; then  # --eval_every then reads the grey val scenes written below (in-memory ones are colour)
  DATA="$DATA --grey" WORLD="--synthetic_grey true --eval_data_path $OUT/data"
fi
mkdir -p "$OUT"
[ -d "$OUT/data" ] || $PY data.py --write-synthetic "$OUT/data" $DATA --size 64 > "$OUT/data.log" 2>&1

evaluate() {  # linear, k-means and DAVIS of one run; one whose results file exists is skipped (delete it to redo)
  local run=$1 W B
  if [ "$run" = random ]; then W="--random_init"; else W="--weights $OUT/$run/checkpoint.pth"; fi
  B="--arch vit_nano --patch_size 8 --seed $SEED --num_workers $WORKERS $W"  # eval_davis reads no workers
  [ -f "$OUT/$run/linear/results.json" ] ||
    $PY eval_linear.py --dataset synthetic --data_path "$OUT/data" $B --img_size 64 --epochs $LINEAR_EPOCHS \
      --output_dir "$OUT/$run/linear" > "$OUT/$run.linear.log" 2>&1
  [ -f "$OUT/$run/kmeans/results.json" ] ||
    $PY eval_kmeans.py --dataset synthetic --data_path "$OUT/data" $B --img_size 64 --seeds $KSEEDS --n_init 5 \
      --output_dir "$OUT/$run/kmeans" > "$OUT/$run.kmeans.log" 2>&1
  [ -f "$OUT/$run/davis/scores/global_results-val.csv" ] ||
    $PY eval_davis.py --data_path "$OUT/data/DAVIS" --arch vit_nano --patch_size 8 --seed $SEED $W \
      --short_side 96 --output_dir "$OUT/$run/davis" > "$OUT/$run.davis.log" 2>&1
}

pipeline() {  # pretrain one model (one thread), draw its curves, then evaluate the runs named after it
  local name=$1 flags run
  shift
  if [ "$name" = dino ]; then flags="--alpha 0"; else flags="--alpha 1 $CROC_FLAGS"; fi
  OMP_NUM_THREADS=1 $PY train.py $COMMON $WORLD $flags --eval_every $EVAL_EVERY \
      --eval_args "--img_size 64 --n_last_blocks 1 --seeds 0 --n_pictures 0" --output_dir "$OUT/$name" \
      >> "$OUT/$name.log" 2>&1
  $PY visualize.py --log "$OUT/$name/log.txt" --output "$OUT/$name/curves.png" > /dev/null
  for run in "$@"; do evaluate "$run"; done
}

# The two pipelines side by side (CrOC's alone with DINO=0): DINO ends first, and its and the random init's
# evaluations then run while CrOC still trains
DINO_EVALS=$([ "${QUICK:-0}" = 1 ] || echo "dino random")  # QUICK=1 evaluates CrOC only
status=0
if [ "$DINO" = 1 ]; then
  pipeline dino $DINO_EVALS & dino_pid=$!
fi
pipeline "$CROC" "$CROC" & croc_pid=$!
if [ "$DINO" = 1 ]; then
  wait $dino_pid || { echo "the DINO pipeline failed: see $OUT/dino*.log and $OUT/random.*.log" >&2; status=1; }
fi
wait $croc_pid || { echo "the CrOC pipeline failed: see $OUT/$CROC*.log" >&2; status=1; }
[ $status = 0 ] || exit 1
bash "$0" --table "$OUT"
