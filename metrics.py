"""What the evaluation scripts share: the metrics, the feature passes and the plumbing. A hub, like model.py and
data.py: eval_linear.py, eval_kmeans.py and eval_davis.py import it and never each other.

Sections
  1. Metrics: pooled confusion matrix and mIoU (Leopart `experiments/utils.py` PredsmIoU), Hungarian matching
     (K = C) and many-to-one matching for over-clustering (K > C), the check that something was scored
  2. Features: the last n_b blocks for several n_b from one forward pass
  3. Pictures: image / ground truth / prediction strips in the dataset's colours
  4. Plumbing: the backbone flags, config printing, JSON, loaders, torchrun, a table over several runs

    python metrics.py table out/lin_pvoc out/lin_things out/km_pvoc     # one table from several results.json
"""
import argparse
import json
import os
import warnings

import numpy as np
import torch
from einops import rearrange
from PIL import Image
from scipy.optimize import linear_sum_assignment
from torch.utils.data import DataLoader, Subset

from data import (IGNORE_INDEX, IMAGENET_MEAN, IMAGENET_STD, VOC_PALETTE, InputError, MissingInput, cli, need,
                  raw_mask_values, save_atomic)
import model
from model import dense_features

IGNORED_SHARE_WARNING = 0.9  # warn when more than this share of the scored pixels is "ignore"


# ----------------------------------------------------------------------------------------------------------------
# 1. Metrics
# ----------------------------------------------------------------------------------------------------------------

def count_pairs(pred, gt, n_gt, n_pred, ignore_index=IGNORE_INDEX):
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


def confusion_matrix(pred, gt, num_classes, ignore_index=IGNORE_INDEX):
    """(C, C) int64 M[g, p] = #pixels with ground truth g predicted as p, over pixels where gt != ignore_index.

    pred and gt may have any (equal) number of elements. Labels outside 0..C-1 on a valid pixel raise ValueError
    (in pred as well as in gt); pred is free on ignored pixels."""
    return count_pairs(pred, gt, num_classes, num_classes, ignore_index)


def miou(confusion):
    """(mean IoU, per-class IoU (C,) float64) from a dataset-pooled (C, C) confusion matrix M[g, p].

    IoU_c = M[c,c] / max(sum_p M[c,p] + sum_g M[g,c] - M[c,c], 1e-8) over the pixels of the whole split (Leopart's
    PredsmIoU); the mean is over all C classes, so a class absent from both ground truth and prediction has IoU 0
    and still counts."""
    confusion = confusion.double()
    tp = confusion.diagonal()
    union = confusion.sum(1) + confusion.sum(0) - tp
    iou = tp / union.clamp(min=1e-8)
    return iou.mean().item(), iou


def relabel(counts, mapping):
    """(C, C) confusion of the prediction whose cluster k is renamed class mapping[k], from (C, K) counts."""
    num_classes = counts.shape[0]
    return torch.zeros(num_classes, num_classes, dtype=torch.float64).index_add_(1, mapping, counts.double().cpu())


def match_clusters(counts):
    """Hungarian matching on pooled (C, K) counts M[c, k] (K >= C), as Leopart's PredsmIoU (App. C: "a label is
    greedily assigned to each cluster with Hungarian matching").

    S[c, k] = IoU(gt == c, pred == k) = M[c,k] / max(row_c + col_k - M[c,k], 1e-8);
    linear_sum_assignment(1 - S) maximises the summed IoU; unmatched clusters (K > C) become class 0.
    Returns (mIoU, per-class IoU (C,) float64, mapping (K,) int64 cluster -> class)."""
    counts = counts.double().cpu()
    union = counts.sum(1, keepdim=True) + counts.sum(0, keepdim=True) - counts
    score = counts / union.clamp(min=1e-8)  # (C, K)
    rows, cols = linear_sum_assignment(1 - score.numpy())
    mapping = torch.zeros(counts.shape[1], dtype=torch.long)
    mapping[torch.as_tensor(cols)] = torch.as_tensor(rows, dtype=torch.long)
    miou_value, iou = miou(relabel(counts, mapping))
    return miou_value, iou, mapping


