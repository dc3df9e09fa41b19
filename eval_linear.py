"""Linear segmentation probe on frozen dense features (CrOC App. C "Transfer learning via linear segmentation").

Protocol: eval_protocols.md sections 0, A and E.2. A 1x1 convolution is trained with Adam on the concatenated
last `--n_last_blocks` blocks of a frozen ViT, then mIoU is computed on the full val split, pooled over the
dataset (A.5). Run as one process or with torchrun (one process per GPU):

    python eval_linear.py --dataset pvoc --data_path /data --weights croc.pth --output_dir out/lin_pvoc
    torchrun --nproc_per_node 4 eval_linear.py --dataset coco_things --data_path /data --weights croc.pth ...

This file also holds what eval_kmeans.py shares: the backbone/dataset arguments, the val transform, the feature
loader and the metric (`confusion_matrix`, `miou`).
"""
import argparse
import json
import os
import time
from functools import partial

import numpy as np
import torch
import torch.distributed as dist
import torch.nn as nn
import torch.nn.functional as F
from einops import rearrange
from torch.nn.parallel import DistributedDataParallel
from torch.utils.data import DataLoader, Dataset, DistributedSampler, Subset
from torchvision import tv_tensors
from torchvision.transforms import v2
from torchvision.transforms.v2 import functional as TF
from tqdm import tqdm

from data import build_segmentation_dataset
from model import IMAGENET_MEAN, IMAGENET_STD, backbone_from_args, dense_features
from train import init_distributed

DATASETS = ("pvoc", "coco_things", "coco_stuff", "ade20k", "synthetic")
DEFAULT_TRAIN_SPLIT = {"pvoc": "trainaug", "synthetic": "train"}  # every other dataset: "train"
DEFAULT_EPOCHS = {"pvoc": 45, "coco_things": 10, "coco_stuff": 10, "ade20k": 10, "synthetic": 5}


# ----------------------------------------------------------------------------------------------------------------
# Metric (A.5, A.6)

def _count_pairs(pred, gt, n_gt, n_pred, ignore_index=255):
    """(n_gt, n_pred) int64 counts M[g, p] over the pixels where gt != ignore_index. Any shapes, same numel.

    A valid pixel whose gt is not in 0..n_gt-1 or whose pred is not in 0..n_pred-1 raises ValueError: silently
    dropping or clipping it would change the metric without anyone noticing."""
    pred, gt = torch.as_tensor(pred).reshape(-1), torch.as_tensor(gt).reshape(-1)
    if pred.numel() != gt.numel():
        raise ValueError(f"pred has {pred.numel()} pixels but gt has {gt.numel()}")
    valid = gt != ignore_index
    g, p = gt[valid].long(), pred[valid].long()
    if g.numel() and (g.min() < 0 or g.max() >= n_gt):
        raise ValueError(f"ground truth holds labels outside 0..{n_gt - 1} (and the ignore index {ignore_index})")
    if p.numel() and (p.min() < 0 or p.max() >= n_pred):
        raise ValueError(f"predictions hold labels outside 0..{n_pred - 1} on valid pixels")
    counts = torch.bincount(g * n_pred + p, minlength=n_gt * n_pred)
    return rearrange(counts, "(g p) -> g p", g=n_gt)


def confusion_matrix(pred, gt, num_classes, ignore_index=255):
    """(C, C) int64 M[g, p] = #pixels with ground truth g predicted as p, over pixels where gt != ignore_index.

    pred and gt may have any (equal) number of elements. Labels outside 0..C-1 on a valid pixel raise ValueError
    (in pred as well as in gt); pred is free on ignored pixels."""
    return _count_pairs(pred, gt, num_classes, num_classes, ignore_index)


def miou(confusion):
    """(mean IoU, per-class IoU (C,) float64) from a dataset-pooled (C, C) confusion matrix M[g, p]   # A.5

    IoU_c = M[c,c] / max(sum_p M[c,p] + sum_g M[g,c] - M[c,c], 1e-8); the mean is over all C classes, so a class
    absent from both ground truth and prediction has IoU 0 and still counts (A.6)."""
    confusion = confusion.double()
    tp = confusion.diagonal()
    union = confusion.sum(1) + confusion.sum(0) - tp
    iou = tp / union.clamp(min=1e-8)
    return iou.mean().item(), iou


