"""CrOC pretraining (Fig. 2, Eq. 1-7): DINO's self-distillation plus a dense loss on the centroids that an online
clustering finds in the joint tokens of two views.

    python train.py --output_dir out                       # one process (CPU or one GPU), synthetic scenes
    torchrun --nproc_per_node=2 train.py --data_path /coco/train2017 --output_dir out   # DDP

Re-running the same command resumes from output_dir/checkpoint.pth.
"""
import argparse
import copy
import datetime
import json
import math
import os
import signal
import sys
import time
from contextlib import nullcontext

import numpy as np
import torch
import torch.distributed as dist
import torch.nn as nn
import torch.nn.functional as F
from einops import rearrange, repeat
from torch.profiler import record_function
from tqdm import tqdm

import clustering
import data
from model import CrOCHead, CrOCModel, build_vit, torch_load, view_centroids


# --------------------------------------------------------------------------------------------------------------
# Distributed setup (torchrun sets RANK, WORLD_SIZE, LOCAL_RANK; a plain `python train.py` is one process)
# --------------------------------------------------------------------------------------------------------------
def init_distributed():
    """-> (rank, world_size, local_rank, device). gloo on CPU, nccl on GPU."""
    if "RANK" not in os.environ or int(os.environ.get("WORLD_SIZE", 1)) == 1:
        return 0, 1, 0, torch.device("cuda" if torch.cuda.is_available() else "cpu")
    rank, world, local = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"]), int(os.environ["LOCAL_RANK"])
    if torch.cuda.is_available():
        torch.cuda.set_device(local)
        device = torch.device("cuda", local)
    else:
        device = torch.device("cpu")
    if not dist.is_initialized():
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo", timeout=datetime.timedelta(minutes=30))
    return rank, world, local, device


def is_main_process():
    return not dist.is_initialized() or dist.get_rank() == 0


def all_reduce(t):
    if dist.is_initialized():
        dist.all_reduce(t)
    return t


# --------------------------------------------------------------------------------------------------------------
# Arguments
# --------------------------------------------------------------------------------------------------------------
def bool_flag(s):
    if s.lower() in ("true", "1", "yes", "on"):
        return True
    if s.lower() in ("false", "0", "no", "off"):
        return False
    raise argparse.ArgumentTypeError(f"expected a boolean, got {s!r}")