def match_many_to_one(counts):
    """Over-clustering (K > C): each cluster goes to the class it is most precise for, precision = M[c,k] /
    max(sum_c M[c,k], 1e-8) (Leopart's sup_overcluster, precision_based=True); several clusters may share a
    class, ties go to the lowest class id. Returns (mIoU, per-class IoU (C,), mapping (K,) cluster -> class)."""
    counts = counts.double().cpu()
    precision = counts / counts.sum(0, keepdim=True).clamp(min=1e-8)  # (C, K)
    mapping = precision.argmax(0)
    miou_value, iou = miou(relabel(counts, mapping))
    return miou_value, iou, mapping


def hungarian_miou(pred, gt, num_classes, ignore_index=IGNORE_INDEX, num_clusters=None):
    """(mIoU, per-class IoU (C,), mapping (K,) cluster -> class) of cluster ids pred against labels gt, pooled over
    every pixel given (any equal shapes) except gt == ignore_index. K = num_clusters (default num_classes) must be
    >= num_classes; cluster ids outside 0..K-1 on valid pixels raise ValueError."""
    num_clusters = num_classes if num_clusters is None else num_clusters
    if num_clusters < num_classes:
        raise InputError(f"num_clusters={num_clusters} < num_classes={num_classes}: Hungarian matching needs K >= C")
    return match_clusters(count_pairs(pred, gt, num_classes, num_clusters, ignore_index))


def check_scored_pixels(n_valid, n_total, dataset, what="evaluation"):
    """Fail when nothing can be scored, warn when most pixels are "ignore".

    Mask values outside the class range become 255 through the dataset's lookup table: a wrong --dataset or a
    colour-coded mask would otherwise give mIoU 0 and exit 0. `dataset` is a SegmentationDataset (its name and
    files are reported)."""
    name = getattr(dataset, "name", str(dataset))
    if n_total == 0 or n_valid == 0:
        found = raw_mask_values(dataset)
        raise InputError(
            f"{name}: no pixel to score in the {what}: all {n_total} mask pixels are 'ignore' ({IGNORE_INDEX}) "
            f"after the label map, which keeps classes 0..{dataset.num_classes - 1} only. {found}. "
            f"Check --dataset and the mask folder (masks must hold class ids, not colours).")
    share = 1 - n_valid / n_total
    if share > IGNORED_SHARE_WARNING:
        warnings.warn(f"{name}: {100 * share:.1f}% of the {n_total} mask pixels of the {what} are 'ignore' "
                      f"({IGNORE_INDEX}); only {n_valid} are scored. {raw_mask_values(dataset)}", stacklevel=2)
    return share


def format_iou_table(class_names, iou, miou_value):
    width = max(len(n) for n in class_names) + 2
    lines = [f"{'class':<{width}} IoU (%)"]
    lines += [f"{name:<{width}} {100 * v:6.2f}" for name, v in zip(class_names, iou.tolist())]
    lines.append(f"{'mean':<{width}} {100 * miou_value:6.2f}")
    return "\n".join(lines)


# ----------------------------------------------------------------------------------------------------------------
# 2. Features
# ----------------------------------------------------------------------------------------------------------------

def multi_block_features(backbone, images, n_blocks):
    """{n: (B, n*D, h, w)} for every n in n_blocks from ONE forward pass: the last max(n) blocks are computed once
    and the last n of them concatenated (the channels of block L-n+1 .. L), as separate calls would give."""
    feats = dense_features(backbone, images, max(n_blocks))  # (B, max_n*D, h, w), blocks in depth order
    dim = feats.shape[1] // max(n_blocks)
    return {n: feats[:, feats.shape[1] - n * dim:] for n in n_blocks}


def last_blocks(feats, n, embed_dim):
    """The channels of the last n blocks of a (B, m*D, ...) multi-block feature tensor (m >= n)."""
    return feats[:, feats.shape[1] - n * embed_dim:]


# ----------------------------------------------------------------------------------------------------------------
# 3. Pictures
# ----------------------------------------------------------------------------------------------------------------

def colorize(labels, palette=None):
    """(H, W) class ids -> (H, W, 3) uint8 with the dataset's palette (default the VOC colour map, whose entry
    255 is the VOC boundary colour)."""
    pal = np.asarray(palette if palette is not None else VOC_PALETTE, dtype=np.uint8).reshape(-1, 3)
    return pal[np.asarray(labels, dtype=np.uint8)]


