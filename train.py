"""CrOC pretraining (Fig. 2, Eq. 1-7): DINO's self-distillation plus a dense loss on the centroids that an online
clustering finds in the joint tokens of two views.

    python train.py --output_dir out                       # one process (CPU or one GPU), synthetic scenes
    torchrun --nproc_per_node=2 train.py --data_path /coco/train2017 --output_dir out   # DDP

Re-running the same command resumes from output_dir/checkpoint.pth. `main` reads as DINO's `train_dino`, in
stages, and `train_one_epoch` holds the step (model.train_step, then model.optimizer_step); the helpers that make
a run survive kills and signals (exact resume, atomic writes, stop flags, log repair) come after them.
"""
import argparse
import datetime
import errno
import fcntl
import json
import math
import multiprocessing
import os
import shlex
import signal
import socket
import subprocess
import sys
import time
from contextlib import nullcontext

import numpy as np
import torch
import torch.distributed as dist
import torch.nn as nn
from tqdm import tqdm

import clustering
import data
from data import StopFlag, save_atomic
from model import (CrOCLoss, PretrainConfig, all_reduce, bool_flag, build_student_teacher, init_distributed,
                   load_backbone_weights, optimizer_step, param_groups, read_backbone, torch_load, train_step,
                   world_size)

DEFAULTS = PretrainConfig()  # the paper's settings (Sec. 4.1, App. B): the defaults of every flag they cover


def is_main_process():
    return not dist.is_initialized() or dist.get_rank() == 0


