"""DAVIS-2017 semi-supervised video object segmentation by label propagation (App. C, Table A1).

The protocol is DINO's `eval_video_segmentation.py` (App. C: n_last_frames 7, size_mask_neighborhood 12, topk 5)
and the metrics are those of the official `davis2017-evaluation` tool (`davis2017/metrics.py`, `utils.py`,
`evaluation.py`), computed here. Our scores go to <output_dir>/scores/ in the official CSV format; the result
folder itself holds only the PNGs (and config.json), so the official tool, which echoes any
global_results-<set>.csv it finds in --results_path ("Using precomputed results...") instead of computing,
really re-scores them:
    python evaluation_method.py --task semi-supervised --results_path <output_dir> --davis_path <DAVIS>
Stale CSVs that an earlier run of the official tool left in <output_dir> are deleted at the start.

Per video: every frame goes through the frozen ViT at short side 480 (long side floored to a multiple of 64); the
first frame's labels are propagated frame by frame with a k-NN over the first frame and the last 7 frames
(affinity exp(cos / 0.1), +-12 patch neighbourhood, top-5 jointly over all context frames, soft labels in the
queue), then upsampled, `norm_mask`-ed, argmax-ed and written as indexed PNGs at the original size.

Differences from DINO's script (none changes the algorithm):
  * frames are decoded with Pillow and resized with torch's bilinear interpolation (align_corners=False, no
    antialias, rounded back to uint8), which is the same sampling as `cv2.resize`'s default INTER_LINEAR; cv2's
    fixed-point arithmetic and its JPEG decoder can differ from these by one grey level on a few pixels;
  * square frames: DINO's frame and mask rules disagree on them; one rule (the frame rule: landscape
    unless H > W) is used for both here. No DAVIS frame is square;
  * 255 (void) in a first-frame annotation is mapped to background before one-hot encoding (DINO would give it
    a channel), and frame 0 is written as that cleaned ground truth;
  * the neighbourhood mask is built with tensor ops instead of Python loops (same mask);
  * the palette is the first annotation's own (any palette works: the evaluator reads indices).
Kept from DINO on purpose: std (0.228, 0.224, 0.225) (0.228 is DINO's, inherited from UVC), tau = 0.1, the strict
"< k-th value" top-k cut, norm_mask before the argmax, and PIL NEAREST for both mask resizes.

Usage (DAVIS-2017 val, ViT-S/16 teacher of a CrOC checkpoint):
    python eval_davis.py --data_path /path/to/DAVIS --weights checkpoint.pth --arch vit_small --patch_size 16 \
        --output_dir out/davis
"""
import argparse
import csv
import math
import os
import sys
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from einops import rearrange
from PIL import Image
from scipy import ndimage
from tqdm import tqdm

import metrics
from data import (VOC_PALETTE, InputError, MissingInput, cli, image_header, load_rgb, need, read_mask,
                  save_palette_png)
from model import add_backbone_args, backbone_from_args, dense_features, resolve_backbone_args

# DINO's DAVIS script normalises with std 0.228 (not ImageNet's 0.229), inherited from UVC.
DAVIS_MEAN = (0.485, 0.456, 0.406)
DAVIS_STD = (0.228, 0.224, 0.225)
TEMPERATURE = 0.1  # hard-coded in DINO's label_propagation
LONG_SIDE_MULTIPLE = 64  # DINO's read_frame: the long side is floored to a multiple of 64
SCORES_DIR = "scores"  # our CSVs: beside the PNGs, never among them
GLOBAL_COLUMNS = ["J&F-Mean", "J-Mean", "J-Recall", "J-Decay", "F-Mean", "F-Recall", "F-Decay"]


# ----------------------------------------------------------------------------------------------------------------
# Official metrics (davis2017-evaluation `davis2017/metrics.py`, `utils.py`)
# ----------------------------------------------------------------------------------------------------------------