def denormalize(image):
    """(3, H, W) ImageNet-normalised tensor -> (H, W, 3) uint8."""
    mean, std = torch.tensor(IMAGENET_MEAN).view(3, 1, 1), torch.tensor(IMAGENET_STD).view(3, 1, 1)
    rgb = (image.detach().float().cpu() * std + mean).clamp(0, 1)
    return (rearrange(rgb, "c h w -> h w c") * 255).round().byte().numpy()


def save_prediction_pictures(path, rows, palette=None):
    """One PNG: a row per example of [image | ground truth | prediction], all at the prediction's size.

    rows: (image (H, W, 3) uint8, gt (H, W), pred (H, W)) triples; images of another size are resized (bilinear)
    and masks must already have the prediction's size."""
    strips = []
    for image, gt, pred in rows:
        h, w = np.asarray(pred).shape
        if image.shape[:2] != (h, w):
            image = np.asarray(Image.fromarray(image).resize((w, h), Image.BILINEAR))
        strips.append(np.concatenate([image, colorize(gt, palette), colorize(pred, palette)], axis=1))
    width = max(s.shape[1] for s in strips)
    strips = [np.pad(s, ((0, 0), (0, width - s.shape[1]), (0, 0)), constant_values=255) for s in strips]
    Image.fromarray(np.concatenate(strips, axis=0)).save(path)
    return path


# ----------------------------------------------------------------------------------------------------------------
# 4. Plumbing
# ----------------------------------------------------------------------------------------------------------------

DATASETS = ("pvoc", "coco_things", "coco_stuff", "ade20k", "synthetic")


def add_backbone_args(parser):
    """Arguments shared by eval_linear.py and eval_kmeans.py: dataset, backbone, feature extraction, output."""
    parser.add_argument("--dataset", default="pvoc", choices=DATASETS,
                        help="pvoc (21 classes incl. background), coco_things (12), coco_stuff (15), ade20k (150), "
                             "synthetic (data.py's scenes: in memory without --data_path, else the folder that "
                             "`python data.py --write-synthetic DIR` writes).")
    parser.add_argument("--data_path", default=None, type=str,
                        help="Dataset root (see data.py for the layouts and its prepare_* commands). Optional only "
                             "for --dataset synthetic.")
    parser.add_argument("--val_split", default="val", type=str, help="Evaluation split (default: val).")
    parser.add_argument("--ignore_unknown_labels", action="store_true",
                        help="Score mask pixels whose raw value is outside the dataset's ids (pvoc 0..20, "
                             "coco_things 0..200, coco_stuff 0..183, ade20k 0..150, synthetic 0..3; 255 is always "
                             "ignore) as ignore. Default: refuse them, naming the values, their pixel counts and the "
                             "first masks holding them; a wrong --dataset or a damaged mask folder would otherwise "
                             "give an mIoU over fewer pixels without a word.")
    model.add_backbone_args(parser)
    parser.add_argument("--n_last_blocks", default=[4], type=int, nargs="+",
                        help="Concatenate the patch tokens of the last n_b blocks, each through the final LayerNorm "
                             "(App. C). The paper never gives n_b: 4 is DINO's advice for ViT-S linear probes, "
                             "Leopart uses 1. Several values (e.g. 1 4) are evaluated from one feature pass and "
                             "each is reported (default: 4).")
    parser.add_argument("--img_size", default=448, type=int,
                        help="Images are resized to img_size x img_size (default: 448, App. C and Leopart).")
    parser.add_argument("--batch_size", default=32, type=int,
                        help="Images per batch and per process (default: 32; eval_linear --protocol mmseg: 16, "
                             "App. C's ADE20K batch; the paper gives no other batch size).")
    parser.add_argument("--num_workers", default=4, type=int, help="Data loading workers per process.")
    parser.add_argument("--seed", default=0, type=int,
                        help="Seed of the --random_init backbone; eval_linear: also of the head init, shuffling "
                             "and augmentation; eval_kmeans: also of the PCA's pixel subsample (k-means: --seeds).")
    parser.add_argument("--n_pictures", default=4, type=int,
                        help="Val images drawn as image / ground truth / prediction in predictions*.png (0: none).")
    parser.add_argument("--output_dir", default=None, type=str,
                        help="Where config.json, results.json and the pictures go (default: output/<script name>).")
    parser.add_argument("--device", default=None, type=str,
                        help="Device of a single-process run (default: cuda if available, else cpu); under "
                             "torchrun every process uses its local GPU.")
    return parser


