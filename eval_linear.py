"""Linear segmentation probe on frozen dense features (App. C "Transfer learning via linear segmentation";
Tables 1 and 2).

A 1x1 convolution is trained on the concatenated last n_b blocks of a frozen ViT; mIoU is pooled over the whole
val split. Two protocols:

* `--protocol croc` (default for pvoc, coco_things, coco_stuff; Table 1): App. C. Images resized to 448x448,
  Adam at a constant 1e-3, 45 epochs on PVOC12 trainaug and 10 on the full COCO train2017; Leopart's
  `linear_finetune.py` train transform (RandomResizedCrop 0.8-1 + flip, 100x100 training masks); scored at
  448x448 as Leopart's `eval_linear.py`.
* `--protocol mmseg` (default for ade20k; Table 2): App. C "we rely on MM-Segmentation and the 40k iterations
  schedule. We set the batch size to 16, and we report for each method the best result after trying learning
  rates in {1e-3, 8e-4, 3e-4, 1e-4, 8e-5}", in plain torch: MMSegmentation's ADE20K 512x512 pipeline
  (`configs/_base_/datasets/ade20k.py`: random resize 0.5-2.0 of (2048, 512), 512 crop with cat_max_ratio 0.75,
  flip, photometric distortion), the 40k poly schedule (`configs/_base_/schedules/schedule_40k.py`, power 0.9),
  sliding inference (512 windows, stride 341) on the image resized to short side 512, logits resized back to
  the original image and scored there; label 0 ("other") ignored (`reduce_zero_label`). Where it departs from
  MMSegmentation: Adam without weight decay as App. C's linear probe, not SGD (the sweep's learning rates are
  Adam's); the poly floor at 1% of each learning rate (schedule_40k.py's absolute 1e-4 would exceed two of the
  swept rates); the head is FCNHead with num_convs=0 on the concatenated blocks; the photometric distortion in
  Pillow's HSV; padding with 0 after normalisation (the mean colour), ignored by the loss either way; windows
  smaller than 512 padded to 512; only the final head scored (MMSegmentation also validates every 4,000 steps).

Every (n_b, lr) pair gets its own head; all heads see the same batches and the same features, so one feature
pass serves the whole learning-rate sweep and every n_b. Each head's result is printed and written, then the
best. Run as one process or with torchrun (one process per GPU):

    python eval_linear.py --dataset pvoc --data_path /data --weights croc.pth --output_dir out/lin_pvoc
    torchrun --nproc_per_node 4 eval_linear.py --dataset ade20k --data_path /data --weights croc.pth ...

Re-running the same command resumes from output_dir/linear_checkpoint.pth (the heads, Adam's state, the step,
the log), written every --checkpoint_every steps, at the end of the training and when SIGTERM, SIGINT or SIGHUP
reaches any process (which then saves and exits 0): the resumed run ends with the numbers of an uninterrupted
one. A flag that would change them is refused, naming it.
"""
import argparse
import json
import math
import os
import sys
import time

import numpy as np
import torch
import torch.distributed as dist
import torch.nn as nn
import torch.nn.functional as F
from PIL import Image
from torch.nn.parallel import DistributedDataParallel
from torch.utils.data import DistributedSampler
from torchvision import tv_tensors
from torchvision.transforms import v2
from tqdm import tqdm

import metrics
from data import (IGNORE_INDEX, EpochSampler, InputError, SeededSamples, StopFlag, Transformed, ValTransform,
                  build_segmentation_dataset, cli, ignore_stop_signals, need, resize_mask, save_atomic,
                  start_workers, to_input)
from model import backbone_from_args, dense_features, init_distributed, torch_load

DEFAULT_TRAIN_SPLIT = {"pvoc": "trainaug", "synthetic": "train"}  # every other dataset: "train"
DEFAULT_EPOCHS = {"pvoc": 45, "coco_things": 10, "coco_stuff": 10, "ade20k": 10, "synthetic": 5}  # App. C
ADE20K_LRS = [1e-3, 8e-4, 3e-4, 1e-4, 8e-5]  # App. C: the learning rates tried on ADE20K, best one reported
POLY_POWER, POLY_MIN_RATIO = 0.9, 0.01  # schedule_40k.py: power 0.9, eta_min 1e-4 for lr 1e-2 (here 1% of lr)