def _as_frames(pred, gt):
    pred, gt = np.asarray(pred).astype(bool), np.asarray(gt).astype(bool)
    if pred.shape != gt.shape:
        raise ValueError(f"prediction {pred.shape} and ground truth {gt.shape} shapes differ")
    if pred.ndim != 3:
        raise ValueError(f"expected boolean masks of shape (T, H, W), got {pred.shape}")
    return pred, gt


def region_similarity(pred, gt):
    """J (db_eval_iou): per-frame |P & G| / |P | G|, and 1 when both masks are empty. (T, H, W) bool -> (T,)."""
    pred, gt = _as_frames(pred, gt)
    inter = (pred & gt).sum(axis=(-2, -1))
    union = (pred | gt).sum(axis=(-2, -1))
    return np.where(union == 0, 1.0, inter / np.maximum(union, 1))


def seg2bmap(seg):
    """1-pixel-wide boundary of a binary mask (H, W), offset half a pixel towards the origin (_seg2bmap).

    b = (S xor E) | (S xor S_south) | (S xor SE) with zeros shifted in; the last row compares only east, the last
    column only south, the bottom-right pixel is 0, so a mask touching the image border has no boundary there.
    """
    seg = np.asarray(seg).astype(bool)
    e, s, se = np.zeros_like(seg), np.zeros_like(seg), np.zeros_like(seg)
    e[:, :-1] = seg[:, 1:]
    s[:-1, :] = seg[1:, :]
    se[:-1, :-1] = seg[1:, 1:]
    b = (seg ^ e) | (seg ^ s) | (seg ^ se)
    b[-1, :] = seg[-1, :] ^ e[-1, :]
    b[:, -1] = seg[:, -1] ^ s[:, -1]
    b[-1, -1] = False
    return b


def disk(radius):
    """skimage.morphology.disk: the (2r+1)^2 binary kernel x^2 + y^2 <= r^2."""
    grid = np.arange(-radius, radius + 1)
    x, y = np.meshgrid(grid, grid)
    return x ** 2 + y ** 2 <= radius ** 2


def boundary_radius(height, width, bound_th=0.008):
    """Tolerance in pixels: ceil(bound_th * image diagonal); bound_th >= 1 is already a number of pixels."""
    if bound_th >= 1:
        if bound_th != int(bound_th):
            raise ValueError(f"bound_th >= 1 is a radius in pixels and must be an integer, got {bound_th}")
        return int(bound_th)
    return int(math.ceil(bound_th * np.linalg.norm((height, width))))


def _dilate(boundary, structure):
    """cv2.dilate(boundary, disk) on a binary map, computed on the boundary's bounding box grown by the radius.

    The crop is exact: outside it the dilation is 0, and clipping at the image border equals cv2's and scipy's
    zero border.
    """
    rows, cols = np.nonzero(boundary)
    r = structure.shape[0] // 2
    r0, r1 = max(rows.min() - r, 0), min(rows.max() + r + 1, boundary.shape[0])
    c0, c1 = max(cols.min() - r, 0), min(cols.max() + r + 1, boundary.shape[1])
    out = np.zeros_like(boundary)
    out[r0:r1, c0:c1] = ndimage.binary_dilation(boundary[r0:r1, c0:c1], structure=structure)
    return out


def _f_measure(pred, gt, structure):
    pred_b, gt_b = seg2bmap(pred), seg2bmap(gt)
    n_fg, n_gt = int(pred_b.sum()), int(gt_b.sum())
    # f_measure's empty-mask cases: the counts are of boundary pixels, not of mask pixels.
    if n_fg == 0 and n_gt > 0:
        precision, recall = 1.0, 0.0
    elif n_fg > 0 and n_gt == 0:
        precision, recall = 0.0, 1.0
    elif n_fg == 0 and n_gt == 0:
        precision, recall = 1.0, 1.0
    else:
        precision = (pred_b & _dilate(gt_b, structure)).sum() / n_fg
        recall = (gt_b & _dilate(pred_b, structure)).sum() / n_gt
    if precision + recall == 0:
        return 0.0
    return 2 * precision * recall / (precision + recall)