def get_args_parser():
    p = argparse.ArgumentParser("CrOC pretraining", add_help=False,
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    g = p.add_argument_group("model")
    g.add_argument("--arch", default="vit_small", choices=["vit_nano", "vit_tiny", "vit_small", "vit_base"],
                   help="Backbone. The paper: ViT-S/16.")
    g.add_argument("--patch_size", default=16, type=int, help="8 or 16. The paper: 16.")
    g.add_argument("--out_dim", default=65536, type=int, help="Image head output L-bar (Sec. 4.1: 65,536).")
    g.add_argument("--out_dim_c", default=8192, type=int, help="Centroid head output L (Sec. 4.1: 8,192).")
    g.add_argument("--norm_last_layer", default=False, type=bool_flag,
                   help="Fix the norm of the heads' weight-normalised last layers (weight_g frozen at 1). App. B: false "
                        "for the DINO run, and CrOC uses the same (its footnote 4); DINO advises false for ViT-S, true "
                        "for ViT-B stability. The official CrOC parser defaults to true.")
    g.add_argument("--momentum_teacher", default=0.996, type=float,
                   help="Teacher EMA momentum, cosine to 1 (DINO). 0.996 for batch 256; with small batches use "
                        "0.9995 or more.")
    g.add_argument("--drop_path_rate", default=0.1, type=float, help="Stochastic depth of the student.")

    g = p.add_argument_group("CrOC clustering (Sec. 3.3)")
    g.add_argument("--alpha", default=1.0, type=float,
                   help="Weight of the dense loss (Eq. 7; paper 1.0). 0 = plain DINO, clustering skipped.")
    g.add_argument("--which_features", default="v", choices=["last", "q", "k", "v"],
                   help="Tokens clustered (Eq. 21, Table 6): last-block values (paper's COCO runs), keys "
                        "(ablations, ImageNet), queries, or the final tokens (`last`).")
    g.add_argument("--k_start", default=12, type=int, help="Initial number of centroids K_start (paper: 12).")
    g.add_argument("--k_max", default=None, type=int,
                   help="Largest K the selection may pick (default: k_start; the official code: 4 with k_start 5).")
    g.add_argument("--lambda_pos", default=4.0, type=float,
                   help="Weight of the positional cost (Eq. 18; paper 4 on COCO, 3 on ImageNet and in ablations).")
    g.add_argument("--sinkhorn_lambda", default=20.0, type=float, help="Entropy regularisation lambda (Eq. 11).")
    g.add_argument("--sinkhorn_iterations", default=5, type=int, help="Sinkhorn rounds (official: 5).")
    g.add_argument("--marginal_temp", default=2.0, type=float,
                   help="Temperature of the r and c marginals (official code: 2.0; Eq. 10 has none).")
    g.add_argument("--uniform_marginals", action="store_true",
                   help="Uniform r and c instead of the tokens' similarity to the CLS token.")

    g = p.add_argument_group("temperatures and centring (Eq. 3, 5; App. B)")
    g.add_argument("--warmup_teacher_temp", default=0.04, type=float, help="Initial teacher temperature.")
    g.add_argument("--teacher_temp", default=0.07, type=float,
                   help="Teacher temperature after warm-up (paper 0.07). If training collapses (loss stuck at "
                        "log(out_dim)), lower it to 0.04, as DINO advises.")
    g.add_argument("--warmup_teacher_temp_epochs", default=30, type=int, help="Epochs of teacher-temp warm-up.")
    g.add_argument("--student_temp", default=0.1, type=float, help="Student temperature (paper 0.1).")
    g.add_argument("--center_momentum", default=0.9, type=float, help="Momentum of both running centres.")

    g = p.add_argument_group("optimisation (DINO's defaults, App. B)")
    g.add_argument("--precision", default="fp16", choices=["fp16", "bf16", "fp32"],
                   help="Mixed precision on GPU (paper: fp16; bf16 avoids fp16 overflow NaNs). CPU always fp32.")
    g.add_argument("--batch_size_per_gpu", default=128, type=int,
                   help="Images per process. Paper: 256 in total over 2 GPUs.")
    g.add_argument("--epochs", default=300, type=int, help="Paper: 300 on COCO.")
    g.add_argument("--lr", default=5e-4, type=float, help="Peak lr for a total batch of 256, scaled linearly.")
    g.add_argument("--min_lr", default=1e-5, type=float, help="Final lr of the cosine schedule.")
    g.add_argument("--warmup_epochs", default=10, type=int, help="Linear lr warm-up epochs.")
    g.add_argument("--weight_decay", default=0.04, type=float, help="Initial weight decay (cosine schedule).")
    g.add_argument("--weight_decay_end", default=0.4, type=float, help="Final weight decay.")
    g.add_argument("--clip_grad", default=0.0, type=float,
                   help="Max gradient norm per parameter; 0 disables (paper: none; official default 3.0).")
    g.add_argument("--freeze_last_layer", default=1, type=int, help="Epochs during which the heads' last layers "
                                                                    "stay fixed (DINO: 1).")

    g = p.add_argument_group("data")
    g.add_argument("--data_path", nargs="+", default=None,
                   help="Image folder(s), searched recursively (COCO+: train2017 unlabeled2017). "
                        "Default: the built-in synthetic scenes.")
    g.add_argument("--img_size", default=224, type=int, help="Size of both views.")
    g.add_argument("--global_crops_scale", nargs=2, default=(0.25, 1.0), type=float, help="Crop scale range.")
    g.add_argument("--synthetic_images", default=2000, type=int, help="Size of the synthetic dataset.")
    g.add_argument("--synthetic_size", default=128, type=int, help="Side of the synthetic scene images.")
    g.add_argument("--num_workers", default=8, type=int, help="Data loading workers per process.")

    g = p.add_argument_group("run")
    g.add_argument("--output_dir", default="output", help="Checkpoints, log.txt and config.json go here.")
    g.add_argument("--saveckp_freq", default=20, type=int, help="Keep checkpoint{epoch:04}.pth every N epochs.")
    g.add_argument("--seed", default=0, type=int, help="Seed; each rank uses seed + rank.")
    g.add_argument("--log_freq", default=10, type=int, help="Steps between progress updates (and host syncs).")
    g.add_argument("--visualize_every", default=0, type=int,
                   help="Every N epochs (and before the first), draw the teacher's clusters and CLS attention on a "
                        "fixed batch of 4 images to output_dir/clusters_epoch{epochs done:04}.png (visualize.py); "
                        "0 disables. Costs one teacher pass; training is unchanged.")
    return p


# --------------------------------------------------------------------------------------------------------------
# Schedules and the loss
# --------------------------------------------------------------------------------------------------------------
def cosine_schedule(base, final, epochs, iters_per_epoch, warmup_epochs=0, warmup_start=0.0):
    """DINO's per-iteration schedule: linear warm-up then cosine from base to final."""
    warmup = np.linspace(warmup_start, base, warmup_epochs * iters_per_epoch)
    steps = np.arange(epochs * iters_per_epoch - len(warmup))
    cosine = final + 0.5 * (base - final) * (1 + np.cos(np.pi * steps / max(len(steps), 1)))
    return np.concatenate([warmup, cosine])


class CrOCLoss(nn.Module):
    """L = alpha * L_dense + L_glob (Eq. 7), each a cross-view cross-entropy between a centred, sharpened teacher
    and the student (Eq. 3-6), with one running centre per head (image and centroids)."""

    def __init__(self, out_dim, out_dim_c, args):
        super().__init__()
        self.student_temp, self.center_momentum = args.student_temp, args.center_momentum
        self.register_buffer("center", torch.zeros(1, out_dim))
        self.register_buffer("center_c", torch.zeros(1, out_dim_c))
        warm = min(args.warmup_teacher_temp_epochs, args.epochs)
        self.teacher_temps = np.concatenate([np.linspace(args.warmup_teacher_temp, args.teacher_temp, warm),
                                             np.full(args.epochs - warm, args.teacher_temp)])

    def forward(self, s_img, t_img, s_cen, t_cen, valid, epoch):
        """s_img, t_img: (2, B, L); s_cen, t_cen: (2, B, K, Lc) or None; valid: (B, K) bool (Eq. 16).

        Returns (loss_glob, loss_dense). The dense loss averages over every kept centroid of the whole batch, all
        ranks together: this rank's sum is divided by the global count and multiplied by the world size, so that
        DDP's gradient average gives the exact global mean however many centroids each rank keeps. (Eq. 4 writes
        1/K per image; the official code averages over the kept centroids of the batch, per rank.) An image
        whose clusters were all pruned adds nothing; a batch with none anywhere gives 0, not NaN.
        """
        temp = self.teacher_temps[epoch]
        t, t_entropy = teacher_distribution(t_img, self.center, temp)
        loss_glob = 0.5 * cross_view_entropy(s_img, t, self.student_temp).mean()  # Eq. 6: both pairs
        # collapse diagnostics (DINO Sec. 5.3): H(P_t) -> log(out_dim) is uniform collapse, H(P_t) -> 0 with
        # KL -> 0 one-dimensional collapse; loss_glob = H(P_t) + KL(P_t || P_s). No host sync: logged per epoch.
        self.stats = {"teacher_entropy": t_entropy.mean().detach()}
        loss_dense = s_img.new_zeros(())
        batch_center = all_reduce(t_img.sum(dim=(0, 1)).unsqueeze(0))
        n_img = t_img.shape[0] * t_img.shape[1] * world_size()
        self.center.mul_(self.center_momentum).add_(batch_center / n_img, alpha=1 - self.center_momentum)
        if s_cen is None:
            return loss_glob, loss_dense
        w = valid.to(t_cen.dtype)  # (B, K); pruned and padded centroids weigh 0
        count = all_reduce(w.sum())  # kept centroids on all ranks: sum and count, never a mean of means
        tc, tc_entropy = teacher_distribution(t_cen, self.center_c, temp)
        ce = cross_view_entropy(s_cen, tc, self.student_temp)  # (B, K): H(P_t2, P_s1) + H(P_t1, P_s2)
        loss_dense = 0.5 * (ce * w).sum() / count.clamp(min=1) * world_size()  # Eq. 4
        ent_c = tc_entropy.mean(0)  # (B, K), averaged over the views
        self.stats["teacher_entropy_c"] = ((ent_c * w).sum() / w.sum().clamp(min=1)).detach()  # kept ones only
        kept_sum = torch.einsum("bk,vbkl->l", w, t_cen)  # (Lc,) the kept centroids of both views
        batch_center_c = all_reduce(kept_sum.unsqueeze(0))
        new_c = self.center_c * self.center_momentum + batch_center_c / (2 * count).clamp(min=1) * (
            1 - self.center_momentum)
        self.center_c.copy_(torch.where(count > 0, new_c, self.center_c))  # no kept centroid anywhere: keep it
        return loss_glob, loss_dense


def teacher_distribution(logits, center, temp):
    """P_t = softmax((logits - center) / temp) (Eq. 3, 5: DINO's centring and sharpening) and its entropy per row
    (nats), for the collapse diagnostics."""
    log_p = F.log_softmax((logits - center) / temp, dim=-1)
    p = log_p.exp()
    return p, -(p * log_p).sum(-1)


def cross_view_entropy(student_logits, teacher_p, temp):
    """H(P_t2, P_s1) + H(P_t1, P_s2) per row (Eq. 4, 6): each view's student against the other view's teacher.

    student_logits and teacher_p are (2, ..., L), view 1 then view 2; teacher_p has no gradient.
    """
    log_q = F.log_softmax(student_logits / temp, dim=-1)  # log P_s
    return -(teacher_p.flip(0) * log_q).sum(-1).sum(0)


def world_size():
    return dist.get_world_size() if dist.is_initialized() else 1


# --------------------------------------------------------------------------------------------------------------
# The CrOC step (Fig. 2): join -> locate -> split
# --------------------------------------------------------------------------------------------------------------
@torch.no_grad()
def teacher_assignments(tokens, positions, args, generator, return_steps=False):
    """Cluster the teacher's last-block tokens of both views, every (image, head) problem in one call.

    tokens: (2B, H, 1+N, d) view 1 then view 2, CLS at index 0 (Eq. 21); positions: (B, 2, N, 2) patch
    positions in the original image (Sec. 3.3.2). Returns Q* split view-wise (2, B, N, H*K), the heads' clusters
    side by side (Sec. 3.3.3), the kept-centroid mask (B, H*K) (Eq. 16), and the ClusterResult (with every merge
    step's assignment when return_steps, for visualize.py).
    """
    H = tokens.shape[1]
    tokens = tokens.float()  # clustering in fp32 whatever the autocast: exp(-lambda * cost) needs the range
    joint = rearrange(tokens[:, :, 1:], "(v b) h n d -> (b h) (v n) d", v=2)  # join: Z_cat per problem (P, 2N, d)
    cls = rearrange(tokens[:, :, 0], "(v b) h d -> (b h) v d", v=2)  # each view's CLS, for r and c (P, 2, d)
    pos = repeat(positions.float(), "b v n c -> (b h) (v n) c", h=H)  # E_cat (P, 2N, 2)
    res = clustering.cluster(joint, pos, cls, k_start=args.k_start, k_max=args.k_max, lambda_pos=args.lambda_pos,
                             sinkhorn_lambda=args.sinkhorn_lambda, sinkhorn_iterations=args.sinkhorn_iterations,
                             marginal_temp=args.marginal_temp, uniform_marginals=args.uniform_marginals,
                             generator=generator, return_steps=return_steps)  # locate (Sec. 3.3)
    plan = rearrange(res.plan, "(b h) (v n) k -> v b n (h k)", h=H, v=2)  # split: Q*_1, Q*_2
    valid = rearrange(res.valid, "(b h) k -> b (h k)", h=H)
    return plan, valid, res


def train_step(student, teacher, loss_fn, views, positions, epoch, args, generator, autocast):
    """One CrOC step up to the loss (Fig. 2). views: (B, 2, 3, S, S); positions: (B, 2, N, 2). -> loss, stats.

    The parts are labelled with torch.profiler.record_function (free when no profiler runs; bench.py reads
    them). The heads run on every centroid slot, pruned ones included, which weigh 0 in Eq. 4: the same loss as
    on the kept ones alone, with no host sync to count them.
    """
    x = rearrange(views, "b v c h w -> (v b) c h w")  # both views in one pass: view 1 then view 2
    with autocast:
        with torch.no_grad():
            with record_function("teacher forward"):
                tf = teacher.backbone.forward_features(x, which=args.which_features if args.alpha > 0 else None)
                t_img = rearrange(teacher.head(tf.cls), "(v b) l -> v b l", v=2)
            plan = valid = res = t_cen = None
            if args.alpha > 0:
                with record_function("clustering"):
                    plan, valid, res = teacher_assignments(tf.tokens, positions, args, generator)
                with record_function("teacher centroid head"):
                    t_cen = teacher.head(view_centroids(tf.patch, tf.cls, plan), centroids=True)  # Eq. 2-3
        with record_function("student forward"):
            s_img, s_cen = student(x, plan)  # the same Q* pools the student's tokens (Eq. 2)
    with record_function("loss"):
        loss_glob, loss_dense = loss_fn(s_img.float(), t_img.float(), None if s_cen is None else s_cen.float(),
                                        None if t_cen is None else t_cen.float(), valid, epoch)
        loss = loss_glob + args.alpha * loss_dense  # Eq. 7
    stats = {"loss": loss.detach(), "loss_glob": loss_glob.detach(), "loss_dense": loss_dense.detach(),
             **loss_fn.stats}
    if res is not None:
        kept = valid.sum(dim=1).float()  # kept centroids per image, all heads
        stats.update(mean_k=res.k.float().mean(), kept_centroids=kept.mean(),
                     share_images_no_centroid=(kept == 0).float().mean())
    return loss, stats


def param_groups(model):
    """Weight decay on weights only, not on biases and norms (DINO)."""
    decay, no_decay = [], []
    for name, p in model.named_parameters():
        if p.requires_grad:
            (no_decay if p.ndim <= 1 or name.endswith(".bias") else decay).append(p)
    return [{"params": decay}, {"params": no_decay, "weight_decay": 0.0}]


def optimizer_step(student, teacher, optimizer, scaler, loss, epoch, momentum, args):
    """Backward, optional clipping, last-layer freeze, AdamW step, then the teacher's EMA update."""
    optimizer.zero_grad(set_to_none=True)
    with record_function("backward"):
        scaler.scale(loss).backward()
    if args.clip_grad > 0:
        scaler.unscale_(optimizer)
        clip_gradients(student, args.clip_grad)
    if epoch < args.freeze_last_layer:
        for name, p in student.named_parameters():
            if "last_layer" in name:
                p.grad = None
    with record_function("AdamW"):
        scaler.step(optimizer)
        scaler.update()
    with torch.no_grad(), record_function("teacher EMA"):
        t_params = list(teacher.parameters())
        torch._foreach_mul_(t_params, momentum)
        torch._foreach_add_(t_params, list(student.parameters()), alpha=1 - momentum)


def clip_gradients(model, clip):
    for p in model.parameters():
        if p.grad is not None:
            norm = p.grad.norm()
            p.grad.mul_(torch.clamp(clip / (norm + 1e-6), max=1.0))  # per parameter, as DINO; no host sync


# --------------------------------------------------------------------------------------------------------------
# Checkpoints: atomic writes, resume, SIGTERM
# --------------------------------------------------------------------------------------------------------------
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


def save_atomic(obj, path):
    """Write to a temporary file in the same folder, then rename: a crash never leaves a half-written file."""
    tmp = f"{path}.tmp{os.getpid()}"
    torch.save(obj, tmp)
    os.replace(tmp, path)


class StopFlag:
    """Set by SIGTERM/SIGINT; ranks agree on it through a CPU (gloo) all-reduce, which never waits on the GPU."""

    def __init__(self):
        self.requested = False
        self.group = dist.new_group(backend="gloo") if dist.is_initialized() else None
        self.previous = {sig: signal.signal(sig, self._handler) for sig in (signal.SIGTERM, signal.SIGINT)}

    def restore(self):
        for sig, handler in self.previous.items():
            signal.signal(sig, handler)

    def _handler(self, signum, frame):
        self.requested = True

    def should_stop(self):
        if self.group is None:
            return self.requested
        flag = torch.tensor([float(self.requested)])
        dist.all_reduce(flag, group=self.group)
        return flag.item() > 0  # a CPU tensor: no device synchronisation


def build_dataset(args):
    transform = data.TwoViews(args.img_size, args.patch_size, tuple(args.global_crops_scale))
    if args.data_path:
        return data.PretrainImages(args.data_path, transform)
    return data.SyntheticPretrain(args.synthetic_images, args.synthetic_size, args.seed, transform)


def main(args):
    rank, world, local_rank, device = init_distributed()
    torch.manual_seed(args.seed)  # the same initial weights on every rank
    if args.k_max is None:
        args.k_max = args.k_start
    if device.type == "cpu" and args.precision != "fp32":
        args.precision = "fp32"  # autocast on CPU would be bf16 and slow; the paper's fp16 is a GPU setting
    os.makedirs(args.output_dir, exist_ok=True)
    if is_main_process():
        print("\n".join(f"{k}: {v}" for k, v in sorted(vars(args).items())))
        with open(os.path.join(args.output_dir, "config.json"), "w") as f:
            json.dump(vars(args), f, indent=2)

    dataset = build_dataset(args)  # a bad --data_path fails here, before any model work
    sampler = torch.utils.data.DistributedSampler(dataset, num_replicas=world, rank=rank, shuffle=True,
                                                  seed=args.seed)
    loader = torch.utils.data.DataLoader(dataset, sampler=sampler, batch_size=args.batch_size_per_gpu,
                                         num_workers=args.num_workers, pin_memory=device.type == "cuda",
                                         drop_last=True, persistent_workers=args.num_workers > 0)
    if len(loader) == 0:
        raise ValueError(f"{len(dataset)} images cannot fill one batch of --batch_size_per_gpu "
                         f"{args.batch_size_per_gpu} on {world} process(es)")

    # student and teacher: same init; the teacher has no stochastic depth and gets no gradient
    def make(drop_path):
        backbone = build_vit(args.arch, args.patch_size, drop_path_rate=drop_path)
        return CrOCModel(backbone, CrOCHead(backbone.embed_dim, args.out_dim, args.out_dim_c,
                                            norm_last_layer=args.norm_last_layer))
    student, teacher = make(args.drop_path_rate).to(device), make(0.0).to(device)
    ddp_student = student
    if world > 1:
        ddp_student = nn.parallel.DistributedDataParallel(
            student, device_ids=[local_rank] if device.type == "cuda" else None,
            find_unused_parameters=args.alpha == 0)  # plain DINO never uses the centroid last layer
    teacher.load_state_dict(student.state_dict())  # after DDP has broadcast rank 0's student
    teacher.requires_grad_(False)
    torch.manual_seed(args.seed + rank)  # from here on, each rank draws its own crops, seeds and drop paths
    np.random.seed(args.seed + rank)
    loss_fn = CrOCLoss(args.out_dim, args.out_dim_c, args).to(device)
    optimizer = torch.optim.AdamW(param_groups(student))
    scaler = torch.amp.GradScaler("cuda", enabled=args.precision == "fp16")
    dtype = {"fp16": torch.float16, "bf16": torch.bfloat16}.get(args.precision)
    autocast = torch.autocast(device.type, dtype=dtype) if dtype else nullcontext()

    iters = len(loader)
    total_batch = args.batch_size_per_gpu * world
    lr_sched = cosine_schedule(args.lr * total_batch / 256, args.min_lr, args.epochs, iters, args.warmup_epochs)
    wd_sched = cosine_schedule(args.weight_decay, args.weight_decay_end, args.epochs, iters)
    mom_sched = cosine_schedule(args.momentum_teacher, 1.0, args.epochs, iters)

    start_epoch = 0
    ckpt_path = os.path.join(args.output_dir, "checkpoint.pth")
    if os.path.isfile(ckpt_path):
        ckpt = torch_load(ckpt_path)
        student.load_state_dict(ckpt["student"])
        teacher.load_state_dict(ckpt["teacher"])
        optimizer.load_state_dict(ckpt["optimizer"])
        scaler.load_state_dict(ckpt["scaler"])
        loss_fn.load_state_dict(ckpt["loss"])
        start_epoch = ckpt["epoch"]
        if is_main_process():
            print(f"resumed from {ckpt_path} at epoch {start_epoch}")

    def checkpoint(epoch):
        if is_main_process():
            save_atomic({"student": student.state_dict(), "teacher": teacher.state_dict(),
                         "optimizer": optimizer.state_dict(), "scaler": scaler.state_dict(),
                         "loss": loss_fn.state_dict(), "epoch": epoch, "args": vars(args)}, ckpt_path)

    if args.visualize_every > 0 and is_main_process():
        import visualize  # here, not at the top: visualize imports train
        vis_views, vis_positions, vis_originals = visualize.fixed_batch(dataset, 4, args.seed)  # global RNG untouched

        def draw_clusters(epochs_done):
            path = os.path.join(args.output_dir, f"clusters_epoch{epochs_done:04}.png")
            visualize.render_clusters(teacher.backbone, vis_views, vis_positions, args, path, vis_originals,
                                      seed=args.seed, title=f"epoch {epochs_done}")
        if start_epoch == 0:
            draw_clusters(0)

    stop = StopFlag()
    generator = torch.Generator(device=device)
    generator.manual_seed(args.seed * 1000 + rank)
    for epoch in range(start_epoch, args.epochs):
        sampler.set_epoch(epoch)
        student.train()
        sums, steps, t0 = {}, 0, time.time()
        nonfinite = torch.zeros((), dtype=torch.bool, device=device)
        skipped = torch.zeros((), device=device)
        bar = tqdm(loader, desc=f"epoch {epoch}/{args.epochs}", disable=not is_main_process(), leave=False)
        for it, (views, positions, n_skipped) in enumerate(bar):
            step = epoch * iters + it
            for i, group in enumerate(optimizer.param_groups):
                group["lr"] = float(lr_sched[step])
                if i == 0:
                    group["weight_decay"] = float(wd_sched[step])
            views = views.to(device, non_blocking=True)
            positions = positions.to(device, non_blocking=True)
            loss, stats = train_step(ddp_student, teacher, loss_fn, views, positions, epoch, args, generator,
                                     autocast)
            optimizer_step(student, teacher, optimizer, scaler, loss, epoch, float(mom_sched[step]), args)
            nonfinite |= ~torch.isfinite(loss.detach())
            skipped += n_skipped.sum().to(device)
            for k, v in stats.items():
                sums[k] = sums.get(k, 0) + v
            steps += 1
            if (it + 1) % args.log_freq == 0 or it + 1 == iters:  # the only host syncs of the loop: logging
                if bool(all_reduce(nonfinite.float()) > 0):
                    raise FloatingPointError(
                        f"non-finite loss at epoch {epoch}, step {it}: stopping; {ckpt_path} holds the last good "
                        "state. Try --precision bf16, a lower --lr, --clip_grad 3.0 or a lower --teacher_temp.")
                bar.set_postfix({k: f"{(v / steps).item():.3f}" for k, v in sums.items() if k.startswith("loss")})
            if stop.should_stop():
                checkpoint(epoch)  # the epoch restarts on resume, from the weights reached so far
                stop.restore()
                if is_main_process():
                    print(f"signal received: saved {ckpt_path} at epoch {epoch}, step {it}; exiting")
                if dist.is_initialized():
                    dist.destroy_process_group()
                return
        elapsed = time.time() - t0
        means = torch.stack([v / steps for v in sums.values()])
        means = (all_reduce(means) / world).tolist()
        log = {"epoch": epoch, **dict(zip(sums.keys(), means)), "lr": float(lr_sched[step]),
               "wd": float(wd_sched[step]), "momentum": float(mom_sched[step]),
               "images_per_s": steps * total_batch / elapsed, "skipped_files": int(all_reduce(skipped).item()),
               "teacher_sync_error": teacher_sync_error(teacher)}
        checkpoint(epoch + 1)
        if is_main_process():
            if args.saveckp_freq and (epoch + 1) % args.saveckp_freq == 0:
                save_atomic(torch_load(ckpt_path), os.path.join(args.output_dir, f"checkpoint{epoch + 1:04}.pth"))
            if args.visualize_every > 0 and (epoch + 1) % args.visualize_every == 0:
                draw_clusters(epoch + 1)
            with open(os.path.join(args.output_dir, "log.txt"), "a") as f:
                f.write(json.dumps(log) + "\n")
            print(json.dumps(log))
    stop.restore()
    if dist.is_initialized():
        dist.barrier()
        dist.destroy_process_group()


if __name__ == "__main__":
    parser = argparse.ArgumentParser("CrOC pretraining", parents=[get_args_parser()])
    main(parser.parse_args())