def format_iou_table(class_names, iou, miou_value):
    width = max(len(n) for n in class_names) + 2
    lines = [f"{'class':<{width}} IoU (%)"]
    lines += [f"{name:<{width}} {100 * v:6.2f}" for name, v in zip(class_names, iou.tolist())]
    lines.append(f"{'mean':<{width}} {100 * miou_value:6.2f}")
    return "\n".join(lines)


# ----------------------------------------------------------------------------------------------------------------
# Transforms (A.2): images resized with bilinear, masks with nearest only (A.6: 255 must not bleed)

def _to_input(img):
    """PIL RGB -> (3, H, W) float32 ImageNet-normalised."""
    img = TF.to_dtype(TF.to_image(img), torch.float32, scale=True)
    return TF.normalize(img, IMAGENET_MEAN, IMAGENET_STD).as_subclass(torch.Tensor)


def _resize_mask(mask, size):
    """(1, H, W) uint8 -> (size, size) uint8, nearest."""
    return TF.resize(tv_tensors.Mask(mask), [size, size], interpolation=v2.InterpolationMode.NEAREST,
                     antialias=False).as_subclass(torch.Tensor)[0]


class ValTransform:
    """A.2 val: image resized to img_size x img_size (aspect ratio not kept), mask nearest to img_size and then
    nearest to mask_size (the reference's two steps, e.g. 448 -> 100 for k-means)."""

    def __init__(self, img_size=448, mask_size=None):
        self.img_size, self.mask_size = img_size, mask_size or img_size

    def __call__(self, img, mask):
        img = TF.resize(img, [self.img_size, self.img_size], interpolation=v2.InterpolationMode.BILINEAR,
                        antialias=True)
        mask = _resize_mask(torch.from_numpy(np.asarray(mask))[None], self.img_size)
        if self.mask_size != self.img_size:
            mask = _resize_mask(mask[None], self.mask_size)
        return _to_input(img), mask


class TrainTransform:
    """A.2 / E.2 train: RandomResizedCrop(img_size, scale 0.8-1, ratio 3/4-4/3) + horizontal flip with the same
    parameters for image (bilinear) and mask (nearest), then the mask nearest-resized to mask_size."""

    def __init__(self, img_size=448, mask_size=100):
        self.joint = v2.Compose([
            v2.RandomResizedCrop((img_size, img_size), scale=(0.8, 1.0), ratio=(3 / 4, 4 / 3), antialias=True),
            v2.RandomHorizontalFlip(p=0.5),
        ])
        self.mask_size = mask_size

    def __call__(self, img, mask):
        img, mask = self.joint(img, tv_tensors.Mask(torch.from_numpy(np.asarray(mask))[None]))
        return _to_input(img), _resize_mask(mask, self.mask_size)


class Transformed(Dataset):
    """(PIL image, np.uint8 mask) dataset -> (image (3, S, S) float, mask (m, m) uint8) through a joint transform."""

    def __init__(self, dataset, transform):
        self.dataset, self.transform = dataset, transform

    def __len__(self):
        return len(self.dataset)

    def __getitem__(self, i):
        return self.transform(*self.dataset[i])


# ----------------------------------------------------------------------------------------------------------------
# Arguments and backbone shared with eval_kmeans.py