def contour_accuracy(pred, gt, bound_th=0.008):
    """F (db_eval_boundary): per-frame boundary F-measure with a disk tolerance. (T, H, W) bool -> (T,)."""
    pred, gt = _as_frames(pred, gt)
    structure = disk(boundary_radius(*pred.shape[1:], bound_th=bound_th))
    return np.array([_f_measure(p, g, structure) for p, g in zip(pred, gt)], dtype=np.float64)


def per_object_statistics(values):
    """db_statistics: (mean, recall = fraction > 0.5, decay) of one object's per-frame J or F values.

    Decay splits the frames into 4 bins with edges round(linspace(1, N, 5) + 1e-10) - 1; bin i is
    values[ids[i] : ids[i+1] + 1] (neighbouring bins share a frame) and decay = mean(bin 0) - mean(bin 3).
    The official code casts the edges to uint8, which only matters beyond 256 frames; we do the same.
    """
    values = np.asarray(values, dtype=np.float64)
    mean = float(np.nanmean(values))
    recall = float(np.nanmean(values > 0.5))
    ids = (np.round(np.linspace(1, len(values), 5) + 1e-10) - 1).astype(np.uint8)
    bins = [values[ids[i]:ids[i + 1] + 1] for i in range(4)]
    decay = float(np.nanmean(bins[0]) - np.nanmean(bins[3]))
    return mean, recall, decay


def evaluate_sequence(gt, res, name="sequence", bound_th=0.008):
    """J and F of one sequence, as DAVISEvaluation._evaluate_semisupervised.

    gt, res: (T, H, W) integer label maps over ALL frames (ground truth with 255 already set to 0, predictions).
    Objects are 1..max id of the first GT frame; frames 0 and T-1 are not scored; a prediction with fewer objects
    is zero-padded, one with more is an error (the official tool exits).
    Returns J, F: (n_objects, T - 2) arrays.
    """
    gt, res = np.asarray(gt), np.asarray(res)
    if gt.shape != res.shape:
        raise ValueError(f"{name}: predictions {res.shape} and ground truth {gt.shape} shapes differ")
    n_obj = int(gt[0].max())
    gt, res = gt[1:-1], res[1:-1]
    n_pred = int(res.max()) if res.size else 0
    if n_pred > n_obj:
        raise ValueError(f"{name}: a predicted PNG holds id {n_pred} but the first annotation has only {n_obj} "
                         f"objects (the official evaluator stops here)")
    j = np.zeros((n_obj, len(gt)))
    f = np.zeros((n_obj, len(gt)))
    for k in range(1, n_obj + 1):
        j[k - 1] = region_similarity(res == k, gt == k)
        f[k - 1] = contour_accuracy(res == k, gt == k, bound_th=bound_th)
    return j, f


def summarize(per_object):
    """Global table of evaluation_method.py: statistics per object, then averaged over ALL objects of the set.

    per_object: list of (name '<seq>_<k>', J values (T-2,), F values (T-2,)). Returns (global dict, rows).
    """
    if not per_object:
        raise InputError("no object to evaluate: the first annotations hold no object id")
    j_stats = np.array([per_object_statistics(j) for _, j, _ in per_object])  # (n_objects, 3): M, R, D
    f_stats = np.array([per_object_statistics(f) for _, _, f in per_object])
    j_mean, f_mean = j_stats.mean(axis=0), f_stats.mean(axis=0)
    values = [(j_mean[0] + f_mean[0]) / 2, *j_mean, *f_mean]
    rows = [(name, js[0], fs[0]) for (name, _, _), js, fs in zip(per_object, j_stats, f_stats)]
    return dict(zip(GLOBAL_COLUMNS, (float(v) for v in values))), rows


def _fmt(value):
    # pandas' to_csv(float_format="%.3f") as in evaluation_method.py; NaN is written as an empty field
    return "" if np.isnan(value) else "%.3f" % value


def official_csvs(folder):
    """The CSVs that evaluation_method.py would read back from a results folder instead of computing."""
    folder = Path(folder)
    return sorted([*folder.glob("global_results-*.csv"), *folder.glob("per-sequence_results-*.csv")])