def get_args_parser():
    parser = argparse.ArgumentParser("Linear segmentation probe on frozen dense features (App. C)", add_help=False)
    metrics.add_backbone_args(parser)
    parser.set_defaults(output_dir="output/eval_linear", batch_size=None)
    parser.add_argument("--protocol", default=None, choices=("croc", "mmseg"),
                        help="croc: App. C's 448x448 Adam probe (default except for ade20k); mmseg: App. C's ADE20K "
                             "protocol, MMSegmentation's 512x512 40k-iteration pipeline in plain torch (default "
                             "for ade20k).")
    parser.add_argument("--train_split", default=None, type=str,
                        help="Training split (default: trainaug for pvoc, as CrOC and Leopart; train otherwise: "
                             "App. C trains on the full COCO train2017, Leopart on a random 10%%).")
    parser.add_argument("--epochs", default=None, type=int,
                        help="croc protocol: training epochs (default: 45 for pvoc and 10 for coco_things/"
                             "coco_stuff, App. C; 5 for synthetic. Leopart: 25).")
    parser.add_argument("--iters", default=40000, type=int,
                        help="mmseg protocol: training iterations (default: 40000, App. C's 40k schedule).")
    parser.add_argument("--lr", default=None, type=float, nargs="+",
                        help="Adam learning rates, one head each, best reported (default: 1e-3 for croc, App. C; "
                             "1e-3 8e-4 3e-4 1e-4 8e-5 for mmseg, App. C's ADE20K sweep). croc: constant; mmseg: "
                             "poly decay (power 0.9) to 1%% of the rate.")
    parser.add_argument("--train_mask_size", default=100, type=int,
                        help="croc protocol: logits are upsampled and masks nearest-resized to this size for the "
                             "training loss (default: 100, Leopart). The mIoU is computed at --img_size (448, "
                             "Leopart's eval script).")
    parser.add_argument("--crop_size", default=512, type=int,
                        help="mmseg protocol: training crop and sliding window (default: 512, MMSegmentation's "
                             "ADE20K 512x512 configs). Images are resized as there: long side <= 4 x crop, short "
                             "side <= crop, times 0.5-2.0 for training.")
    parser.add_argument("--slide_stride", default=341, type=int,
                        help="mmseg protocol: stride of the sliding windows (default: 341, MMSegmentation's ViT "
                             "ADE20K 512x512 configs).")
    parser.add_argument("--cache_train_features", action="store_true",
                        help="croc protocol: compute the train features once, without augmentation (resize only), "
                             "and train the heads on that cache: much faster, but not the protocol (default: off, a "
                             "fresh RandomResizedCrop + flip every epoch as Leopart). The cache holds N x n_b D x h "
                             "x w float16 values in CPU memory (the largest n_b).")
    parser.add_argument("--checkpoint_every", default=500, type=int,
                        help="Steps between writes of output_dir/linear_checkpoint.pth, from which the same command "
                             "resumes; it is also written at the end of the training and on SIGTERM, SIGINT or "
                             "SIGHUP (default: 500: 80 over ADE20K's 40k schedule, about every 1.5 epochs of "
                             "PVOC12 trainaug's 331 steps at batch 32 on one GPU; 0: only then).")
    return parser


def resolve_defaults(args):
    args.protocol = args.protocol or ("mmseg" if args.dataset == "ade20k" else "croc")
    args.train_split = args.train_split or DEFAULT_TRAIN_SPLIT.get(args.dataset, "train")
    if args.epochs is None:
        args.epochs = DEFAULT_EPOCHS[args.dataset]
    if args.lr is None:
        args.lr = list(ADE20K_LRS) if args.protocol == "mmseg" else [1e-3]
    if args.batch_size is None:
        args.batch_size = 16 if args.protocol == "mmseg" else 32  # App. C: 16 on ADE20K; not given otherwise
    if args.protocol == "mmseg" and args.cache_train_features:
        raise InputError("--cache_train_features is for the croc protocol (the mmseg crops change every step)")
    return args


def check_args(args):
    """resolve_defaults, then the range of every numeric flag (InputError naming it), before any work."""
    resolve_defaults(args)
    metrics.check_feature_size(args)
    need(args.epochs >= 1, args, "epochs", "must be at least 1")
    need(args.iters >= 1, args, "iters", "must be at least 1")
    need(all(math.isfinite(lr) and lr > 0 for lr in args.lr), args, "lr", "every rate must be finite and > 0")
    need(args.train_mask_size >= 1, args, "train_mask_size", "must be at least 1")
    need(args.checkpoint_every >= 1, args, "checkpoint_every", "must be at least 1")
    need(args.crop_size >= 1 and (args.protocol != "mmseg" or args.crop_size % args.patch_size == 0), args,
         "crop_size", f"must be a positive multiple of --patch_size {args.patch_size} (--protocol mmseg)")
    need(args.slide_stride >= 1, args, "slide_stride", "must be at least 1")
    return args


def mmseg_scale(args):
    """MMSegmentation's (2048, 512) for a 512 crop: (4 x crop, crop) for other crop sizes."""
    return 4 * args.crop_size, args.crop_size


def run_name(n_blocks, lr):
    """'nb4_lr1e-3': a module name, so no '.' (1.5e-3 -> 'lr1p5e-3')."""
    return f"nb{n_blocks}_lr" + np.format_float_scientific(lr, trim="-", exp_digits=1).replace(".", "p")


# ----------------------------------------------------------------------------------------------------------------
# The croc protocol's train transform (Leopart's linear_finetune.py)

class TrainTransform:
    """Leopart's linear_finetune.py train transform: RandomResizedCrop(img_size, scale 0.8-1, ratio 3/4-4/3) +
    horizontal flip with the same parameters for image (bilinear) and mask (nearest), then the mask
    nearest-resized to mask_size."""

    def __init__(self, img_size=448, mask_size=100):
        self.joint = v2.Compose([
            v2.RandomResizedCrop((img_size, img_size), scale=(0.8, 1.0), ratio=(3 / 4, 4 / 3), antialias=True),
            v2.RandomHorizontalFlip(p=0.5),
        ])
        self.mask_size = mask_size

    def __call__(self, img, mask):
        img, mask = self.joint(img, tv_tensors.Mask(torch.from_numpy(np.asarray(mask))[None]))
        return to_input(img), resize_mask(mask, self.mask_size)