def add_backbone_args(parser):
    """Arguments shared by eval_linear.py and eval_kmeans.py: dataset, backbone, feature extraction, output."""
    parser.add_argument("--dataset", default="pvoc", choices=DATASETS,
                        help="pvoc (21 classes incl. background), coco_things (12), coco_stuff (15), ade20k (150), "
                             "synthetic (data.py's scenes: in memory without --data_path, else the folder that "
                             "`python data.py --write-synthetic DIR` writes).")
    parser.add_argument("--data_path", default=None, type=str,
                        help="Dataset root (see data.py for the layouts). Optional only for --dataset synthetic.")
    parser.add_argument("--val_split", default="val", type=str, help="Evaluation split (default: val).")
    parser.add_argument("--weights", default=None, type=str,
                        help="Checkpoint to evaluate: our training checkpoints, official CrOC/DINO checkpoints or a "
                             "bare backbone state dict (anything model.load_pretrained reads).")
    parser.add_argument("--checkpoint_key", default="teacher", type=str,
                        help="Which network of a training checkpoint to evaluate (default: teacher, as DINO/CrOC).")
    parser.add_argument("--random_init", action="store_true",
                        help="Evaluate a randomly initialised backbone instead of --weights (a lower bound).")
    parser.add_argument("--arch", default="vit_small", choices=("vit_nano", "vit_tiny", "vit_small", "vit_base"),
                        help="Backbone architecture (default: vit_small, the ViT-S/16 of the CrOC tables).")
    parser.add_argument("--patch_size", default=16, type=int, help="Patch size (default: 16).")
    parser.add_argument("--n_last_blocks", default=4, type=int,
                        help="Concatenate the patch tokens of the last n blocks, each through the final LayerNorm "
                             "(CrOC App. C; n_b is not given in the paper: 4 is DINO's advice for ViT-S; spec E.1).")
    parser.add_argument("--img_size", default=448, type=int,
                        help="Images are resized to img_size x img_size (default: 448, CrOC and Leopart).")
    parser.add_argument("--batch_size", default=32, type=int,
                        help="Images per batch and per process (default: 32; the CrOC paper gives no value).")
    parser.add_argument("--num_workers", default=4, type=int, help="Data loading workers per process.")
    parser.add_argument("--seed", default=0, type=int,
                        help="Seed of the --random_init backbone; eval_linear: also of the head init, shuffling "
                             "and augmentation; eval_kmeans: also of the PCA's pixel subsample (k-means: --seeds).")
    parser.add_argument("--output_dir", default=None, type=str,
                        help="Where config.json and results.json are written (default: output/<script name>).")
    parser.add_argument("--device", default=None, type=str,
                        help="Device of a single-process run (default: cuda if available, else cpu); under "
                             "torchrun every process uses its local GPU.")
    return parser


def check_feature_size(args):
    if args.img_size % args.patch_size:
        raise ValueError(f"--img_size {args.img_size} is not a multiple of --patch_size {args.patch_size}")


def print_config(args):
    print("\n".join(f"{k}: {v}" for k, v in sorted(vars(args).items())), flush=True)


def write_json(path, obj):
    with open(path, "w") as f:
        json.dump(obj, f, indent=2)


def loader(dataset, args, shuffle=False, sampler=None):
    return DataLoader(dataset, batch_size=args.batch_size, shuffle=shuffle and sampler is None, sampler=sampler,
                      num_workers=args.num_workers, pin_memory=torch.cuda.is_available(), drop_last=False,
                      persistent_workers=False)


def shard(dataset, rank, world_size):
    """Every world_size-th image starting at rank: disjoint shards that cover the split exactly once (unlike
    DistributedSampler, which pads with repeated images and would count them twice in the pooled metric)."""
    return dataset if world_size == 1 else Subset(dataset, range(rank, len(dataset), world_size))


# ----------------------------------------------------------------------------------------------------------------
# Linear probe (E.2)

def get_args_parser():
    parser = argparse.ArgumentParser("Linear segmentation probe on frozen dense features (CrOC App. C, spec E.2)",
                                     add_help=False)
    add_backbone_args(parser)
    parser.set_defaults(output_dir="output/eval_linear")
    parser.add_argument("--train_split", default=None, type=str,
                        help="Training split (default: trainaug for pvoc, as CrOC and Leopart; train otherwise: "
                             "CrOC trains on the full COCO train2017, Leopart on a random 10%%).")
    parser.add_argument("--epochs", default=None, type=int,
                        help="Training epochs (default: 45 for pvoc and 10 for coco_things/coco_stuff, the CrOC "
                             "paper; 10 for ade20k, not given in the paper; 5 for synthetic. Leopart: 25).")
    parser.add_argument("--lr", default=1e-3, type=float,
                        help="Adam learning rate, constant (default: 1e-3, CrOC paper; Leopart uses SGD 0.01 "
                             "with momentum and a step schedule).")
    parser.add_argument("--train_mask_size", default=100, type=int,
                        help="Logits are upsampled and masks nearest-resized to this size for the training loss "
                             "(default: 100, Leopart). The final mIoU is computed at --img_size (448, Leopart's "
                             "eval script).")
    parser.add_argument("--cache_train_features", action="store_true",
                        help="Compute the train features once, without augmentation (resize only), and train "
                             "the head on that cache: much faster, but not the protocol (default: off, a fresh "
                             "RandomResizedCrop + flip every epoch as Leopart). The cache holds N x nD x h x w "
                             "float16 values in CPU memory.")
    return parser