# --------------------------------------------------------------------------------------------------------------
# Arguments
# --------------------------------------------------------------------------------------------------------------
def get_args_parser():
    p = argparse.ArgumentParser("CrOC pretraining", add_help=False,
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    add_model_args(p.add_argument_group("model"))
    add_clustering_args(p.add_argument_group("CrOC clustering (Sec. 3.3)"))
    add_loss_args(p.add_argument_group("temperatures and centring (Eq. 3, 5; App. B)"))
    add_optimisation_args(p.add_argument_group("optimisation (DINO's defaults, App. B)"))
    add_data_args(p.add_argument_group("data"))
    add_run_args(p.add_argument_group("run"))
    return p


def add_model_args(g):
    g.add_argument("--arch", default=DEFAULTS.arch, choices=["vit_nano", "vit_tiny", "vit_small", "vit_base"],
                   help="Backbone. The paper: ViT-S/16.")
    g.add_argument("--patch_size", default=DEFAULTS.patch_size, type=int, help="8 or 16. The paper: 16.")
    g.add_argument("--out_dim", default=DEFAULTS.out_dim, type=int,
                   help="Image head output L-bar (Sec. 4.1: 65,536).")
    g.add_argument("--out_dim_c", default=DEFAULTS.out_dim_c, type=int,
                   help="Centroid head output L (Sec. 4.1: 8,192).")
    g.add_argument("--head_hidden_dim", default=DEFAULTS.head_hidden_dim, type=int,
                   help="Width of the head's two hidden layers (DINO's and the paper's: 2048). Narrower for CPU runs "
                        "of vit_nano (repro.sh: 512).")
    g.add_argument("--norm_last_layer", default=DEFAULTS.norm_last_layer, type=bool_flag,
                   help="Fix the norm of the heads' weight-normalised last layers (weight_g frozen at 1). App. B: "
                        "false for the DINO run, and CrOC uses the same (its footnote 4); DINO advises false for "
                        "ViT-S, true for ViT-B stability. The official CrOC parser defaults to true.")
    g.add_argument("--use_bn_in_head", default=DEFAULTS.use_bn_in_head, type=bool_flag,
                   help="BatchNorm after each hidden layer of the head: DINO's --use_bn_in_head (default false there, "
                        "and off in DINO's and CrOC's runs). Images and centroids are normalised as two batches, the "
                        "centroids over the kept ones only (not in the paper: model.HeadBatchNorm). The statistics "
                        "are summed over all processes, as DINO's SyncBatchNorm, on CPU too.")
    g.add_argument("--momentum_teacher", default=DEFAULTS.momentum_teacher, type=float,
                   help="Teacher EMA momentum, cosine to 1 (DINO). 0.996 for batch 256; with small batches use "
                        "0.9995 or more.")
    g.add_argument("--drop_path_rate", default=DEFAULTS.drop_path_rate, type=float,
                   help="Stochastic depth of the student.")
    g.add_argument("--init_weights", default=None,
                   help="A new run's student and teacher backbones start from this checkpoint, a path or a URL "
                        "(anything model.load_pretrained reads, e.g. the released DINO or CrOC weights; its arch "
                        "must be --arch/--patch_size); the heads start fresh. A resumed run continues its own "
                        "checkpoint.pth instead. Default: DINO's random init.")
    g.add_argument("--init_checkpoint_key", default="teacher",
                   help="Which network of a training checkpoint --init_weights reads (default: teacher).")


def add_clustering_args(g):
    g.add_argument("--alpha", default=DEFAULTS.alpha, type=float,
                   help="Weight of the dense loss (Eq. 7; paper 1.0). 0 = plain DINO, clustering skipped.")
    g.add_argument("--which_features", default=DEFAULTS.which_features, choices=["last", "q", "k", "v"],
                   help="Tokens clustered (Eq. 21, Table 6): last-block values (paper's COCO runs), keys "
                        "(ablations, ImageNet), queries, or the final tokens (`last`).")
    g.add_argument("--k_start", default=DEFAULTS.k_start, type=int,
                   help="Initial number of centroids K_start (paper: 12).")
    g.add_argument("--k_max", default=DEFAULTS.k_max, type=int,
                   help="Largest K the selection may pick (default: k_start; the official code: 4 with k_start 5).")
    g.add_argument("--lambda_pos", default=DEFAULTS.lambda_pos, type=float,
                   help="Weight of the positional cost (Eq. 18; paper 4 on COCO, 3 on ImageNet and in ablations).")
    g.add_argument("--sinkhorn_lambda", default=DEFAULTS.sinkhorn_lambda, type=float,
                   help="Entropy regularisation lambda (Eq. 11).")
    g.add_argument("--sinkhorn_iterations", default=DEFAULTS.sinkhorn_iterations, type=int,
                   help="Sinkhorn rounds (official: 5).")
    g.add_argument("--marginal_temp", default=DEFAULTS.marginal_temp, type=float,
                   help="Temperature of the r and c marginals (official code: 2.0; Eq. 10 has none).")
    g.add_argument("--uniform_marginals", action="store_true", default=DEFAULTS.uniform_marginals,
                   help="Uniform r and c instead of the tokens' similarity to the CLS token.")


def add_loss_args(g):
    g.add_argument("--warmup_teacher_temp", default=DEFAULTS.warmup_teacher_temp, type=float,
                   help="Initial teacher temperature.")
    g.add_argument("--teacher_temp", default=DEFAULTS.teacher_temp, type=float,
                   help="Teacher temperature after warm-up (paper 0.07). If training collapses (loss stuck at "
                        "log(out_dim)), lower it to 0.04, as DINO advises.")
    g.add_argument("--warmup_teacher_temp_epochs", default=DEFAULTS.warmup_teacher_temp_epochs, type=int,
                   help="Epochs of teacher-temp warm-up.")
    g.add_argument("--student_temp", default=DEFAULTS.student_temp, type=float,
                   help="Student temperature (paper 0.1).")
    g.add_argument("--center_momentum", default=DEFAULTS.center_momentum, type=float,
                   help="Momentum of both running centres.")


def add_optimisation_args(g):
    g.add_argument("--precision", default=DEFAULTS.precision, choices=["fp16", "bf16", "fp32"],
                   help="Mixed precision on GPU (paper: fp16; bf16 avoids fp16 overflow NaNs). CPU always fp32.")
    g.add_argument("--batch_size_per_gpu", default=DEFAULTS.batch_size_per_gpu, type=int,
                   help="Images per process. Paper: 256 in total over 2 GPUs.")
    g.add_argument("--epochs", default=DEFAULTS.epochs, type=int, help="Paper: 300 on COCO.")
    g.add_argument("--lr", default=DEFAULTS.lr, type=float, help="Peak lr for a total batch of 256, scaled linearly.")
    g.add_argument("--min_lr", default=DEFAULTS.min_lr, type=float, help="Final lr of the cosine schedule.")
    g.add_argument("--warmup_epochs", default=DEFAULTS.warmup_epochs, type=int, help="Linear lr warm-up epochs.")
    g.add_argument("--weight_decay", default=DEFAULTS.weight_decay, type=float,
                   help="Initial weight decay (cosine schedule).")
    g.add_argument("--weight_decay_end", default=DEFAULTS.weight_decay_end, type=float, help="Final weight decay.")
    g.add_argument("--clip_grad", default=DEFAULTS.clip_grad, type=float,
                   help="Max gradient norm per parameter; 0 disables (paper: none; official default 3.0).")
    g.add_argument("--freeze_last_layer", default=DEFAULTS.freeze_last_layer, type=int,
                   help="Epochs during which the heads' last layers stay fixed (DINO: 1).")


def add_data_args(g):
    g.add_argument("--data_path", nargs="+", default=None,
                   help="Image folder(s), searched recursively (COCO+: train2017 unlabeled2017). "
                        "Default: the built-in synthetic scenes.")
    g.add_argument("--img_size", default=DEFAULTS.img_size, type=int, help="Size of both views.")
    g.add_argument("--global_crops_scale", nargs=2, default=DEFAULTS.global_crops_scale, type=float,
                   help="Crop scale range.")
    g.add_argument("--synthetic_images", default=2000, type=int, help="Size of the synthetic dataset.")
    g.add_argument("--synthetic_size", default=128, type=int, help="Side of the synthetic scene images.")
    g.add_argument("--synthetic_grey", default=False, type=bool_flag,
                   help="Paint the synthetic scenes in one grey palette (data.py --grey), so that only the texture "
                        "tells two instances apart (default false: random colours per instance).")
    g.add_argument("--num_workers", default=8, type=int, help="Data loading workers per process.")


def add_run_args(g):
    g.add_argument("--output_dir", default="output", help="Checkpoints, log.txt and config.json go here.")
    g.add_argument("--saveckp_freq", default=20, type=int, help="Keep checkpoint{epoch:04}.pth every N epochs.")
    g.add_argument("--seed", default=0, type=int, help="Seed; each rank uses seed + rank.")
    g.add_argument("--log_freq", default=10, type=int, help="Steps between progress updates (and host syncs).")
    g.add_argument("--dist_timeout", default=10.0, type=float,
                   help="Minutes a collective waits for the other ranks before the run fails. A rank that dies is "
                        "noticed at once; a frozen one (stopped, deadlocked, a hung file system) only after this. "
                        "Raise it if rank 0's epoch-end work (checkpoint on a slow disk, --visualize_every) can "
                        "take longer.")
    g.add_argument("--dist_backend", default="auto", choices=["auto", "nccl", "gloo"],
                   help="Process group of a torchrun run: auto is nccl on GPUs, gloo on CPUs. gloo also runs on "
                        "GPUs, e.g. two ranks sharing one GPU, which nccl refuses.")
    g.add_argument("--visualize_every", default=0, type=int,
                   help="Every N epochs (and before the first), draw the teacher's clusters and CLS attention on a "
                        "fixed batch of 4 images to output_dir/clusters_epoch{epochs done:04}.png (visualize.py); "
                        "0 disables. Costs one teacher pass; training is unchanged.")
    g.add_argument("--eval_every", default=0, type=int,
                   help="Every N epochs, a quick k-means mIoU of the teacher on a held-out segmentation set "
                        "(eval_kmeans.py, run by rank 0 as its own process on the teacher's weights; the other ranks "
                        "wait), logged as eval_kmeans_miou in log.txt; results in output_dir/eval/epochNNNN. "
                        "0 disables. Leopart monitors its training the same way. Keep it quick: the ranks wait "
                        "at most --dist_timeout minutes.")
    g.add_argument("--eval_dataset", default="synthetic",
                   help="Dataset of --eval_every, any eval_kmeans.py reads (default: the held-out synthetic val "
                        "scenes, generated in memory).")
    g.add_argument("--eval_data_path", default=None, help="Its root (eval_kmeans.py --data_path).")
    g.add_argument("--eval_args", default="--img_size 96 --n_last_blocks 1 --seeds 0 --n_pictures 0",
                   help="Further eval_kmeans.py flags of --eval_every (quick ones by default: 96 px, the last "
                        "block, one k-means seed).")


def check_args(args):
    """data.InputError naming the flag, its range and its value, for a value outside the range the run needs:
    one that would fail later, deep in the run, or silently train something else (--out_dim 1: a softmax over one
    output is constant, and its loss 0). Every numeric flag has its range here (a test gives each a bad value)."""
    def need(ok, flag, why):
        data.need(ok, args, flag, why)

    def each(flags, ok, why):
        for flag in flags:
            need(ok(getattr(args, flag)), flag, why)
    # sizes and counts (patch_size first: the img_size check divides by it)
    each(("patch_size", "head_hidden_dim", "batch_size_per_gpu", "sinkhorn_iterations", "synthetic_size",
          "log_freq"), lambda v: v >= 1, "must be at least 1")
    each(("out_dim", "out_dim_c"), lambda v: v >= 2, "must be at least 2: a softmax over one output is constant, "
                                                     "and its loss 0")
    need(args.epochs >= 1, "epochs", "must be at least 1 (to train a finished run longer, re-run it with a larger "
                                     "--epochs)")
    need(0 <= args.warmup_epochs <= args.epochs, "warmup_epochs",
         f"must lie in [0, --epochs {args.epochs}]; more would stop the lr before it reaches its peak --lr")
    each(("warmup_teacher_temp_epochs", "freeze_last_layer", "num_workers", "visualize_every"), lambda v: v >= 0,
         "must be >= 0")
    need(args.saveckp_freq >= 0, "saveckp_freq", "must be >= 0 (0: keep no numbered checkpoints)")
    need(args.eval_every >= 0, "eval_every", "must be >= 0 (0: no evaluation during training)")
    need(0 <= args.seed < 2 ** 31, "seed", "must lie in [0, 2^31): numpy's seeds are 32-bit, and each rank adds its "
                                           "rank")
    # weights, rates and temperatures (a float flag also takes nan and inf)
    each(("lr", "min_lr", "weight_decay", "weight_decay_end", "clip_grad", "alpha", "lambda_pos"),
         lambda v: math.isfinite(v) and v >= 0, "must be a finite number >= 0")
    each(("teacher_temp", "warmup_teacher_temp", "student_temp", "marginal_temp", "dist_timeout"),
         lambda v: math.isfinite(v) and v > 0, "must be a finite number > 0")
    need(0 <= args.momentum_teacher < 1, "momentum_teacher", "must lie in [0, 1): 1 would keep the teacher at its "
                                                             "initial weights")
    need(0 <= args.center_momentum < 1, "center_momentum", "must lie in [0, 1): 1 would keep both centres at 0, "
                                                           "no centring")
    need(0 <= args.drop_path_rate < 1, "drop_path_rate", "must lie in [0, 1): the probability that a block of the "
                                                         "student is skipped")
    most = clustering.max_sinkhorn_lambda(torch.float32)
    need(0 < args.sinkhorn_lambda <= most, "sinkhorn_lambda", f"must lie in (0, {most:.1f}]: exp(-lambda) "
                                                              "underflows float32 beyond")
    # the views and the clustering
    need(args.img_size >= args.patch_size and args.img_size % args.patch_size == 0, "img_size",
         f"must be a positive multiple of --patch_size {args.patch_size}")
    tokens = 2 * (args.img_size // args.patch_size) ** 2  # the joint tokens of both views
    need(2 <= args.k_start <= tokens, "k_start", f"must lie in [2, {tokens}] (the joint tokens of both views)")
    need(args.k_max is None or 2 <= args.k_max <= args.k_start, "k_max", f"must lie in [2, --k_start {args.k_start}]")
    lo, hi = args.global_crops_scale
    need(0 < lo <= hi <= 1, "global_crops_scale", "needs 0 < min <= max <= 1")
    check_inputs(args)


def check_inputs(args):
    """The paths and the size of the data, checked before any work (the images are listed later)."""
    for path in args.data_path or []:
        if not os.path.isdir(path):
            error = data.InputError if os.path.exists(path) else data.MissingInput
            raise error(f"--data_path {path}: {'not a folder' if os.path.exists(path) else 'no such folder'}")
    world = int(os.environ.get("WORLD_SIZE", 1))  # torchrun's
    if not args.data_path and args.synthetic_images < args.batch_size_per_gpu * world:
        raise data.InputError(f"--synthetic_images {args.synthetic_images}: must be at least --batch_size_per_gpu "
                              f"{args.batch_size_per_gpu} x {world} process(es), one batch")
    if args.eval_every > 0:
        try:
            shlex.split(args.eval_args)
        except ValueError as e:
            raise data.InputError(f"--eval_args {args.eval_args}: {e}") from e
        if args.eval_data_path and not os.path.exists(args.eval_data_path):
            raise data.MissingInput(f"--eval_data_path {args.eval_data_path}: no such file or folder")


# --------------------------------------------------------------------------------------------------------------
# Training (DINO's train_dino and train_one_epoch)
# --------------------------------------------------------------------------------------------------------------
def main(args):
    check_args(args)  # before any work: a bad flag costs no process group, no dataset scan
    rank, world, local_rank, device = init_distributed(args.dist_timeout, args.dist_backend)
    torch.manual_seed(args.seed)  # the same initial weights on every rank
    if args.k_max is None:
        args.k_max = args.k_start
    if device.type == "cpu" and args.precision != "fp32":
        args.precision = "fp32"  # autocast on CPU would be bf16 and slow; the paper's fp16 is a GPU setting
    ckpt_path = os.path.join(args.output_dir, "checkpoint.pth")
    ckpt = prepare_output_dir(args, ckpt_path)  # prints the config; None: a new run

    # ============ preparing data ... ============
    dataset, sampler, loader = pretraining_loader(rank, world, device, args)  # before any model work

    # ============ building student and teacher networks ... ============
    student, teacher = build_student_teacher(  # same init; the teacher: no stochastic depth, no gradient
        args.arch, args.patch_size, args.out_dim, args.out_dim_c, head_hidden_dim=args.head_hidden_dim,
        norm_last_layer=args.norm_last_layer, use_bn_in_head=args.use_bn_in_head, drop_path_rate=args.drop_path_rate)
    student, teacher = student.to(device), teacher.to(device)
    init_backbone(student.backbone, args, resuming=ckpt is not None, main=rank == 0)  # --init_weights
    ddp_student = student
    if world > 1:
        ddp_student = nn.parallel.DistributedDataParallel(
            student, device_ids=[local_rank] if device.type == "cuda" else None,
            find_unused_parameters=args.alpha == 0)  # plain DINO never uses the centroid last layer
    teacher.load_state_dict(student.state_dict())  # after DDP has broadcast rank 0's student
    torch.manual_seed(args.seed + rank)  # from here on, each rank draws its own crops, seeds and drop paths
    np.random.seed(args.seed + rank)

    # ============ preparing loss / optimizer / schedules ... ============
    loss_fn = CrOCLoss(args.out_dim, args.out_dim_c, args.warmup_teacher_temp, args.teacher_temp,
                       args.warmup_teacher_temp_epochs, args.epochs, student_temp=args.student_temp,
                       center_momentum=args.center_momentum).to(device)
    optimizer = torch.optim.AdamW(param_groups(student))
    scaler = torch.amp.GradScaler("cuda", enabled=args.precision == "fp16")
    dtype = {"fp16": torch.float16, "bf16": torch.bfloat16}.get(args.precision)
    autocast = torch.autocast(device.type, dtype=dtype) if dtype else nullcontext()
    iters = len(loader)
    total_batch = args.batch_size_per_gpu * world
    lr_sched = cosine_schedule(args.lr * total_batch / 256, args.min_lr, args.epochs, iters, args.warmup_epochs)
    wd_sched = cosine_schedule(args.weight_decay, args.weight_decay_end, args.epochs, iters)
    mom_sched = cosine_schedule(args.momentum_teacher, 1.0, args.epochs, iters)

    # ============ optionally resuming from a checkpoint ... ============
    parts = {"student": student, "teacher": teacher, "optimizer": optimizer, "scaler": scaler, "loss": loss_fn}
    # where an epoch's order is fixed: a checkpoint taken mid-epoch continues only under the same order
    order = {"images": len(dataset), "world_size": world, "batch_size_per_gpu": args.batch_size_per_gpu,
             "seed": args.seed}
    start_epoch, start_step, partial, history, ckpt_rng = resume_from(ckpt, ckpt_path, parts, order, iters, args)
    del ckpt
    cpu_group = dist.new_group(backend="gloo", timeout=datetime.timedelta(minutes=args.dist_timeout)) \
        if dist.is_initialized() else None  # stop flag and random states: CPU collectives, no device sync

    # ============ training ... ============
    if args.visualize_every > 0 and is_main_process() and start_epoch == 0 and not start_step:
        draw_initial_clusters(teacher, args, device)
    stop = StopFlag(cpu_group)  # from here on, SIGTERM, SIGINT and SIGHUP save the run and exit
    generator = torch.Generator(device=device).manual_seed(args.seed * 1000 + rank)  # the clustering's seeds
    restore_rng(ckpt_rng, generator, rank, world, ckpt_path)
    if start_epoch >= args.epochs and is_main_process():
        print(f"{ckpt_path} has already trained {start_epoch} epochs of --epochs {args.epochs}: nothing to do")
    for epoch in range(start_epoch, args.epochs):
        first = start_step if epoch == start_epoch else 0  # steps of this epoch done before a resume
        sampler.set_epoch(epoch, skip=first * args.batch_size_per_gpu)
        # ============ training one epoch of CrOC ... ============
        t0 = time.time()
        sums, skipped, steps, stopped = train_one_epoch(
            ddp_student, teacher, loss_fn, optimizer, scaler, loader, (lr_sched, wd_sched, mom_sched), epoch,
            generator, autocast, stop, args, first, partial if first else None)
        if stopped:  # by a signal, mid-epoch: save the steps done and the epoch's sums so far, then exit
            save_checkpoint(ckpt_path, parts, epoch, args, history, generator, cpu_group,
                            partial_epoch(sums, skipped, steps, order))
            return finish_run(stop, f"saved {ckpt_path} at epoch {epoch}, step {steps} of {iters}")
        elapsed = time.time() - t0
        # ============ writing logs and the checkpoint ... ============
        means = (all_reduce(torch.stack([v / steps for v in sums.values()])) / world).tolist()
        last = (epoch + 1) * iters - 1  # the epoch's last step
        log = {"epoch": epoch, **dict(zip(sums.keys(), means)), "lr": float(lr_sched[last]),
               "wd": float(wd_sched[last]), "momentum": float(mom_sched[last]),
               "images_per_s": (steps - first) * total_batch / elapsed,
               "skipped_files": round(all_reduce(skipped).item()), "teacher_sync_error": teacher_sync_error(teacher)}
        if args.eval_every > 0 and (epoch + 1) % args.eval_every == 0:
            eval_during_training(teacher, args, epoch + 1, stop, log)
        history.append(log)
        # in this order, so that a kill between two writes loses nothing: the checkpoint holds the log records,
        # and a resumed run restores checkpointNNNN.pth and the log lines it finds missing
        state = save_checkpoint(ckpt_path, parts, epoch + 1, args, history, generator, cpu_group)
        if is_main_process():
            if args.saveckp_freq and (epoch + 1) % args.saveckp_freq == 0:
                save_atomic(state, os.path.join(args.output_dir, f"checkpoint{epoch + 1:04}.pth"))
            del state
            if args.visualize_every > 0 and (epoch + 1) % args.visualize_every == 0:
                draw_clusters(args, device, epoch + 1, ckpt_path, stop)
            append_line(os.path.join(args.output_dir, "log.txt"), json.dumps(log))
            print(json.dumps(log))
        if epoch + 1 < args.epochs and stop.should_stop():
            return finish_run(stop, f"saved {ckpt_path} at the end of epoch {epoch}")
    finish_run(stop)


def train_one_epoch(student, teacher, loss_fn, optimizer, scaler, loader, schedules, epoch, generator, autocast,
                    stop, args, first=0, partial=None):
    """One epoch of CrOC steps: the schedules' values, then model.train_step and model.optimizer_step.

    student: DDP-wrapped in a distributed run; schedules: the per-step lr, weight decay and teacher momentum;
    first and partial: the steps of this epoch done before a resume, and the checkpoint's record of them.
    -> (sums, skipped, steps, stopped): this rank's logged statistics summed over the epoch's steps (device
    tensors), the unreadable files replaced, the steps done (first included), and whether a stop signal ended
    the epoch before its last step."""
    lr_schedule, wd_schedule, momentum_schedule = schedules
    plain_student = student.module if isinstance(student, nn.parallel.DistributedDataParallel) else student
    device, world = next(teacher.parameters()).device, world_size()
    iters = first + len(loader)  # the epoch's steps: on a resume, the sampler skips the samples of the first ones
    plain_student.train()
    sums, steps = {}, first
    nonfinite = torch.zeros((), dtype=torch.bool, device=device)
    skipped = torch.zeros((), device=device)
    if first:  # the epoch's sums so far, all ranks together: spread so that the epoch's mean comes out whole
        sums = {k: torch.tensor(v / world, device=device) for k, v in partial["sums"].items()}
        skipped += partial["skipped"] / world
    bar = tqdm(data.start_workers(loader), desc=f"epoch {epoch}/{args.epochs}", disable=not is_main_process(),
               leave=False, total=iters, initial=first)
    for it, (views, positions, n_skipped) in enumerate(bar, start=first):
        step = epoch * iters + it  # the global step: the schedules' index
        for i, group in enumerate(optimizer.param_groups):
            group["lr"] = float(lr_schedule[step])
            if i == 0:  # the weights; biases and norms have no weight decay (model.param_groups)
                group["weight_decay"] = float(wd_schedule[step])
        views = views.to(device, non_blocking=True)
        positions = positions.to(device, non_blocking=True)
        loss, stats = train_step(student, teacher, loss_fn, views, positions, epoch, generator, autocast,
                                 alpha=args.alpha, which_features=args.which_features, cluster_settings=args)
        optimizer_step(plain_student, teacher, optimizer, scaler, loss, epoch, float(momentum_schedule[step]),
                       clip_grad=args.clip_grad, freeze_last_layer=args.freeze_last_layer)
        nonfinite |= ~torch.isfinite(loss.detach())
        skipped += n_skipped.sum().to(device)
        for k, v in stats.items():
            sums[k] = sums.get(k, 0) + v
        steps += 1
        if (it + 1) % args.log_freq == 0 or it + 1 == iters:  # the loop's host syncs besides train_step's: logging
            raise_if_nonfinite(nonfinite, epoch, it, args)
            shown = ("loss", "teacher_entropy")  # the losses and the collapse diagnostic, epoch means so far
            bar.set_postfix({k: f"{(v / steps).item():.3f}" for k, v in sums.items() if k.startswith(shown)})
        # the stop flag is agreed on every step, so that all ranks leave after the same step: a CPU all-reduce
        # of one number (gloo), which waits for the other ranks' CPUs, never for a device
        if stop.should_stop() and it + 1 < iters:
            raise_if_nonfinite(nonfinite, epoch, it, args)  # never save a non-finite state
            return sums, skipped, steps, True
    return sums, skipped, steps, False


def pretraining_loader(rank, world, device, args):
    """-> (dataset, sampler, loader): the images (--data_path, else the synthetic scenes), and the sampler and
    loader of this rank's share of them, each giving two views and their positions."""
    try:
        dataset = data.pretraining_dataset(args)
    except ValueError as e:  # no readable image under --data_path (data.list_images names the folder)
        raise data.InputError(f"--data_path: {e}") from e
    # the epoch order is a function of (seed, epoch) and each sample's augmentation of (seed, epoch, index): a run
    # resumed mid-epoch skips the batches it has seen, unloaded, and draws the same views as an uninterrupted run
    sampler = data.EpochSampler(dataset, num_replicas=world, rank=rank, seed=args.seed)
    loader = torch.utils.data.DataLoader(data.SeededSamples(dataset, args.seed), sampler=sampler,
                                         batch_size=args.batch_size_per_gpu, num_workers=args.num_workers,
                                         pin_memory=device.type == "cuda", drop_last=True,
                                         persistent_workers=args.num_workers > 0, worker_init_fn=ignore_stop_signals,
                                         generator=torch.Generator().manual_seed(args.seed))  # global RNG untouched
    if len(loader) == 0:
        raise data.InputError(f"{len(dataset)} images cannot fill one batch of --batch_size_per_gpu "
                              f"{args.batch_size_per_gpu} on {world} process(es)")
    return dataset, sampler, loader


def cosine_schedule(base, final, epochs, iters_per_epoch, warmup_epochs=0, warmup_start=0.0):
    """DINO's per-iteration schedule: linear warm-up then cosine from base to final."""
    warmup = np.linspace(warmup_start, base, warmup_epochs * iters_per_epoch)
    steps = np.arange(epochs * iters_per_epoch - len(warmup))
    cosine = final + 0.5 * (base - final) * (1 + np.cos(np.pi * steps / max(len(steps), 1)))
    return np.concatenate([warmup, cosine])


# --------------------------------------------------------------------------------------------------------------
# Starting and resuming a run: the output folder's lock, config.json, flag changes, log repair, random states
# --------------------------------------------------------------------------------------------------------------
def prepare_output_dir(args, ckpt_path):
    """Claim output_dir for this run (claim_output_dir: locked, writable) before anything in it is written or
    removed, then remove what a killed write left there; read the checkpoint to resume from and refuse a flag
    change it cannot take (resume_changes: config.json stays intact); print the config, warn of the other changed
    flags, write config.json. -> the checkpoint, or None for a new run."""
    claim_output_dir(args.output_dir)
    os.makedirs(args.output_dir, exist_ok=True)
    if is_main_process():
        remove_temporary_files(args.output_dir)
    try:
        ckpt = torch_load(ckpt_path) if os.path.isfile(ckpt_path) else None
    except data.InputError as e:  # empty, truncated, foreign or refused: model.torch_load's message names the file
        raise data.InputError(f"{e}. Move it away to start afresh") from e
    changes = resume_changes(ckpt.get("args", {}), args) if ckpt is not None else []  # refused: config.json intact
    if is_main_process():
        print("\n".join(f"{k}: {v}" for k, v in sorted(vars(args).items())))
        for change in changes:
            print(f"warning: resuming {ckpt_path} with {change}", file=sys.stderr)
        save_atomic(json.dumps(vars(args), indent=2).encode(), os.path.join(args.output_dir, "config.json"))
    return ckpt


def init_backbone(backbone, args, resuming, main):
    """--init_weights: a new run's student backbone from a checkpoint, read by rank 0 only (DDP broadcasts rank 0's
    student, and the teacher copies it); the heads keep their fresh init. A resumed run continues its own weights."""
    if not args.init_weights:
        return
    if resuming:
        if main:
            print(f"--init_weights {args.init_weights}: not loaded, the run resumes from its checkpoint.pth")
        return
    if main:
        sd, _, _ = read_backbone(args.init_weights, args.init_checkpoint_key, args.arch, args.patch_size)
        load_backbone_weights(backbone, sd, f"--init_weights {args.init_weights} [{args.init_checkpoint_key}]")


# One run per output folder: rank 0 holds an exclusive lock on output_dir/.lock for its whole life. flock works
# on local disks and NFS; a file system without locks (Lustre mounted without -o flock) gets a warning.
LOCK_NAME = ".lock"
OUTPUT_LOCKS = {}  # output folder (real path) -> the descriptor of its lock file, held until this process ends


def claim_output_dir(output_dir):
    """Called on every rank before anything in output_dir is written or removed. Rank 0 creates the folder, locks
    it (lock_output_dir) and checks that the run can write its files there (check_writable). Its refusal reaches
    the other ranks through a broadcast, the run's first collective, so that every rank exits at once with the
    same message, none left waiting in a later collective for a rank 0 that has gone."""
    refusal = None
    if is_main_process():
        try:
            lock_output_dir(output_dir)
            check_writable(output_dir)
        except data.InputError as e:
            refusal = e
    if dist.is_initialized():
        message = [None if refusal is None else str(refusal)]
        dist.broadcast_object_list(message, src=0)
        if message[0] is not None and refusal is None:
            refusal = data.InputError(message[0])
    if refusal is not None:
        raise refusal


def lock_output_dir(output_dir):
    """An exclusive flock on output_dir/.lock, held until this process ends (the kernel releases it however the
    process dies), with this process's pid and host written in it. A second run in the folder stops here with
    data.InputError naming the folder and the holder, having written nothing: the lock file is opened without
    truncating it, and written only once locked. Taken once per process (train.main may run again in one)."""
    path = os.path.join(output_dir, LOCK_NAME)
    if os.path.realpath(output_dir) in OUTPUT_LOCKS:
        return
    try:
        os.makedirs(output_dir, exist_ok=True)
        fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
    except OSError as e:
        raise data.InputError(f"--output_dir {output_dir}: cannot create {path} ({e.strerror})") from e
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError as e:
        holder = os.read(fd, 256).decode(errors="replace").strip() or "its pid not yet written"
        os.close(fd)
        if e.errno not in (errno.EWOULDBLOCK, errno.EACCES):
            print(f"warning: --output_dir {output_dir}: cannot lock {path} ({e.strerror}); a second run started in "
                  "this folder would not be stopped", file=sys.stderr)
            return
        raise data.InputError(f"--output_dir {output_dir} is in use by another run ({holder}, which holds {path}); "
                              "wait for it to end, or use another --output_dir") from None
    os.ftruncate(fd, 0)
    os.write(fd, f"pid {os.getpid()} on {socket.gethostname()}\n".encode())
    OUTPUT_LOCKS[os.path.realpath(output_dir)] = fd


def check_writable(output_dir):
    """Before the first step: that the run can write its files, else it would train an epoch and fail at its first
    save. A file is created and removed in output_dir (named as save_atomic's temporary files, which the next
    start removes); checkpoint.pth, config.json and log.txt, where they exist, are regular files (the first two
    are replaced by a rename, which a folder refuses), and log.txt, appended to, is writable."""
    for name in ("checkpoint.pth", "config.json", "log.txt"):
        path = os.path.join(output_dir, name)
        if os.path.lexists(path) and not os.path.isfile(path):
            raise data.InputError(f"{path} is not a regular file (a folder, a broken link?): the run writes its "
                                  f"{name} there; move it away, or use another --output_dir")
    log = os.path.join(output_dir, "log.txt")
    if os.path.isfile(log) and not os.access(log, os.W_OK):
        raise data.InputError(f"{log} is not writable: the run appends a line to it every epoch")
    probe = os.path.join(output_dir, f"checkpoint.pth.tmp{os.getpid()}")
    try:
        with open(probe, "wb"):
            pass
        os.remove(probe)
    except OSError as e:
        raise data.InputError(f"--output_dir {output_dir}: cannot write a file there ({e.strerror})") from e


# Resuming with other flags. These fix the shapes of the saved weights or the optimizer's parameter groups: the
# checkpoint cannot be loaded under other values.
STATE_FLAGS = ("arch", "patch_size", "out_dim", "out_dim_c", "head_hidden_dim", "norm_last_layer", "use_bn_in_head")
# These steer where and how the run goes, not what it learns: changed without a word.
RUN_FLAGS = ("output_dir", "num_workers", "log_freq", "saveckp_freq", "visualize_every", "dist_timeout",
             "dist_backend", "eval_every", "eval_dataset", "eval_data_path", "eval_args")


def resume_changes(saved, args):
    """Compare the flags of a checkpoint with this run's. data.InputError naming every flag that would break the
    saved state (old -> new); else the list of other changed flags as 'flag old -> new' strings, for warnings. A
    flag one of the two runs does not know (another version of this file) is not compared."""
    changed = [(k, saved[k], v) for k, v in sorted(vars(args).items())
               if k in saved and k not in RUN_FLAGS and _as_saved(v) != _as_saved(saved[k])]
    refused = [f"--{k} {old} -> {new}" for k, old, new in changed if k in STATE_FLAGS]
    if refused:
        raise data.InputError("cannot resume: " + "; ".join(refused) + ". These flags fix the shapes of the saved "
                              "weights or the optimizer's parameter groups. Use the checkpoint's values, or a new "
                              "--output_dir for a new run.")
    return [f"--{k} {old} -> {new}" for k, old, new in changed]


def _as_saved(v):
    return list(v) if isinstance(v, tuple) else v  # a checkpoint stores tuples as lists


def remove_temporary_files(output_dir):
    """Delete what save_atomic leaves behind when killed mid-write (checkpoint.pth.tmp<pid>, possibly GBs)."""
    for name in os.listdir(output_dir):
        if any(name.startswith(f"{base}.tmp") for base in ("checkpoint.pth", "log.txt", "config.json")) or (
                name.startswith("checkpoint") and ".pth.tmp" in name):
            os.remove(os.path.join(output_dir, name))


def resume_from(ckpt, ckpt_path, parts, order, iters, args):
    """Load a checkpoint's states into parts (student, teacher, optimizer, scaler, loss); ckpt None: a new run.
    -> (start_epoch, start_step, partial, history, rng): partial is the record of a stop mid-epoch (partial_epoch),
    or None when the epoch starts from its first batch (also when its order changed, with a warning); rng: every
    rank's random states. Rank 0 also restores what a kill between the checkpoint and the next writes left out:
    log.txt's lines and checkpointNNNN.pth."""
    if ckpt is None:
        return 0, 0, None, [], None
    for name in ("student", "teacher", "optimizer", "loss"):
        parts[name].load_state_dict(ckpt[name])
    if ckpt["scaler"] and parts["scaler"].is_enabled():  # empty when saved without fp16 (--precision changed: warned)
        parts["scaler"].load_state_dict(ckpt["scaler"])
    start_epoch, history, rng = ckpt["epoch"], ckpt.get("log", []), ckpt.get("rng")
    partial = ckpt.get("partial_epoch")
    if partial is not None and partial["order"] != order:
        if is_main_process():
            print(f"warning: {ckpt_path} stopped at step {partial['steps']} of epoch {start_epoch} under "
                  f"{partial['order']}, now {order}: that epoch order cannot continue, the epoch restarts "
                  f"from its first batch", file=sys.stderr)
        partial = None
    start_step = partial["steps"] if partial is not None else 0
    if is_main_process():
        print(f"resumed from {ckpt_path} at epoch {start_epoch}"
              + (f", step {start_step} of {iters}" if start_step else ""))
        # writes the last start may have been killed between (checkpoint, checkpointNNNN.pth, log line)
        for epoch in repair_log(os.path.join(args.output_dir, "log.txt"), history, start_epoch):
            print(f"log.txt: restored the line of epoch {epoch} from {ckpt_path}")
        kept = os.path.join(args.output_dir, f"checkpoint{start_epoch:04}.pth")
        if (not start_step and start_epoch and args.saveckp_freq and start_epoch % args.saveckp_freq == 0
                and not os.path.exists(kept)):
            with open(ckpt_path, "rb") as f:
                save_atomic(f.read(), kept)
            print(f"restored {kept} from {ckpt_path}")
    return start_epoch, start_step, partial, history, rng


def repair_log(path, records, start_epoch):
    """Make log.txt hold one line per finished epoch: the lines it has for epochs before start_epoch, plus those of
    the checkpoint's records that it lacks (a kill between the checkpoint and the log line), without duplicates;
    a line torn by a kill mid-write and lines of epochs that will run again are dropped."""
    kept, torn = {}, False
    if os.path.exists(path):
        with open(path) as f:
            for line in f:
                try:
                    record = json.loads(line)
                except json.JSONDecodeError:
                    torn = True
                    continue
                if record.get("epoch", start_epoch) < start_epoch:
                    kept.setdefault(record["epoch"], line.rstrip("\n"))
                else:
                    torn = True
    missing = {r["epoch"]: json.dumps(r) for r in records if r["epoch"] < start_epoch and r["epoch"] not in kept}
    if missing or torn:
        lines = [line for _, line in sorted({**kept, **missing}.items())]
        save_atomic("".join(line + "\n" for line in lines).encode(), path)
    return sorted(missing)


def restore_rng(saved, generator, rank, world, ckpt_path):
    """Continue this rank's random streams (drop path, the clustering's seeds) where the checkpoint left them;
    saved: every rank's rng_state, None for a new run. Written by another number of processes: warn, start
    afresh."""
    if saved is not None and len(saved) == world:
        set_rng_state(saved[rank], generator)
    elif saved is not None and is_main_process():
        print(f"warning: {ckpt_path} was written by {len(saved)} process(es), this run has {world}: the random "
              f"streams start afresh", file=sys.stderr)


def rng_state(generator):
    """This rank's random streams (drop path, the clustering's seeds) for an exact resume."""
    state = {"torch": torch.get_rng_state(), "generator": generator.get_state()}
    if generator.device.type == "cuda":
        state["cuda"] = torch.cuda.get_rng_state(generator.device)
    return state


def set_rng_state(state, generator):
    torch.set_rng_state(state["torch"])
    generator.set_state(state["generator"])
    if "cuda" in state and generator.device.type == "cuda":
        torch.cuda.set_rng_state(state["cuda"], generator.device)


# --------------------------------------------------------------------------------------------------------------
# Checkpoints and durable writes (a kill at any point leaves a whole file), per-epoch checks
# --------------------------------------------------------------------------------------------------------------
def save_checkpoint(path, parts, epoch, args, history, generator, cpu_group, partial_epoch=None):
    """Called on every rank (the random states are gathered); rank 0 writes the states of parts (student, teacher,
    optimizer, scaler, loss), epoch, the flags, every rank's random states and the log records. partial_epoch: the
    steps done in epoch and the epoch's sums so far, for a stop mid-epoch; None when epoch is the next one to
    start. -> the state written on rank 0, None on the others."""
    rng = [rng_state(generator)]
    if cpu_group is not None:
        rng = [None] * world_size()
        dist.all_gather_object(rng, rng_state(generator), group=cpu_group)
    if is_main_process():
        state = {name: part.state_dict() for name, part in parts.items()}
        state.update({"epoch": epoch, "args": vars(args), "rng": rng, "log": history, "partial_epoch": partial_epoch})
        save_atomic(state, path)
        return state


def append_line(path, line):
    """Append one line and flush it to the disk (log.txt: one JSON line per epoch)."""
    with open(path, "a") as f:
        f.write(line + "\n")
        f.flush()
        os.fsync(f.fileno())


def partial_epoch(sums, skipped, steps, order):
    """The record of an epoch a stop signal ended: the steps done, the epoch's order, and its sums so far over all
    ranks (train_one_epoch spreads them back over the ranks on resume)."""
    names = list(sums)
    totals = all_reduce(torch.stack([sums[k] for k in names] + [skipped.float()])).tolist()
    return {"steps": steps, "order": order, "sums": dict(zip(names, totals)), "skipped": totals[-1]}


def raise_if_nonfinite(nonfinite, epoch, it, args):
    """FloatingPointError on every rank once any rank has had a non-finite loss (nonfinite: this rank's flag),
    saying what the output folder holds: the last good state, or no checkpoint yet."""
    if bool(all_reduce(nonfinite.float()) > 0):
        ckpt = os.path.join(args.output_dir, "checkpoint.pth")
        kept = (f"{ckpt} holds the last good state" if os.path.isfile(ckpt) else
                f"no checkpoint has been saved yet ({ckpt} does not exist): a re-run starts from scratch")
        raise FloatingPointError(
            f"non-finite loss at epoch {epoch}, step {it}: stopping; {kept}. Try --precision bf16, a lower --lr, "
            "--clip_grad 3.0 or a lower --teacher_temp.")


@torch.no_grad()
def teacher_sync_error(teacher):
    """Largest spread across ranks of the teacher's parameter sum and sum of squares: 0 when all ranks hold the
    same teacher (a cheap per-epoch check that the EMA and DDP keep the replicas identical)."""
    params = list(teacher.parameters())
    stats = torch.stack([sum(p.double().sum() for p in params), sum(p.double().square().sum() for p in params)])
    if not dist.is_initialized():
        return 0.0
    hi, lo = stats.clone(), stats.clone()
    dist.all_reduce(hi, op=dist.ReduceOp.MAX)
    dist.all_reduce(lo, op=dist.ReduceOp.MIN)
    return (hi - lo).max().item()


# --------------------------------------------------------------------------------------------------------------
# Stop signals: SIGTERM, SIGINT and SIGHUP save the run, then it exits (data.StopFlag)
# --------------------------------------------------------------------------------------------------------------
def ignore_stop_signals(worker_id):
    """A DataLoader worker's start (data.ignore_stop_signals): it ignores the stop signals, and closes its forked
    copy of the output folder's lock, so that the lock goes with the main process at once (a flock lasts while any
    copy of its descriptor is open)."""
    data.ignore_stop_signals(worker_id)
    for fd in OUTPUT_LOCKS.values():
        os.close(fd)


def stop_workers():
    """After an error in main: kill this process's DataLoader workers. They ignore SIGTERM (ignore_stop_signals),
    and Python's exit stops its child processes with SIGTERM and then waits for them, so an error raised while
    they run (a full disk, a non-finite loss, a failed --eval_every) would otherwise hang the run forever. They
    hold nothing to save. PyTorch's SIGCHLD check goes first, or their end would be reported instead of the error."""
    signal.signal(signal.SIGCHLD, signal.SIG_DFL)
    for worker in multiprocessing.active_children():
        worker.kill()
        worker.join()


def finish_run(stop, stopped=None):
    """Restore the signal handlers and leave the process group; stopped: what a signal made us save."""
    stop.restore()
    if stopped and is_main_process():
        print(f"signal received: {stopped}; exiting. Re-run the same command to continue.")
        if "TORCHELASTIC_RUN_ID" in os.environ:  # set by torchrun for its ranks
            print("The save is complete. If the signal reached torchrun too, torchrun exits 1 with its "
                  "SignalException traceback all the same (train.py's StopFlag says why).")
    if dist.is_initialized():
        dist.barrier()
        dist.destroy_process_group()


# --------------------------------------------------------------------------------------------------------------
# Scripts run during training, each as a process of its own: visualize.py, eval_kmeans.py
# --------------------------------------------------------------------------------------------------------------
def run_script(name, arguments, flag, stop=None):
    """Run this repository's script `name` as a process of its own (the scripts do not import each other), out
    of torchrun's variables; a failure raises with the end of its output. -> True when it ran to its end.

    With stop (training's StopFlag): a stop signal that ended the script is the run's stop, not a failure. The
    script runs in this process's process group, and a scheduler signals every process of the job (SLURM's
    scancel, a killpg, a `pkill -f` on the output folder): the script is ended, this returns False, and the stop
    flag is set, so the epoch is saved and the run exits as for any stop."""
    launcher = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE", "GROUP_RANK", "ROLE_RANK", "MASTER_ADDR",
                "MASTER_PORT")  # torchrun's variables: the script is one process of its own
    env = {k: v for k, v in os.environ.items() if k not in launcher and not k.startswith("TORCHELASTIC")}
    script = os.path.join(os.path.dirname(os.path.abspath(__file__)), name)
    proc = subprocess.run([sys.executable, script, *arguments], capture_output=True, text=True, env=env)
    if stop is not None and -proc.returncode in StopFlag.SIGNALS:
        stop.requested = True  # its own handler has run too when the signal reached this process
        return False
    if proc.returncode != 0:
        raise RuntimeError(f"{flag}: {name} failed (exit {proc.returncode}); the run's checkpoint is intact. Its "
                           f"last output:\n{(proc.stdout + proc.stderr)[-2000:]}")
    return True


def draw_clusters(args, device, epochs_done, weights, stop=None):
    """Rank 0: visualize.py, in a process of its own, draws the teacher in weights on a fixed batch (the first 4
    training images, cropped with --seed) to clusters_epochNNNN.png. Training's random streams are untouched."""
    path = os.path.join(args.output_dir, f"clusters_epoch{epochs_done:04}.png")
    run_script("visualize.py", ["--weights", weights, "--training_images", "4", "--seed", str(args.seed),
                                "--device", str(device), "--output", path], "--visualize_every", stop)


def draw_initial_clusters(teacher, args, device):
    """--visualize_every, before the first epoch: the initial teacher, saved to a temporary file for visualize.py."""
    initial = os.path.join(args.output_dir, f"checkpoint0000.pth.tmp{os.getpid()}")  # a crash: the next start
    torch.save({"teacher": teacher.state_dict(), "args": vars(args), "epoch": 0}, initial)  # removes it
    try:
        draw_clusters(args, device, 0, initial)
    finally:
        os.remove(initial)


def dense_eval(teacher, args, epochs_done, stop):
    """Quick k-means mIoU (%) of the teacher's dense features on a held-out set: eval_kmeans.py run as its own
    process (the evaluation's exact code and protocol, none of its state in training) on the teacher's weights.
    None when a stop signal ended it (run_script)."""
    folder = os.path.join(args.output_dir, "eval", f"epoch{epochs_done:04}")
    os.makedirs(folder, exist_ok=True)
    weights = os.path.join(folder, "teacher.pth")
    save_atomic({"teacher": teacher.state_dict()}, weights)
    command = ["--weights", weights, "--checkpoint_key", "teacher", "--arch", args.arch,
               "--patch_size", str(args.patch_size), "--dataset", args.eval_dataset, "--output_dir", folder,
               "--num_workers", "0", "--device", str(next(teacher.parameters()).device)]
    command += (["--data_path", args.eval_data_path] if args.eval_data_path else []) + shlex.split(args.eval_args)
    try:
        if not run_script("eval_kmeans.py", command, "--eval_every", stop):
            return None
    finally:
        os.remove(weights)
    with open(os.path.join(folder, "results.json")) as f:
        return 100 * float(json.load(f)["miou_mean"])


def eval_during_training(teacher, args, epochs_done, stop, log):
    """--eval_every: rank 0 runs dense_eval and adds eval_kmeans_miou to log; the other ranks wait for it."""
    if is_main_process():
        miou = dense_eval(teacher, args, epochs_done, stop)
        if miou is None:  # the run's stop signal ended the evaluation: the epoch is saved without it
            print(f"--eval_every: the evaluation after epoch {epochs_done - 1} was ended by a stop signal; the epoch "
                  "is logged without eval_kmeans_miou", file=sys.stderr)
        else:
            log["eval_kmeans_miou"] = miou
    if dist.is_initialized():
        dist.barrier(group=stop.group)  # the other ranks wait on the CPU group, not on a device


if __name__ == "__main__":
    parser = argparse.ArgumentParser("CrOC pretraining", parents=[get_args_parser()])
    data.cli(main, parser, check=check_args, cleanup=stop_workers)  # a user's mistake: one line, exit 2