# ----------------------------------------------------------------------------------------------------------------
# MMSegmentation's ADE20K 512x512 pipeline (mmseg protocol) in plain numpy, PIL and torch

# open-mmlab/mmsegmentation, configs/_base_/datasets/ade20k.py: RandomResize to scale (2048, 512) x ratio 0.5-2.0
# keeping the aspect ratio, RandomCrop 512 with cat_max_ratio 0.75, flip 0.5, PhotoMetricDistortion, padding to
# 512 (mask 255; the image with 0 after normalisation, i.e. the mean colour, where MMSegmentation's Pad fills raw
# pixels with 0: only pixels the loss ignores differ); test: Resize to (2048, 512) keeping the ratio. The label
# map (reduce_zero_label: 0 -> 255, 1..150 -> 0..149) is data.ADE20K_LUT.
MMSEG_SCALE = (2048, 512)


def rescale_size(width: int, height: int, scale=MMSEG_SCALE) -> tuple[int, int]:
    """(new_w, new_h) of mmcv's keep-ratio rescale: the largest size with long side <= max(scale) and short side
    <= min(scale)."""
    factor = min(max(scale) / max(width, height), min(scale) / min(width, height))
    return int(width * factor + 0.5), int(height * factor + 0.5)


def mmseg_test_resize(img: Image.Image, scale=MMSEG_SCALE) -> Image.Image:
    """The test-time Resize of the ADE20K config: keep ratio, short side 512 unless the long side hits 2048."""
    return img.resize(rescale_size(*img.size, scale=scale), Image.BILINEAR)