def resolve_defaults(args):
    if args.train_split is None:
        args.train_split = DEFAULT_TRAIN_SPLIT.get(args.dataset, "train")
    if args.epochs is None:
        args.epochs = DEFAULT_EPOCHS[args.dataset]
    return args


def train_one_epoch(features, head, batches, optimizer, args, device, epoch, main):
    """One pass over (x, mask) batches, features(x) -> (B, nD, h, w); returns the epoch's mean pixel CE."""
    total = torch.zeros((), dtype=torch.float64, device=device)
    n_pix = torch.zeros((), dtype=torch.int64, device=device)
    for x, mask in tqdm(batches, desc=f"epoch {epoch + 1}/{args.epochs}", disable=not main, leave=False):
        x, mask = x.to(device, non_blocking=True), mask.to(device, non_blocking=True).long()  # mask (B, m, m)
        feats = features(x)  # (B, nD, h, w)
        # A.3: head(upsample(F)) == upsample(head(F)) because bilinear weights sum to 1; run the head at (h, w)
        logits = F.interpolate(head(feats), size=mask.shape[-2:], mode="bilinear", align_corners=False)
        n_valid = (mask != 255).sum()
        # sum / max(n, 1): a batch that is all 255 gives loss 0 instead of the NaN of the default 'mean'
        loss_sum = F.cross_entropy(logits, mask, ignore_index=255, reduction="sum")
        loss = loss_sum / n_valid.clamp(min=1)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        total += loss_sum.detach()
        n_pix += n_valid
    stats = torch.stack([total, n_pix.double()])
    if dist.is_initialized():
        dist.all_reduce(stats)
    return (stats[0] / stats[1].clamp(min=1)).item()


@torch.no_grad()
def cache_features(backbone, data, args, device, main):
    """One augmentation-free pass: (N, nD, h, w) float16 features and (N, m, m) uint8 masks on the CPU."""
    feats, masks = [], []
    for img, mask in tqdm(data, desc="caching train features", disable=not main):
        feats.append(dense_features(backbone, img.to(device), args.n_last_blocks).half().cpu())
        masks.append(mask)
    return torch.cat(feats), torch.cat(masks)