def check_backbone_args(args):
    """The ranges of add_backbone_args' numeric flags, checked before any work (data.cli's check), once --arch and
    --patch_size are the checkpoint's unless given."""
    model.resolve_backbone_args(args)
    need(args.patch_size >= 1, args, "patch_size", "must be at least 1")
    need(args.img_size >= 1 and args.img_size % args.patch_size == 0, args, "img_size",
         f"must be a positive multiple of --patch_size {args.patch_size}")
    need(min(args.n_last_blocks) >= 1, args, "n_last_blocks", "every value must be at least 1")
    need(args.batch_size is None or args.batch_size >= 1, args, "batch_size", "must be at least 1")
    need(args.num_workers >= 0, args, "num_workers", "must be >= 0")
    need(args.n_pictures >= 0, args, "n_pictures", "must be >= 0 (0: no pictures)")


def check_feature_size(args):
    check_backbone_args(args)
    args.n_last_blocks = sorted(set(args.n_last_blocks))


def print_config(args):
    print("\n".join(f"{k}: {v}" for k, v in sorted(vars(args).items())), flush=True)


def write_json(path, obj):
    """Atomically (data.save_atomic): a failed or killed run leaves the old file whole (e.g. the config.json that
    describes the results beside it) or the new one."""
    save_atomic(json.dumps(obj, indent=2).encode(), path)


def loader(dataset, args, shuffle=False, sampler=None, batch_size=None, worker_init_fn=None):
    return DataLoader(dataset, batch_size=batch_size or args.batch_size, shuffle=shuffle and sampler is None,
                      sampler=sampler, num_workers=args.num_workers, pin_memory=torch.cuda.is_available(),
                      drop_last=False, persistent_workers=False, worker_init_fn=worker_init_fn)


def shard(dataset, rank, world_size):
    """Every world_size-th image starting at rank: disjoint shards that cover the split exactly once (unlike
    DistributedSampler, which pads with repeated images and would count them twice in the pooled metric)."""
    return dataset if world_size == 1 else Subset(dataset, range(rank, len(dataset), world_size))


def combined_table(result_paths):
    """One text table over several runs: a row per results.json (a folder or the file itself), the mIoU of every
    (n_b, lr) run of a linear probe or every n_b of a k-means run, and the J&F of a DAVIS run."""
    lines = [f"{'run':<28} {'script':<7} {'dataset':<12} {'setting':<18} {'mIoU / J&F (%)':>15}"]
    for path in result_paths:
        path = os.path.join(path, "results.json") if os.path.isdir(path) else path
        try:
            with open(path) as f:
                res = json.load(f)
        except FileNotFoundError as e:
            raise MissingInput(f"{path} does not exist") from e
        except (OSError, ValueError) as e:
            raise InputError(f"{path} is not a readable results.json: {type(e).__name__}: {e}") from e
        run = os.path.basename(os.path.dirname(os.path.abspath(path)))[:28]
        if "J&F-Mean" in res:
            lines.append(f"{run:<28} {'davis':<7} {'davis2017':<12} {'':<18} {100 * res['J&F-Mean']:>15.2f}")
            continue
        script = "kmeans" if "miou_mean" in res else "linear"
        for name, r in res.get("runs", {}).items():
            value = f"{100 * r['miou_mean']:.2f} +- {100 * r['miou_std']:.2f}" if script == "kmeans" \
                else f"{100 * r['miou']:.2f}"
            best = " *" if name == res.get("best_run") and len(res["runs"]) > 1 else ""
            lines.append(f"{run:<28} {script:<7} {res['dataset']:<12} {name + best:<18} {value:>15}")
    return "\n".join(lines)


def get_args_parser():
    parser = argparse.ArgumentParser(description="Evaluation helpers")
    sub = parser.add_subparsers(dest="command", required=True)
    table = sub.add_parser("table", help="print one table over several results.json (or their folders)")
    table.add_argument("results", nargs="+")
    return parser


def main(args):
    if args.command == "table":
        print(combined_table(args.results), flush=True)


if __name__ == "__main__":
    cli(main, get_args_parser())