def photometric_distortion(img: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """MMSegmentation's PhotoMetricDistortion on (H, W, 3) uint8, each step with probability 1/2: brightness
    +-32, contrast x0.5-1.5 (before or after the HSV steps), saturation x0.5-1.5, hue +-18 of OpenCV's 180."""
    x = img.astype(np.float32)
    if rng.random() < 0.5:
        x = np.clip(x + rng.uniform(-32, 32), 0, 255)
    contrast_first = rng.random() < 0.5
    contrast = rng.uniform(0.5, 1.5) if rng.random() < 0.5 else None
    if contrast_first and contrast is not None:
        x = np.clip(x * contrast, 0, 255)
    saturation = rng.uniform(0.5, 1.5) if rng.random() < 0.5 else None
    hue = int(rng.integers(-18, 19)) if rng.random() < 0.5 else None
    if saturation is not None or hue is not None:
        hsv = np.asarray(Image.fromarray(x.round().astype(np.uint8)).convert("HSV")).astype(np.float32)
        if saturation is not None:
            hsv[..., 1] = np.clip(hsv[..., 1] * saturation, 0, 255)
        if hue is not None:  # PIL's hue runs over 0..255 where OpenCV's runs over 0..180
            hsv[..., 0] = (hsv[..., 0] + hue * 256 / 180) % 256
        x = np.asarray(Image.fromarray(hsv.round().astype(np.uint8), "HSV").convert("RGB")).astype(np.float32)
    if not contrast_first and contrast is not None:
        x = np.clip(x * contrast, 0, 255)
    return x.round().astype(np.uint8)


def cat_max_ratio_crop(mask: np.ndarray, crop: int, rng: np.random.Generator, cat_max_ratio: float = 0.75,
                       tries: int = 10) -> tuple[int, int]:
    """(top, left) of MMSegmentation's RandomCrop: up to 10 random crops until no class (255 aside) covers more
    than cat_max_ratio of it; the last try is kept otherwise."""
    h, w = mask.shape
    for _ in range(tries):
        top, left = int(rng.integers(0, max(h - crop, 0) + 1)), int(rng.integers(0, max(w - crop, 0) + 1))
        labels, counts = np.unique(mask[top:top + crop, left:left + crop], return_counts=True)
        counts = counts[labels != IGNORE_INDEX]
        if len(counts) > 1 and counts.max() / counts.sum() < cat_max_ratio:
            break
    return top, left


class MMSegTrainTransform:
    """The ADE20K 512x512 train pipeline of MMSegmentation (see MMSEG_SCALE) on a (PIL image, uint8 mask) pair
    -> (image (3, crop, crop) normalised, mask (crop, crop) uint8). Randomness comes from torch's generator, which
    data.SeededSamples seeds per sample from --seed."""

    def __init__(self, crop_size=512, scale=MMSEG_SCALE, ratio_range=(0.5, 2.0), cat_max_ratio=0.75):
        self.crop, self.scale, self.ratio_range, self.cat_max_ratio = crop_size, scale, ratio_range, cat_max_ratio

    def __call__(self, img, mask):
        rng = np.random.default_rng(int(torch.randint(0, 2 ** 62, ())))
        ratio = rng.uniform(*self.ratio_range)
        size = rescale_size(*img.size, scale=(int(self.scale[0] * ratio), int(self.scale[1] * ratio)))
        img = np.asarray(img.resize(size, Image.BILINEAR))
        mask = np.asarray(Image.fromarray(np.asarray(mask, dtype=np.uint8)).resize(size, Image.NEAREST))
        top, left = cat_max_ratio_crop(mask, self.crop, rng, self.cat_max_ratio)
        img, mask = img[top:top + self.crop, left:left + self.crop], mask[top:top + self.crop, left:left + self.crop]
        if rng.random() < 0.5:
            img, mask = img[:, ::-1], mask[:, ::-1]
        img = photometric_distortion(np.ascontiguousarray(img), rng)
        pad_h, pad_w = self.crop - img.shape[0], self.crop - img.shape[1]
        x = torch.nn.functional.pad(to_input(img), (0, pad_w, 0, pad_h), value=0.0)
        y = np.pad(mask, ((0, pad_h), (0, pad_w)), constant_values=IGNORE_INDEX)
        return x, torch.from_numpy(np.ascontiguousarray(y))


class OriginalSizeTransform:
    """ADE20K test: the image resized as MMSegmentation's test Resize, the mask kept at its ORIGINAL size (the
    prediction is resized back to it before scoring)."""

    def __init__(self, scale=MMSEG_SCALE):
        self.scale = scale

    def __call__(self, img, mask):
        return to_input(mmseg_test_resize(img, self.scale)), torch.from_numpy(np.asarray(mask, dtype=np.uint8))


# ----------------------------------------------------------------------------------------------------------------
# Heads, schedule, training

def build_heads(args, embed_dim, num_classes, device):
    """{run name: 1x1 conv} for every (n_b, lr); each head is initialised from --seed alone, so a head trained
    here equals the head of a run with only its own n_b and lr."""
    heads = nn.ModuleDict()
    for n in args.n_last_blocks:
        for lr in args.lr:
            with torch.random.fork_rng(devices=[]):
                torch.manual_seed(args.seed)
                heads[run_name(n, lr)] = nn.Conv2d(n * embed_dim, num_classes, kernel_size=1)  # per-pixel linear
    return heads.to(device)


def n_blocks_of(name):
    """n_b of a run name 'nb<n_b>_lr<lr>'."""
    return int(name[2:].split("_")[0])


def head_inputs(feats, name, embed_dim):
    """The slice of the (B, max n_b * D, h, w) features that head `name` reads: its last n_b blocks."""
    return metrics.last_blocks(feats, n_blocks_of(name), embed_dim)


def poly_lr(base_lr, it, total, power=POLY_POWER, min_ratio=POLY_MIN_RATIO):
    """MMSegmentation's PolyLR: (base - eta_min) (1 - it / total)^power + eta_min, with eta_min = min_ratio x base."""
    eta_min = base_lr * min_ratio
    return (base_lr - eta_min) * (1 - min(it, total) / total) ** power + eta_min


def train_step(heads, feats, mask, optimizer, embed_dim, stats):
    """One optimizer step of every head on the same (B, max n_b * D, h, w) features and (B, m, m) masks.

    Each head's loss is backpropagated on its own (the features are frozen, so the heads share nothing): the
    peak memory is one head's (B, C, m, m) logits, not all of them."""
    optimizer.zero_grad(set_to_none=True)
    n_valid = (mask != 255).sum()
    for name, head in heads.items():
        # head(upsample(F)) == upsample(head(F)) because bilinear weights sum to 1: the head runs at (h, w)
        logits = F.interpolate(head(head_inputs(feats, name, embed_dim)), size=mask.shape[-2:], mode="bilinear",
                               align_corners=False)
        # sum / max(n, 1): a batch that is all 255 gives loss 0 instead of the NaN of the default 'mean'
        loss_sum = F.cross_entropy(logits, mask, ignore_index=255, reduction="sum")
        (loss_sum / n_valid.clamp(min=1)).backward()
        stats[name] += loss_sum.detach().double()
    optimizer.step()
    stats["_valid"] += n_valid
    stats["_total"] += mask.numel()


def new_stats(heads, device):
    return {name: torch.zeros((), dtype=torch.float64, device=device) for name in [*heads, "_valid", "_total"]}


def reduce_stats(stats, train_set):
    """Mean pixel CE per head over everything since the stats were made, all ranks together."""
    names = list(stats)
    values = torch.stack([stats[n].double() for n in names])
    if dist.is_initialized():
        dist.all_reduce(values)
    values = dict(zip(names, values.tolist()))
    metrics.check_scored_pixels(values["_valid"], values["_total"], train_set, "training")
    return {n: values[n] / max(values["_valid"], 1) for n in names if not n.startswith("_")}


@torch.no_grad()
def cache_features(backbone, data, n_max, device, main):
    """One augmentation-free pass: (N, n_max D, h, w) float16 features and (N, m, m) uint8 masks on the CPU."""
    feats, masks = [], []
    for img, mask in tqdm(start_workers(data), desc="caching train features", total=len(data), disable=not main):
        feats.append(dense_features(backbone, img.to(device), n_max).half().cpu())
        masks.append(mask)
    return torch.cat(feats), torch.cat(masks)


class CachedBatches:
    """Shuffled (features, masks) batches of the train-feature cache. Each epoch's order is a function of (seed,
    epoch), and set_epoch's skip drops its first samples, as data.EpochSampler: a resumed run continues it."""

    def __init__(self, feats, masks, batch_size, seed):
        self.feats, self.masks, self.batch_size, self.seed = feats, masks, batch_size, seed
        self.epoch, self.skip = 0, 0

    def set_epoch(self, epoch, skip=0):
        self.epoch, self.skip = epoch, skip

    def __len__(self):
        return -(-(len(self.feats) - self.skip) // self.batch_size)

    def __iter__(self):
        seed = np.random.SeedSequence([s % 2 ** 64 for s in self.seed] + [self.epoch]).generate_state(2, np.uint32)
        generator = torch.Generator().manual_seed(int(seed[0]) << 32 | int(seed[1]))
        order = torch.randperm(len(self.feats), generator=generator)[self.skip:]
        for i in range(0, len(order), self.batch_size):
            idx = order[i:i + self.batch_size]
            yield self.feats[idx], self.masks[idx]


def seeded_loader(dataset, args, rank, world_size):
    """-> (loader, sampler): shuffled batches of dataset whose order is a function of (--seed, epoch) and each
    sample's augmentation of (--seed, epoch, index), whatever the workers (data.EpochSampler, data.SeededSamples,
    as train.py's): a run resumed at any step draws the batches of an uninterrupted one."""
    sampler = EpochSampler(dataset, num_replicas=world_size, rank=rank, seed=args.seed)
    return metrics.loader(SeededSamples(dataset, args.seed), args, sampler=sampler,
                          worker_init_fn=ignore_stop_signals), sampler


def train_croc(backbone, heads, optimizer, train_set, args, device, rank, world_size, main, progress):
    """App. C: --epochs passes over the train split at a constant learning rate, from progress.step on.
    -> True when a stop signal ended it (saved)."""
    n_max, embed_dim = max(args.n_last_blocks), backbone.embed_dim
    if args.cache_train_features:
        sampler = DistributedSampler(train_set, shuffle=False) if world_size > 1 else None  # equal step counts
        per_epoch = -(-(len(sampler) if sampler is not None else len(train_set)) // args.batch_size)
        if progress.step >= args.epochs * per_epoch:
            return False  # resumed after the last step: no cache to compute
        plain = Transformed(train_set, ValTransform(args.img_size, args.train_mask_size))
        feats, masks = cache_features(backbone, metrics.loader(plain, args, sampler=sampler,
                                                               worker_init_fn=ignore_stop_signals), n_max, device, main)
        batches = order = CachedBatches(feats, masks, args.batch_size, [args.seed, rank])
        features = torch.Tensor.float
    else:
        batches, order = seeded_loader(Transformed(train_set, TrainTransform(args.img_size, args.train_mask_size)),
                                       args, rank, world_size)
        features = lambda x: dense_features(backbone, x, n_max)  # noqa: E731
    per_epoch, start = len(batches), time.time()
    for epoch in range(progress.step // per_epoch, args.epochs):
        heads.train()
        order.set_epoch(epoch, skip=(progress.step - epoch * per_epoch) * args.batch_size)  # a resume mid-epoch
        for x, mask in tqdm(start_workers(batches), desc=f"epoch {epoch + 1}/{args.epochs}", total=len(batches),
                            disable=not main, leave=False):
            x, mask = x.to(device, non_blocking=True), mask.to(device, non_blocking=True).long()  # mask (B, m, m)
            train_step(heads, features(x), mask, optimizer, embed_dim, progress.stats)
            progress.step += 1
            if progress.step == (epoch + 1) * per_epoch:  # the epoch's log line goes into its last checkpoint
                losses = progress.losses(train_set)
                progress.log({"epoch": epoch + 1, "train_loss": losses}, f"epoch {epoch + 1}/{args.epochs}  train loss "
                             + "  ".join(f"{n} {v:.4f}" for n, v in losses.items())
                             + f"  ({time.time() - start:.0f} s)")
            if progress.checkpoint(last=progress.step == args.epochs * per_epoch):
                return True
    return False


def train_mmseg(backbone, heads, optimizer, train_set, args, device, rank, world_size, main, progress):
    """App. C on ADE20K: --iters steps of batch --batch_size (per process) on MMSegmentation's 512 crops, every
    learning rate decayed by the poly schedule of schedule_40k.py, from progress.step on. -> True when a stop
    signal ended it (saved)."""
    n_max, embed_dim = max(args.n_last_blocks), backbone.embed_dim
    batches, order = seeded_loader(Transformed(train_set, MMSegTrainTransform(args.crop_size, scale=mmseg_scale(args))),
                                   args, rank, world_size)
    per_epoch, start, log_every = len(batches), time.time(), max(min(50, args.iters // 10), 1)
    heads.train()
    bar = tqdm(total=args.iters, initial=progress.step, desc="iterations", disable=not main)
    while progress.step < args.iters:
        epoch, first = divmod(progress.step, per_epoch)
        order.set_epoch(epoch, skip=first * args.batch_size)  # first > 0: a resume mid-epoch
        for x, mask in start_workers(batches):
            for group in optimizer.param_groups:
                group["lr"] = poly_lr(group["initial_lr"], progress.step, args.iters)
            x, mask = x.to(device, non_blocking=True), mask.to(device, non_blocking=True).long()
            train_step(heads, dense_features(backbone, x, n_max), mask, optimizer, embed_dim, progress.stats)
            progress.step += 1
            bar.update(1)
            it = progress.step
            if it % log_every == 0 or it == args.iters:
                losses = progress.losses(train_set)
                progress.log({"iter": it, "train_loss": losses}, f"iter {it}/{args.iters}  train loss " + "  ".join(
                    f"{n} {v:.4f}" for n, v in losses.items()) + f"  ({time.time() - start:.0f} s)")
            if progress.checkpoint(last=it == args.iters):
                bar.close()
                return True
            if it == args.iters:
                break
    bar.close()
    return False


# ----------------------------------------------------------------------------------------------------------------
# Resuming: the checkpoint, the flags it was trained with, stop signals

CHECKPOINT = "linear_checkpoint.pth"  # not train.py's checkpoint.pth, should both share a folder
# These steer where and how the run goes, not its numbers: a resumed run may change them. --data_path too, with a
# warning (a job may copy the dataset to a scratch folder of its own). Every other changed flag is refused.
RUN_FLAGS = ("output_dir", "num_workers", "device", "n_pictures", "checkpoint_every", "data_path")


def read_checkpoint(args, world_size, main):
    """output_dir's checkpoint to resume from, None for a new run. Refused (data.InputError) before anything is
    written, so the run's config.json and results stay: a changed flag that would change the numbers, named
    (--flag old -> new), and another number of processes (another batch and order)."""
    path = os.path.join(args.output_dir, CHECKPOINT)
    if not os.path.isfile(path):
        return None
    ckpt = torch_load(path)
    if not isinstance(ckpt, dict) or not {"heads", "step", "args", "world_size"} <= set(ckpt):
        raise InputError(f"{path} is not a checkpoint of eval_linear.py: move it, or use another --output_dir")
    saved = ckpt["args"]
    changed = {k: (saved[k], v) for k, v in sorted(vars(args).items()) if k in saved and v != saved[k]}
    refused = [f"--{k} {old} -> {new}" for k, (old, new) in changed.items() if k not in RUN_FLAGS]
    if ckpt["world_size"] != world_size:
        refused.append(f"{ckpt['world_size']} -> {world_size} processes")
    if refused:
        raise InputError(f"cannot resume {path}: " + "; ".join(refused) + ". These change the probe's numbers: "
                         "use the checkpoint's values, or a new --output_dir for a new run.")
    if "data_path" in changed and main:
        old, new = changed["data_path"]
        print(f"warning: resuming {path} with --data_path {old} -> {new}: the same files are assumed",
              file=sys.stderr)
    return ckpt


class Progress:
    """The training's state besides the heads and Adam's: the steps done, the loss sums since the last log line
    and the log's records; and its checkpoint, written every --checkpoint_every steps, after the last step and
    when a stop signal (SIGTERM, SIGINT, SIGHUP) has reached any process. No random state is saved: every draw is
    a function of --seed, the epoch and the sample (seeded_loader, CachedBatches)."""

    def __init__(self, args, heads, optimizer, world_size, device, main):
        self.args, self.heads, self.optimizer, self.world_size, self.device = args, heads, optimizer, world_size, device
        self.main, self.path = main, os.path.join(args.output_dir, CHECKPOINT)
        self.step, self.history, self.stats = 0, [], new_stats(heads, device)
        # all processes agree on a stop through a CPU (gloo) all-reduce, whatever the backend: no device sync
        self.stop = StopFlag(dist.new_group(backend="gloo") if dist.is_initialized() else None)

    def resume(self, ckpt):
        """Load ckpt (read_checkpoint; None: a new run) and make log.txt hold its records: the lines that a kill
        after the checkpoint leaves there are written again by the steps that redo them."""
        if ckpt is None:
            return
        self.heads.load_state_dict(ckpt["heads"])
        self.optimizer.load_state_dict(ckpt["optimizer"])
        self.step, self.history = ckpt["step"], ckpt["log"]
        if self.main:
            for name, total in ckpt["stats"].items():  # the sums over all processes, counted once
                self.stats[name] += total
            for name in os.listdir(self.args.output_dir):  # what a kill during save_atomic leaves
                if name.startswith((f"{CHECKPOINT}.tmp", "log.txt.tmp")):
                    os.remove(os.path.join(self.args.output_dir, name))
            save_atomic("".join(json.dumps(r) + "\n" for r in self.history).encode(),
                        os.path.join(self.args.output_dir, "log.txt"))
            print(f"resumed from {self.path} at step {self.step}", flush=True)

    def log(self, record, line):
        self.history.append(record)
        if self.main:
            print(line, flush=True)
            with open(os.path.join(self.args.output_dir, "log.txt"), "a") as f:
                f.write(json.dumps(record) + "\n")

    def losses(self, train_set):
        """Mean pixel CE per head since the last call, all processes together."""
        losses, self.stats = reduce_stats(self.stats, train_set), new_stats(self.heads, self.device)
        return losses

    def checkpoint(self, last=False):
        """After each step, on every process: save every --checkpoint_every steps, after the last step and when
        any process has had a stop signal. -> True: stop now (saved)."""
        stop = self.stop.should_stop()
        every = self.args.checkpoint_every
        if stop or last or (every > 0 and self.step % every == 0):
            self.save()
        return stop

    def save(self):
        """On every process (the loss sums are summed over them); rank 0 writes the checkpoint (data.save_atomic)."""
        names = list(self.stats)
        totals = torch.stack([self.stats[n] for n in names])
        if dist.is_initialized():
            dist.all_reduce(totals)
        if self.main:
            save_atomic({"heads": self.heads.state_dict(), "optimizer": self.optimizer.state_dict(),
                         "step": self.step, "stats": dict(zip(names, totals.tolist())), "log": self.history,
                         "args": vars(self.args), "world_size": self.world_size}, self.path)

    def finish(self, stopped=False):
        """Restore the signal handlers and leave the process group; stopped: a signal ended the training (saved).
        A signal during the evaluation lets it run to its end (the trained heads are saved already)."""
        self.stop.restore()
        if self.main and stopped:
            print(f"signal received: saved {self.path} at step {self.step}; exiting. Re-run the same command to "
                  f"continue.", flush=True)
        elif self.main and self.stop.requested:
            print("signal received during the evaluation, which ran to its end", flush=True)
        if dist.is_initialized():
            dist.barrier()
            dist.destroy_process_group()


# ----------------------------------------------------------------------------------------------------------------
# Prediction and scoring

def slide_windows(height, width, crop, stride):
    """(y1, y2, x1, x2) windows of MMSegmentation's slide inference: a grid of stride `stride`, the last row and
    column moved back inside the image; windows are smaller than crop only where the image is."""
    rows = max(height - crop + stride - 1, 0) // stride + 1
    cols = max(width - crop + stride - 1, 0) // stride + 1
    windows = []
    for r in range(rows):
        for c in range(cols):
            y2, x2 = min(r * stride + crop, height), min(c * stride + crop, width)
            windows.append((max(y2 - crop, 0), y2, max(x2 - crop, 0), x2))
    return windows


@torch.no_grad()
def slide_logits(backbone, heads, image, crop, stride, embed_dim):
    """{run: (C, H, W) logits} of one (3, H, W) image: every window padded to crop x crop (0, the normalised
    mean), all windows in one forward, each head's logits upsampled to the window and averaged where windows
    overlap."""
    _, height, width = image.shape
    windows = slide_windows(height, width, crop, stride)
    x = torch.stack([F.pad(image[:, y1:y2, x1:x2], (0, crop - (x2 - x1), 0, crop - (y2 - y1)))
                     for y1, y2, x1, x2 in windows])  # (n_windows, 3, crop, crop)
    feats = dense_features(backbone, x, max(n_blocks_of(n) for n in heads))
    count = torch.zeros(1, height, width, device=image.device)
    for y1, y2, x1, x2 in windows:
        count[:, y1:y2, x1:x2] += 1
    out = {}
    for name, head in heads.items():
        logits = F.interpolate(head(head_inputs(feats, name, embed_dim)), size=(crop, crop), mode="bilinear",
                               align_corners=False)
        total = torch.zeros(logits.shape[1], height, width, device=image.device)
        for w, (y1, y2, x1, x2) in enumerate(windows):
            total[:, y1:y2, x1:x2] += logits[w, :, :y2 - y1, :x2 - x1]
        out[name] = total / count
    return out


@torch.no_grad()
def predict(backbone, heads, img, mask_shape, args, embed_dim):
    """{run: (B, H, W) predicted classes} at the mask's size. croc: (B, 3, S, S) at S x S; mmseg: one resized
    image whose logits are resized to the ORIGINAL mask size before the argmax."""
    if args.protocol == "mmseg":
        logits = slide_logits(backbone, heads, img[0], args.crop_size, args.slide_stride, embed_dim)
        return {name: F.interpolate(lg[None], size=mask_shape, mode="bilinear", align_corners=False).argmax(1)
                for name, lg in logits.items()}
    feats = dense_features(backbone, img, max(args.n_last_blocks))
    return {name: F.interpolate(head(head_inputs(feats, name, embed_dim)), size=mask_shape, mode="bilinear",
                                align_corners=False).argmax(1) for name, head in heads.items()}


def val_data(val_set, args, rank=0, world_size=1):
    transform = OriginalSizeTransform(mmseg_scale(args)) if args.protocol == "mmseg" else ValTransform(args.img_size)
    batch_size = 1 if args.protocol == "mmseg" else args.batch_size  # mmseg: every image has its own size
    return metrics.loader(Transformed(metrics.shard(val_set, rank, world_size), transform), args,
                          batch_size=batch_size, worker_init_fn=ignore_stop_signals)


@torch.no_grad()
def evaluate(backbone, heads, val_set, args, device, rank, world_size, main):
    """{run: pooled (C, C) confusion matrix} over the whole split (Leopart's PredsmIoU), and the number of mask
    pixels seen (scored + ignored), all ranks together."""
    num_classes, embed_dim = val_set.num_classes, backbone.embed_dim
    confusion = {name: torch.zeros(num_classes, num_classes, dtype=torch.int64, device=device) for name in heads}
    n_total = torch.zeros((), dtype=torch.int64, device=device)
    val_loader = val_data(val_set, args, rank, world_size)
    for img, mask in tqdm(start_workers(val_loader), desc="evaluating", total=len(val_loader), disable=not main):
        img, mask = img.to(device, non_blocking=True), mask.to(device, non_blocking=True)
        for name, pred in predict(backbone, heads, img, mask.shape[-2:], args, embed_dim).items():
            confusion[name] += metrics.confusion_matrix(pred, mask, num_classes)
        n_total += mask.numel()
    if dist.is_initialized():
        for c in [*confusion.values(), n_total]:
            dist.all_reduce(c)
    return {name: c.cpu() for name, c in confusion.items()}, int(n_total)


@torch.no_grad()
def draw_pictures(backbone, heads, name, val_set, args, device, path):
    """predictions.png: image / ground truth / prediction of run `name` for the first --n_pictures val images."""
    rows = []
    for img, mask in val_data(val_set, args):
        img, mask = img.to(device), mask.to(device)
        pred = predict(backbone, {name: heads[name]}, img, mask.shape[-2:], args, backbone.embed_dim)[name]
        rows += [(metrics.denormalize(i), m.cpu().numpy(), p.cpu().numpy()) for i, m, p in zip(img, mask, pred)]
        if len(rows) >= args.n_pictures:
            break
    return metrics.save_prediction_pictures(path, rows[:args.n_pictures])


def main(args):
    rank, world_size, _, device = init_distributed()
    main_process = rank == 0
    if args.device is not None and world_size == 1:
        device = torch.device(args.device)
    check_args(args)
    ckpt = read_checkpoint(args, world_size, main_process)  # refuses a flag change before anything is written
    if main_process:
        metrics.print_config(args)

    # datasets first: a bad layout fails before any model work
    train_set = build_segmentation_dataset(args.dataset, args.data_path, args.train_split,
                                           ignore_unknown_labels=args.ignore_unknown_labels)
    val_set = build_segmentation_dataset(args.dataset, args.data_path, args.val_split,
                                         ignore_unknown_labels=args.ignore_unknown_labels)
    num_classes, class_names = val_set.num_classes, list(val_set.class_names)

    torch.manual_seed(args.seed)  # same on every rank: identical random-init backbones
    backbone = backbone_from_args(args).to(device)
    if main_process:  # only once the inputs are checked: a failed rerun leaves the old config beside its results
        os.makedirs(args.output_dir, exist_ok=True)
        metrics.write_json(os.path.join(args.output_dir, "config.json"), vars(args))
    heads = build_heads(args, backbone.embed_dim, num_classes, device)
    lr_of = {run_name(n, lr): lr for n in args.n_last_blocks for lr in args.lr}
    optimizer = torch.optim.Adam([{"params": h.parameters(), "lr": lr_of[n], "initial_lr": lr_of[n]}
                                  for n, h in heads.items()])  # App. C: Adam; one group per head
    if world_size > 1:
        train_heads = nn.ModuleDict({n: DistributedDataParallel(h, device_ids=[device.index] if device.type ==
                                                                 "cuda" else None) for n, h in heads.items()})
    else:
        train_heads = heads
    progress = Progress(args, heads, optimizer, world_size, device, main_process)  # from here, signals save and stop
    progress.resume(ckpt)
    del ckpt

    train = train_mmseg if args.protocol == "mmseg" else train_croc
    if train(backbone, train_heads, optimizer, train_set, args, device, rank, world_size, main_process, progress):
        return progress.finish(stopped=True)

    heads.eval()
    confusions, n_total = evaluate(backbone, heads, val_set, args, device, rank, world_size, main_process)
    first = next(iter(confusions.values()))
    metrics.check_scored_pixels(int(first.sum()), n_total, val_set, "evaluation")
    runs = {}
    for name, confusion in confusions.items():
        miou_value, iou = metrics.miou(confusion)
        runs[name] = {"miou": miou_value, "n_last_blocks": n_blocks_of(name), "lr": lr_of[name],
                      "per_class_iou": dict(zip(class_names, iou.tolist())), "confusion": confusion.tolist()}
    best = max(runs, key=lambda n: runs[n]["miou"])
    results = {
        "miou": runs[best]["miou"],
        "per_class_iou": runs[best]["per_class_iou"],
        "confusion": runs[best]["confusion"],  # rows: ground truth, columns: prediction, order of class_names
        "class_names": class_names,
        "best_run": best,
        "runs": runs,
        "protocol": args.protocol,
        "dataset": args.dataset,
        "val_split": args.val_split,
        "train_split": args.train_split,
        "weights": args.weights if args.weights is not None else "random_init",
        "checkpoint_key": args.checkpoint_key,
        "arch": args.arch,
        "patch_size": args.patch_size,
        "n_last_blocks": args.n_last_blocks,
        "n_train_images": len(train_set),
        "n_val_images": len(val_set),
        "n_valid_pixels": int(first.sum()),
        "n_ignored_pixels": n_total - int(first.sum()),
        "eval_size": "original" if args.protocol == "mmseg" else args.img_size,
        "epochs": args.epochs if args.protocol == "croc" else None,
        "iters": args.iters if args.protocol == "mmseg" else None,
    }
    if main_process:
        print(metrics.format_iou_table(class_names, torch.tensor(list(runs[best]["per_class_iou"].values())),
                                       runs[best]["miou"]))
        for name, run in runs.items():
            print(f"linear probe mIoU on {args.dataset} {args.val_split} ({len(val_set)} images), {name}: "
                  f"{100 * run['miou']:.2f}")
        for n in args.n_last_blocks:
            best_n = max((r for r in runs if runs[r]["n_last_blocks"] == n), key=lambda r: runs[r]["miou"])
            print(f"best for n_b={n}: {best_n} {100 * runs[best_n]['miou']:.2f}")
        print(f"best: {best} {100 * runs[best]['miou']:.2f}")
        metrics.write_json(os.path.join(args.output_dir, "results.json"), results)
        torch.save({n: h.state_dict() for n, h in heads.items()}, os.path.join(args.output_dir, "linear_heads.pth"))
        if args.n_pictures > 0:
            draw_pictures(backbone, heads, best, val_set, args, device,
                          os.path.join(args.output_dir, "predictions.png"))
    progress.finish()
    return results


if __name__ == "__main__":
    cli(main, argparse.ArgumentParser(parents=[get_args_parser()]), check=check_args)