class CachedBatches:
    """Shuffled (features, masks) batches of the train-feature cache; a fresh order on every iteration."""

    def __init__(self, feats, masks, batch_size, generator):
        self.feats, self.masks, self.batch_size, self.generator = feats, masks, batch_size, generator

    def __len__(self):
        return -(-len(self.feats) // self.batch_size)

    def __iter__(self):
        order = torch.randperm(len(self.feats), generator=self.generator)
        for i in range(0, len(order), self.batch_size):
            idx = order[i:i + self.batch_size]
            yield self.feats[idx], self.masks[idx]


@torch.no_grad()
def evaluate(backbone, head, data, num_classes, args, device, main):
    """Pooled (C, C) confusion matrix over the whole split at the val mask resolution (A.4 final eval, A.5)."""
    confusion = torch.zeros(num_classes, num_classes, dtype=torch.int64, device=device)
    for img, mask in tqdm(data, desc="evaluating", disable=not main):
        img, mask = img.to(device, non_blocking=True), mask.to(device, non_blocking=True)
        logits = head(dense_features(backbone, img, args.n_last_blocks))  # (B, C, h, w)
        logits = F.interpolate(logits, size=mask.shape[-2:], mode="bilinear", align_corners=False)
        confusion += confusion_matrix(logits.argmax(1), mask, num_classes)
    if dist.is_initialized():
        dist.all_reduce(confusion)
    return confusion.cpu()


def main(args):
    rank, world_size, _, device = init_distributed()
    main_process = rank == 0
    if args.device is not None and world_size == 1:
        device = torch.device(args.device)
    resolve_defaults(args)
    check_feature_size(args)
    if main_process:
        print_config(args)
        os.makedirs(args.output_dir, exist_ok=True)
        write_json(os.path.join(args.output_dir, "config.json"), vars(args))

    # datasets first: a bad layout fails before any model work
    train_set = build_segmentation_dataset(args.dataset, args.data_path, args.train_split)
    val_set = build_segmentation_dataset(args.dataset, args.data_path, args.val_split)
    num_classes, class_names = val_set.num_classes, list(val_set.class_names)

    torch.manual_seed(args.seed)  # same on every rank: identical random-init backbones and heads
    backbone = backbone_from_args(args).to(device)
    n_dim = args.n_last_blocks * backbone.embed_dim
    head = nn.Conv2d(n_dim, num_classes, kernel_size=1).to(device)  # A.3: per-pixel linear layer with bias
    if world_size > 1:
        head = DistributedDataParallel(head, device_ids=[device.index] if device.type == "cuda" else None)
    optimizer = torch.optim.Adam(head.parameters(), lr=args.lr)  # E.2: Adam, constant lr
    torch.manual_seed(args.seed + rank)  # different augmentations on every rank

    if args.cache_train_features:
        sampler = DistributedSampler(train_set, shuffle=False) if world_size > 1 else None  # equal step counts
        plain = Transformed(train_set, ValTransform(args.img_size, args.train_mask_size))
        feats, masks = cache_features(backbone, loader(plain, args, sampler=sampler), args, device, main_process)
        batches = CachedBatches(feats, masks, args.batch_size, torch.Generator().manual_seed(args.seed + rank))
        features = torch.Tensor.float
    else:
        data = Transformed(train_set, TrainTransform(args.img_size, args.train_mask_size))
        sampler = DistributedSampler(data, shuffle=True, seed=args.seed) if world_size > 1 else None
        batches = loader(data, args, shuffle=True, sampler=sampler)
        features = partial(dense_features, backbone, n_last_blocks=args.n_last_blocks)

    start = time.time()
    for epoch in range(args.epochs):
        head.train()
        if sampler is not None:
            sampler.set_epoch(epoch)
        loss = train_one_epoch(features, head, batches, optimizer, args, device, epoch, main_process)
        if main_process:
            print(f"epoch {epoch + 1}/{args.epochs}  train loss {loss:.4f}  ({time.time() - start:.0f} s)", flush=True)
            with open(os.path.join(args.output_dir, "log.txt"), "a") as f:
                f.write(json.dumps({"epoch": epoch + 1, "train_loss": loss}) + "\n")

    head = head.module if world_size > 1 else head
    head.eval()
    val_data = Transformed(shard(val_set, rank, world_size), ValTransform(args.img_size))
    confusion = evaluate(backbone, head, loader(val_data, args), num_classes, args, device, main_process)
    miou_value, iou = miou(confusion)

    results = {
        "miou": miou_value,
        "per_class_iou": dict(zip(class_names, iou.tolist())),
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
        "n_valid_pixels": int(confusion.sum()),
        "eval_size": args.img_size,
        "epochs": args.epochs,
    }
    if main_process:
        print(format_iou_table(class_names, iou, miou_value))
        print(f"linear probe mIoU on {args.dataset} {args.val_split} ({len(val_set)} images): "
              f"{100 * miou_value:.2f}")
        write_json(os.path.join(args.output_dir, "results.json"), results)
        torch.save(head.state_dict(), os.path.join(args.output_dir, "linear_head.pth"))
    if dist.is_initialized():
        dist.destroy_process_group()
    return results


if __name__ == "__main__":
    parser = argparse.ArgumentParser(parents=[get_args_parser()])
    main(parser.parse_args())