def write_results_csv(output_dir, set_name, global_results, rows):
    """global_results-<set>.csv and per-sequence_results-<set>.csv, byte-for-byte in the official format, in
    output_dir (the script passes <results folder>/scores: never the folder the official tool scores)."""
    Path(output_dir).mkdir(parents=True, exist_ok=True)
    paths = (Path(output_dir) / f"global_results-{set_name}.csv",
             Path(output_dir) / f"per-sequence_results-{set_name}.csv")
    with open(paths[0], "w", newline="") as fh:
        writer = csv.writer(fh, lineterminator="\n")
        writer.writerow(GLOBAL_COLUMNS)
        writer.writerow([_fmt(global_results[c]) for c in GLOBAL_COLUMNS])
    with open(paths[1], "w", newline="") as fh:
        writer = csv.writer(fh, lineterminator="\n")
        writer.writerow(["Sequence", "J-Mean", "F-Mean"])
        for name, j, f in rows:
            writer.writerow([name, _fmt(j), _fmt(f)])
    return paths


def format_table(global_results, rows, set_name):
    header = " ".join(f"{c:>9}" for c in GLOBAL_COLUMNS)
    line = " ".join(f"{global_results[c]:>9.3f}" for c in GLOBAL_COLUMNS)
    width = max([len(r[0]) for r in rows] + [8])
    seq = [f"{'Sequence':>{width}}    J-Mean    F-Mean"]
    seq += [f"{name:>{width}} {j:>9.3f} {f:>9.3f}" for name, j, f in rows]
    return (f"--------------------------- Global results for {set_name} ---------------------------\n"
            f"{header}\n{line}\n\n---------- Per sequence results for {set_name} ----------\n" + "\n".join(seq))


# ----------------------------------------------------------------------------------------------------------------
# DAVIS-2017 layout (davis2017/davis.py): JPEGImages/480p/<seq>/*.jpg, Annotations/480p/<seq>/*.png,
# ImageSets/2017/<set>.txt
# ----------------------------------------------------------------------------------------------------------------

@dataclass
class Sequence:
    name: str
    frames: list  # paths of the JPEGs, sorted
    annotations: list  # paths of the PNGs, same stems as the frames
    size: tuple  # (W, H) of every frame and annotation


def davis_root(data_path):
    """The DAVIS folder itself, or a folder holding DAVIS/ (as data.write_synthetic writes it)."""
    root = Path(data_path)
    if not (root / "ImageSets").is_dir() and (root / "DAVIS" / "ImageSets").is_dir():
        root = root / "DAVIS"
    return root


def load_davis_index(data_path, set_name="val", seqs=None):
    """Lists and checks every sequence before any model work; a problem raises InputError naming the file."""
    root = davis_root(data_path)
    list_file = root / "ImageSets" / "2017" / f"{set_name}.txt"
    if not list_file.is_file():
        raise MissingInput(f"{list_file}: sequence list not found (is --data_path the DAVIS folder holding "
                           f"JPEGImages/, Annotations/ and ImageSets/?)")
    names = [line.strip() for line in list_file.read_text().splitlines() if line.strip()]
    if seqs:
        missing = [s for s in seqs if s not in names]
        if missing:
            raise InputError(f"{list_file}: --seqs {missing} are not in this list")
        names = [n for n in names if n in seqs]
    if not names:
        raise InputError(f"{list_file}: no sequence to evaluate")
    index = []
    for name in names:
        frame_dir = root / "JPEGImages" / "480p" / name
        ann_dir = root / "Annotations" / "480p" / name
        frames = sorted(frame_dir.glob("*.jpg")) if frame_dir.is_dir() else []
        if not frames:
            raise MissingInput(f"{frame_dir}: sequence folder missing or without .jpg frames (listed in "
                               f"{list_file})")
        first_ann = ann_dir / (frames[0].stem + ".png")
        if not first_ann.is_file():
            raise MissingInput(f"{first_ann}: first-frame annotation missing")
        anns = sorted(ann_dir.glob("*.png"))
        if len(anns) != len(frames):
            raise MissingInput(f"{ann_dir}: {len(anns)} annotations for {len(frames)} frames in {frame_dir}; "
                               f"J and F need the annotation of every frame")
        for frame, ann in zip(frames, anns):
            if frame.stem != ann.stem:
                raise InputError(f"{ann}: annotation name does not match frame {frame.name}")
        if len(frames) < 3:
            raise InputError(f"{frame_dir}: {len(frames)} frames; frames 0 and T-1 are not scored, so at least 3 "
                             f"are needed")
        size, _ = image_header(frames[0], "frame")
        for path in frames + anns:
            path_size, mode = image_header(path, "annotation" if path.suffix == ".png" else "frame")
            if path_size != size:
                raise InputError(f"{path}: size {path_size} differs from {frames[0]} {size}")
            if path.suffix == ".png" and mode not in ("P", "L"):
                raise InputError(f"{path}: annotation has mode {mode!r}; DAVIS annotations are indexed "
                                 f"(palette, mode 'P') PNGs whose pixel values are object ids")
        index.append(Sequence(name, frames, anns, size))
    return index


