#!/usr/bin/env bash
# The GPU check (BENCHMARKS.md, "GPU check"): the CUDA path run for real, in at most 10 minutes on one GPU.
#   bash gpu_check.sh [OUT]       (default OUT: $OUT if set, else gpu_check_out)
# 1. tests that take a device, on CUDA: clusterer and training step, CPU vs CUDA (pytest -k on_device)
# 2. host syncs under torch.cuda.set_sync_debug_mode: none in one clusterer call, one in a full CrOC step (the
#    kept centroids' count in model.train_step, before the heads see only them)
# 3. training ViT-S/16 224 at batch 128 on the synthetic scenes, bf16 and fp16, eager and torch.compile'd:
#    images/s, peak memory, finite losses, CrOC/DINO, the clusterer's share of the step
# 4. the clusterer torch.compile'd whole (inductor, fullgraph) against eager and the official algorithm, batch 128
# 5. two ranks on the one GPU (torchrun train.py --dist_backend nccl, then gloo)
# Each part has its own time limit and the next runs whatever happened; OUT/gpu_check.json and
# OUT/gpu_check.txt (the summary, also printed) are always written. Without CUDA (or with GPU_CHECK_DRY=1) it
# is a dry run of the same parts on the CPU, in seconds, with the GPU-only parts marked "skipped: no CUDA".
# PARTS (default "tests syncs training compile ddp") picks parts, e.g. to rerun one; STEPS, WARMUP_STEPS and
# TRAIN_BUDGET_S (seconds) size part 3.
set -uo pipefail
cd "$(dirname "$0")"
OUT=${1:-${OUT:-gpu_check_out}}
PY=${PYTHON:-python}
PARTS=" ${PARTS:-tests syncs training compile ddp} "
mkdir -p "$OUT"
rm -f "$OUT"/*.json "$OUT"/parts.tsv
rm -rf "$OUT"/ddp_nccl "$OUT"/ddp_gloo

part() {  # part NAME LIMIT_S COMMAND...: run it under a time limit, log to OUT/NAME.log, note exit code and time
  local name=$1 limit=$2 start=$SECONDS rc
  shift 2
  echo "== $name (limit ${limit} s)"
  timeout -k 10 "$limit" "$@" > "$OUT/$name.log" 2>&1
  rc=$?
  printf '%s\t%s\t%s\t%s\n' "$name" "$rc" "$((SECONDS - start))" "$limit" >> "$OUT/parts.tsv"
  tail -n 1 "$OUT/$name.log"
}

want() { [[ $PARTS == *" $1 "* ]]; }

if [ "${GPU_CHECK_DRY:-0}" != 1 ] && nvidia-smi -L > "$OUT/nvidia-smi.txt" 2>&1; then
  export OMP_NUM_THREADS=${OMP_NUM_THREADS:-4}
  want tests && part tests 80 "$PY" -m pytest -q -p no:cacheprovider test_croc.py -k on_device
  want syncs && part syncs 50 "$PY" bench.py --gpu syncs --out "$OUT"
  want training && part training $((${TRAIN_BUDGET_S:-170} + 30)) "$PY" bench.py --gpu training --out "$OUT" \
       --steps "${STEPS:-100}" --warmup_steps "${WARMUP_STEPS:-10}" --budget_s "${TRAIN_BUDGET_S:-170}"
  want compile && part compile 120 "$PY" bench.py --gpu compile --out "$OUT"
  # two ranks, a few steps of train.py: the DDP code path on CUDA tensors, not a measurement
  ddp_args=(--arch vit_tiny --patch_size 16 --img_size 64 --out_dim 256 --out_dim_c 128 --k_start 6
            --batch_size_per_gpu 8 --synthetic_images 32 --synthetic_size 64 --num_workers 0 --epochs 1
            --warmup_epochs 0 --log_freq 2 --precision bf16)
  for backend in nccl gloo; do  # both ranks on the one GPU; nccl may refuse that, gloo takes CUDA tensors
    want ddp && part "ddp_$backend" $([ $backend = nccl ] && echo 40 || echo 60) \
         "$PY" -m torch.distributed.run --standalone --nproc_per_node=2 train.py "${ddp_args[@]}" \
         --dist_backend $backend --output_dir "$OUT/ddp_$backend"
  done
  "$PY" bench.py --gpu summary --out "$OUT"
else
  # the CPU skeleton: part 1's pytest call on the clusterer's CPU case (the whole suite runs every CPU case),
  # then the other parts in one process (each import costs seconds); the limits only guard against a hang
  want tests && part tests 300 "$PY" -m pytest -q -p no:cacheprovider test_croc.py \
       -k "on_device and cluster and not cuda"
  rest=$(for p in syncs training compile ddp; do want $p && echo $p; done)
  part cpu_parts 300 "$PY" bench.py --gpu $rest summary --dry --out "$OUT"
  cat "$OUT/gpu_check.txt"
fi