def working_size(width, height, short_side=480):
    """(th, tw) of DINO's read_frame: short side = short_side, long side floored to a multiple of 64.

    One rule for frames and masks (DINO's frame rule, so a square frame is treated as landscape).
    """
    if height > width:
        tw, th = short_side, int((short_side * height / width) // LONG_SIDE_MULTIPLE * LONG_SIDE_MULTIPLE)
    else:
        th, tw = short_side, int((short_side * width / height) // LONG_SIDE_MULTIPLE * LONG_SIDE_MULTIPLE)
    if min(th, tw) <= 0:
        raise InputError(f"--short_side {short_side} on a {width}x{height} frame floors the long side to 0 "
                         f"(it is a multiple of {LONG_SIDE_MULTIPLE})")
    return th, tw


def read_frame(path, size):
    """(3, th, tw) normalised frame (DINO's read_frame). Bilinear as cv2.resize: align_corners=False, no antialias,
    result rounded to uint8 like cv2 on a uint8 image."""
    x = torch.from_numpy(np.array(load_rgb(path))).float()  # InputError naming a truncated or corrupt frame
    x = rearrange(x, "h w c -> 1 c h w")
    if tuple(x.shape[-2:]) != tuple(size):
        x = F.interpolate(x, size=size, mode="bilinear", align_corners=False, antialias=False)
        x = x.round().clamp(0, 255)
    x = x[0] / 255.0
    mean = torch.tensor(DAVIS_MEAN).view(3, 1, 1)
    std = torch.tensor(DAVIS_STD).view(3, 1, 1)
    return (x - mean) / std


def first_frame_labels(ann, size, patch_size):
    """One-hot (C, h, w) at patch resolution from the ORIGINAL annotation (DINO's read_seg + to_one_hot).

    PIL NEAREST straight to the patch grid; C = max label of the downsampled mask + 1. 255 is background here.
    """
    th, tw = size
    ann = np.where(ann == 255, 0, ann).astype(np.uint8)
    small = np.array(Image.fromarray(ann).resize((tw // patch_size, th // patch_size), Image.NEAREST))
    small = torch.from_numpy(small).long()
    return rearrange(F.one_hot(small, int(small.max()) + 1).float(), "h w c -> c h w")


# ----------------------------------------------------------------------------------------------------------------
# Label propagation (DINO's eval_video_segmentation.py)
# ----------------------------------------------------------------------------------------------------------------

def neighbourhood_mask(h, w, radius, device=None):
    """(hw, hw) bool: target q may read source s iff |drow| <= radius and |dcol| <= radius on the patch grid."""
    idx = torch.arange(h * w, device=device)
    rows, cols = idx // w, idx % w
    return ((rows[:, None] - rows[None, :]).abs() <= radius) & ((cols[:, None] - cols[None, :]).abs() <= radius)


def label_propagation(feat_tar, ctx_feats, ctx_labels, mask=None, topk=5, temperature=TEMPERATURE):
    """One target frame from its context (DINO's label_propagation).

    feat_tar (D, h, w); ctx_feats (n, D, h, w) unnormalised; ctx_labels (n, C, h, w) -> soft labels (C, h, w).
    mask: (hw, hw) bool neighbourhood or None (no restriction).
    """
    h, w = feat_tar.shape[-2:]
    tar = F.normalize(rearrange(feat_tar, "d h w -> d (h w)"), dim=0)  # (D, q)
    src = F.normalize(rearrange(ctx_feats, "n d h w -> n (h w) d"), dim=2)  # (n, s, D)
    # in-place from here: for p = 8 on DAVIS the affinity is 8 x 6240 x 6240 floats (1.25 GB)
    aff = torch.matmul(src, tar).div_(temperature).exp_()  # (n, s, q): exp(cos / tau)
    if mask is not None:
        aff.masked_fill_(~mask.T, 0.0)  # mask is (q, s)
    aff = rearrange(aff, "n s q -> (n s) q")  # every context frame's sources stacked: top-k is joint
    kth = torch.topk(aff, k=min(topk, aff.shape[0]), dim=0).values.min(dim=0).values  # (q,) k-th largest
    aff.masked_fill_(aff < kth, 0.0)  # strict cut: ties at the k-th value are kept
    aff.div_(aff.sum(dim=0, keepdim=True))
    labels = rearrange(ctx_labels, "n c h w -> c (n h w)")  # same (n s) order as the affinity rows
    return rearrange(labels @ aff, "c (h w) -> c h w", h=h, w=w)


def iter_propagate(feats, first_labels, n_last_frames=7, size_mask_neighborhood=12, topk=5,
                   temperature=TEMPERATURE):
    """Generator form of `propagate`: feats is any iterable of (D, h, w) tensors (frame 0 first); yields the
    (C, h, w) soft labels of each frame as soon as its features arrive."""
    feats = iter(feats)
    first_feat = next(feats)
    first_labels = first_labels.to(first_feat.device, torch.float32)
    if tuple(first_labels.shape[-2:]) != tuple(first_feat.shape[-2:]):
        raise ValueError(f"first labels {tuple(first_labels.shape)} and features {tuple(first_feat.shape)} "
                         f"are not on the same patch grid")
    yield first_labels
    h, w = first_feat.shape[-2:]
    mask = None
    if size_mask_neighborhood > 0:  # built once per video
        mask = neighbourhood_mask(h, w, size_mask_neighborhood, device=first_feat.device)
    queue = []  # FIFO of (features, soft labels) of the last n_last_frames frames; frame 0 is never queued
    for feat in feats:
        ctx_feats = torch.stack([first_feat] + [f for f, _ in queue])
        ctx_labels = torch.stack([first_labels] + [lab for _, lab in queue])
        labels = label_propagation(feat, ctx_feats, ctx_labels, mask, topk=topk, temperature=temperature)
        if len(queue) == n_last_frames:
            queue.pop(0)
        if n_last_frames > 0:
            queue.append((feat, labels))
        yield labels


def propagate(feats, first_labels, n_last_frames=7, size_mask_neighborhood=12, topk=5, temperature=TEMPERATURE):
    """Label propagation of one video (DINO's eval_video_segmentation), without files.

    feats (T, D, h, w) per-frame features (any scale: they are L2-normalised here); first_labels (C, h, w)
    one-hot or soft labels of frame 0 at patch resolution. Returns soft labels (T, C, h, w), frame 0 = first_labels.
    Context of frame t = frame 0 + the last n_last_frames frames; affinity exp(cos / temperature) restricted to
    |drow|, |dcol| <= size_mask_neighborhood (<= 0: no restriction); top-k over all context frames jointly.
    """
    return torch.stack(list(iter_propagate(feats, first_labels, n_last_frames, size_mask_neighborhood, topk,
                                           temperature)))


def norm_mask(mask):
    """DINO's norm_mask, vectorised: each channel (C, H, W) with max > 0 is min-max rescaled to [0, 1].

    As in DINO, a constant positive channel becomes NaN (0 / 0) and then wins torch.max, exactly as there.
    """
    lo = mask.amin(dim=(1, 2), keepdim=True)
    hi = mask.amax(dim=(1, 2), keepdim=True)
    shifted = mask - lo
    scaled = shifted / shifted.amax(dim=(1, 2), keepdim=True)
    return torch.where(hi > 0, scaled, mask)


def labels_to_mask(soft, patch_size, size_wh):
    """Soft labels (C, h, w) -> label map (H, W) uint8 at the original size (DINO's output steps)."""
    up = F.interpolate(soft[None], scale_factor=patch_size, mode="bilinear", align_corners=False,
                       recompute_scale_factor=False)[0]  # (C, th, tw)
    seg = torch.max(norm_mask(up), dim=0).indices.to(torch.uint8).cpu().numpy()
    return np.array(Image.fromarray(seg).resize(size_wh, Image.NEAREST))


# ----------------------------------------------------------------------------------------------------------------
# Script
# ----------------------------------------------------------------------------------------------------------------

def iter_features(backbone, frames, size, n_last_blocks, device, frames_per_forward=1):
    """(D, h, w) features of each frame, frames_per_forward frames per ViT forward."""
    for start in range(0, len(frames), frames_per_forward):
        x = torch.stack([read_frame(p, size) for p in frames[start:start + frames_per_forward]]).to(device)
        yield from dense_features(backbone, x, n_last_blocks=n_last_blocks)  # (B, n*D, h, w)


@torch.no_grad()
def segment_video(backbone, seq, args, device):
    """Propagates the first annotation of `seq` and writes one indexed PNG per frame in output_dir/<seq>/."""
    out_dir = Path(args.output_dir) / seq.name
    out_dir.mkdir(parents=True, exist_ok=True)
    with Image.open(seq.annotations[0]) as img:
        palette = img.getpalette() if img.mode == "P" else None
    palette = palette or VOC_PALETTE
    first = read_mask(seq.annotations[0])
    first = np.where(first == 255, 0, first).astype(np.uint8)
    size = working_size(*seq.size, short_side=args.short_side)
    first_labels = first_frame_labels(first, size, args.patch_size)
    feats = iter_features(backbone, seq.frames, size, args.n_last_blocks, device, args.frames_per_forward)
    soft = iter_propagate(feats, first_labels, args.n_last_frames, args.size_mask_neighborhood, args.topk)
    for t, (frame, labels) in enumerate(zip(seq.frames, tqdm(soft, total=len(seq.frames), desc=seq.name,
                                                                leave=False))):
        seg = first if t == 0 else labels_to_mask(labels, args.patch_size, seq.size)
        save_palette_png(seg, out_dir / f"{frame.stem}.png", palette)


def evaluate_results(index, results_dir, bound_th=0.008):
    """Reads output PNGs as the official tool does and scores them. Returns (global dict, per-object rows)."""
    per_object = []
    for seq in tqdm(index, desc="J&F", leave=False):
        gt = np.stack([read_mask(p) for p in seq.annotations])
        gt[gt == 255] = 0
        res = []
        for ann in seq.annotations:
            path = Path(results_dir) / seq.name / ann.name
            if not path.is_file():
                raise ValueError(f"{path}: result PNG missing")
            res.append(read_mask(path))
        j, f = evaluate_sequence(gt, np.stack(res), name=seq.name, bound_th=bound_th)
        per_object += [(f"{seq.name}_{k + 1}", j[k], f[k]) for k in range(len(j))]
    return summarize(per_object)


def get_args_parser():
    parser = argparse.ArgumentParser(description="DAVIS-2017 video object segmentation by label propagation")
    parser.add_argument("--data_path", default="/path/to/DAVIS", type=str,
                        help="DAVIS folder holding JPEGImages/480p, Annotations/480p and ImageSets/2017 (or a "
                             "folder holding DAVIS/, as data.py --write-synthetic writes it)")
    parser.add_argument("--set", default="val", type=str, help="ImageSets/2017/<set>.txt; the paper reports val")
    parser.add_argument("--seqs", nargs="+", default=None, help="only these sequences of the set")
    parser.add_argument("--output_dir", default=".", type=str,
                        help="results folder: <seq>/<frame>.png, config.json and results.json (the PNGs are what the "
                             "official evaluator's --results_path reads); our two CSV files go to scores/ in it")
    add_backbone_args(parser)
    parser.add_argument("--n_last_blocks", default=1, type=int,
                        help="concatenate the last n blocks (each through the final norm); DINO's script uses 1")
    parser.add_argument("--n_last_frames", default=7, type=int,
                        help="preceding frames in the context besides the first (paper and DINO: 7)")
    parser.add_argument("--size_mask_neighborhood", default=12, type=int,
                        help="sources restricted to |drow|, |dcol| <= this on the patch grid; 0 = no restriction "
                             "(paper and DINO: 12)")
    parser.add_argument("--topk", default=5, type=int,
                        help="neighbours kept over all context frames jointly (paper and DINO: 5)")
    parser.add_argument("--short_side", default=480, type=int,
                        help="frames resized to this short side, long side floored to a multiple of 64 (DINO: 480;"
                             " smaller only for small synthetic videos); must be a multiple of the patch size")
    parser.add_argument("--frames_per_forward", default=1, type=int,
                        help="frames per ViT forward (speed only; DINO uses 1)")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu", type=str)
    parser.add_argument("--seed", default=0, type=int, help="seed of --random_init's weights")
    return parser


def check_args(args):
    """The range of every numeric flag (InputError naming it), before any work."""
    resolve_backbone_args(args)  # --arch and --patch_size: the checkpoint's unless given
    need(args.patch_size >= 1 and LONG_SIDE_MULTIPLE % args.patch_size == 0, args, "patch_size",
         f"must divide {LONG_SIDE_MULTIPLE} (DINO floors the long side to a multiple of {LONG_SIDE_MULTIPLE})")
    need(args.short_side >= 1 and args.short_side % args.patch_size == 0, args, "short_side",
         f"must be a positive multiple of --patch_size {args.patch_size}")
    need(args.n_last_blocks >= 1, args, "n_last_blocks", "must be at least 1")
    need(args.n_last_frames >= 0, args, "n_last_frames", "must be >= 0")
    need(args.size_mask_neighborhood >= 0, args, "size_mask_neighborhood", "must be >= 0 (0: no restriction)")
    need(args.topk >= 1, args, "topk", "must be at least 1")
    need(args.frames_per_forward >= 1, args, "frames_per_forward", "must be at least 1")
    return args


def main(args):
    check_args(args)
    metrics.print_config(args)
    index = load_davis_index(args.data_path, args.set, args.seqs)  # every input check before the model
    device = torch.device(args.device)
    torch.manual_seed(args.seed)
    backbone = backbone_from_args(args).to(device)

    # only once the inputs are checked: a failed rerun leaves the old folder as it was
    os.makedirs(args.output_dir, exist_ok=True)
    for stale in official_csvs(args.output_dir):  # the official tool would echo them instead of re-scoring
        print(f"removing {stale}: a results CSV in the PNG folder stops evaluation_method.py from re-scoring")
        stale.unlink()
    metrics.write_json(os.path.join(args.output_dir, "config.json"), vars(args))
    for seq in tqdm(index, desc="videos"):
        segment_video(backbone, seq, args, device)

    global_results, rows = evaluate_results(index, args.output_dir)
    write_results_csv(Path(args.output_dir) / SCORES_DIR, args.set, global_results, rows)
    metrics.write_json(os.path.join(args.output_dir, "results.json"),  # not read by the official tool
                       {**global_results, "set": args.set, "n_objects": len(rows), "weights": args.weights,
                        "per_object": {name: {"J-Mean": j, "F-Mean": f} for name, j, f in rows}})
    print(format_table(global_results, rows, args.set))
    sys.stdout.flush()
    return global_results


if __name__ == "__main__":
    cli(main, get_args_parser(), check=check_args)
