"""Pictures of what CrOC's clusterer finds (Fig. 3 and Fig. A1): clusters over the joint views, per head, the merge
sequence from K_start down to 2 with its transport costs, and the CLS attention.

    python visualize.py --random_init --arch vit_tiny --patch_size 8 --img_size 64 --synthetic_index 3
    python visualize.py --weights out/checkpoint.pth --image photo.jpg --output clusters.png

Model, view and clustering settings default to those stored in the checkpoint (train.py writes its args there),
then to the paper's (`default_setting`: clustering.cluster's own defaults for the clustering); a flag given on the
command line wins. The views are drawn with TwoViews' geometry and photometry, as in training (Fig. A1 shows
augmented views too), and the clustering is training's `clustering.cluster_views`, so the picture shows exactly what the dense loss sees. The same inputs and --seed give
the same PNG, byte for byte. `train.py --visualize_every N` runs `visualize.py --weights CHECKPOINT
--training_images 4` on rank 0: the same fixed batch of training images every time.

Layout, one block per image:
  header:    original image with both crop boxes | view 1 | view 2 | legend
  per head:  clusters on view 1 | view 2 | CLS attention on view 1 | view 2 | merge steps K = K_start .. 2
Clusters are coloured by name (the first initial seed they hold: `clustering.step_labels`), so a colour follows
a cluster through the merges; a cluster seen in one view only (pruned, Eq. 16) is grey and hatched; the
selected K (smallest d_c, Sec. 3.3) is boxed in red, steps with K > k_max (never selectable) have grey captions.
"""
import argparse
import colorsys
import inspect
import json
import math
import os

import numpy as np
import torch
import torch.nn.functional as F
from einops import rearrange
from PIL import Image, ImageDraw, ImageFont

import clustering
import data
from model import (IMAGENET_MEAN, IMAGENET_STD, add_backbone_args, bool_flag, load_backbone, local_weights,
                   read_checkpoint, resolve_backbone_args, stored_args)

# --------------------------------------------------------------------------------------------------------------
# Layout (pixels). tile: side of a view panel; a merge step shows view 1 above view 2 at tile / 2 each.
# --------------------------------------------------------------------------------------------------------------
MARGIN = 8  # around the figure
GAP = 6  # between panels, and between a block's rows
LINE = 12  # one line of text
CAPTION = 2 * LINE  # the two caption lines above each row of panels
SECTION = 2 * GAP  # extra space before the merge sequence and between image blocks
TITLE = 3 * LINE  # the figure's title lines

BACKGROUND = (255, 255, 255)
TEXT, MUTED, SELECTED = (20, 20, 20), (150, 150, 150), (220, 30, 30)
BOX_COLOURS = ((230, 40, 40), (40, 90, 240))  # crop boxes of view 1 and view 2
PRUNED = np.array([150, 150, 150], dtype=np.float64)
# 20 distinct colours (Kelly's list without black/white); names beyond 20 get golden-angle hues
PALETTE = [(255, 179, 0), (128, 62, 117), (255, 104, 0), (166, 189, 215), (193, 0, 32), (206, 162, 98),
           (0, 125, 52), (246, 118, 142), (0, 83, 138), (255, 122, 92), (83, 55, 122), (255, 142, 0),
           (179, 40, 81), (244, 200, 0), (127, 24, 13), (147, 170, 0), (89, 51, 21), (241, 58, 19),
           (35, 44, 22), (0, 161, 194)]
INFERNO = np.array([(0, 0, 4), (40, 11, 84), (101, 21, 110), (159, 42, 99), (212, 72, 66), (245, 125, 21),
                    (250, 193, 39), (252, 255, 164)], dtype=np.float64)  # anchors of matplotlib's inferno


def figure_size(n_images, n_heads, n_steps, tile):
    """(width, height) of `draw_figure`'s picture: B image blocks of a header row and one row per head."""
    width = 2 * MARGIN + 4 * tile + 3 * GAP + SECTION + n_steps * (tile // 2) + (n_steps - 1) * GAP
    block = CAPTION + tile + n_heads * (GAP + CAPTION + tile)
    height = 2 * MARGIN + TITLE + n_images * block + (n_images - 1) * SECTION
    return width, height


def cluster_colours(n):
    """(n, 3) float RGB, one per cluster name."""
    extra = [tuple(round(255 * c) for c in colorsys.hsv_to_rgb((0.618034 * i) % 1.0, 0.75, 0.9))
             for i in range(max(0, n - len(PALETTE)))]
    return np.array((PALETTE + extra)[:n], dtype=np.float64)


# --------------------------------------------------------------------------------------------------------------
# What is drawn: one teacher pass, the joint clustering of every head with its merge steps, the CLS attention
# --------------------------------------------------------------------------------------------------------------
@torch.no_grad()
def compute(backbone, views, positions, args, seed=0):
    """Everything the figure shows, as numpy arrays on the CPU.

    views: (B, 2, 3, S, S) normalised, as TwoViews gives; positions: (B, 2, N, 2) in original-image pixels.
    Returns a dict: labels (B, H, k_start - 1, 2, h, w) cluster names per merge step (K = k_start .. 2) and view;
    cost (B, H, k_start - 1) d_c (Eq. 13); k (B, H) the selected K; attention (B, H, 2, h, w) the last block's
    CLS attention (the mean over heads when the clustered tokens are not per head, `--which_features last`);
    images (B, 2, S, S, 3) uint8 un-normalised views; positions (B, 2, N, 2).
    """
    device = next(backbone.parameters()).device
    views, positions = views.to(device), positions.to(device)
    B = views.shape[0]
    x = rearrange(views, "b v c s t -> (v b) c s t")  # view 1 then view 2, as in train_step
    f = backbone.forward_features(x, which=args.which_features)
    generator = torch.Generator(device=device).manual_seed(seed)
    _, _, res = clustering.cluster_views(f.tokens, positions, args, generator, return_steps=True)
    H, (h, w) = f.tokens.shape[1], f.grid
    labels = rearrange(res.steps, "(b hd) s (v h w) -> b hd s v h w", b=B, v=2, h=h, w=w)
    attention = backbone.get_last_selfattention(x)[:, :, 0, 1:]  # (2B, heads, N): row 0 = the CLS token's
    attention = rearrange(attention, "(v b) hd (h w) -> b hd v h w", v=2, h=h, w=w)
    if attention.shape[1] != H:
        attention = attention.mean(dim=1, keepdim=True)
    mean = torch.tensor(IMAGENET_MEAN, device=device).view(1, 1, 3, 1, 1)
    std = torch.tensor(IMAGENET_STD, device=device).view(1, 1, 3, 1, 1)
    images = ((views * std + mean).clamp(0, 1) * 255).round().to(torch.uint8)
    return {"labels": labels.cpu().numpy(), "cost": rearrange(res.d_c, "(b hd) s -> b hd s", b=B).cpu().numpy(),
            "k": rearrange(res.k, "(b hd) -> b hd", b=B).cpu().numpy(),
            "attention": attention.float().cpu().numpy(),
            "images": rearrange(images, "b v c s t -> b v s t c").cpu().numpy(), "positions": positions.cpu().numpy()}


def kept_names(labels, k_start):
    """(k_start,) bool: the names with a token in both views (Eq. 16). labels: (2, h, w) names of one step."""
    present = [np.bincount(view.ravel(), minlength=k_start) > 0 for view in labels]
    return present[0] & present[1]


# --------------------------------------------------------------------------------------------------------------
# Panels: (size, size, 3) uint8 arrays
# --------------------------------------------------------------------------------------------------------------
def resize(image, size):
    return np.asarray(Image.fromarray(image).resize((size, size), Image.BICUBIC))


def cluster_panel(image, labels, kept, colours, size):
    """The view blended with its clusters' colours, cluster borders dark, pruned clusters grey and hatched.

    image: (S, S, 3) uint8; labels: (h, w) names; kept: (k_start,) bool; colours: (k_start, 3).
    """
    names = np.asarray(Image.fromarray(labels.astype(np.uint8)).resize((size, size), Image.NEAREST))
    rgb = resize(image, size).astype(np.float64)
    pruned = ~kept[names]
    colour = np.where(pruned[..., None], PRUNED, colours[names])
    out = 0.45 * rgb + 0.55 * colour
    yy, xx = np.mgrid[0:size, 0:size]
    out[pruned & ((xx + yy) % 6 < 2)] *= 0.5  # hatching
    border = np.zeros((size, size), dtype=bool)
    border[:, 1:] |= names[:, 1:] != names[:, :-1]
    border[1:, :] |= names[1:, :] != names[:-1, :]
    out[border] *= 0.25
    return out.round().astype(np.uint8)


def attention_panel(image, attention, size):
    """The CLS attention (h, w), min-max scaled and upsampled bilinearly, in inferno over a faint grey view."""
    a = torch.from_numpy(attention)[None, None].double()
    a = F.interpolate(a, size=(size, size), mode="bilinear", align_corners=False)[0, 0].numpy()
    a = (a - a.min()) / max(a.max() - a.min(), 1e-12)
    t = a * (len(INFERNO) - 1)
    i = np.minimum(t.astype(np.int64), len(INFERNO) - 2)
    heat = INFERNO[i] + (t - i)[..., None] * (INFERNO[i + 1] - INFERNO[i])
    grey = resize(image, size).astype(np.float64).mean(axis=-1, keepdims=True)
    return (0.8 * heat + 0.2 * grey).round().astype(np.uint8)


def crop_box(positions, patch_size, img_size):
    """(left, top, right, bottom) in original pixels of the crop whose patch centres are positions (N, 2)."""
    g = img_size // patch_size
    xy = positions.reshape(g, g, 2)
    x0, x1 = xy[..., 0].min(), xy[..., 0].max()
    y0, y1 = xy[..., 1].min(), xy[..., 1].max()
    half_x = (x1 - x0) / (g - 1) / 2 if g > 1 else 0.0  # half a patch: centres are one patch apart
    half_y = (y1 - y0) / (g - 1) / 2 if g > 1 else 0.0
    return x0 - half_x, y0 - half_y, x1 + half_x, y1 + half_y


def is_flipped(positions, patch_size, img_size):
    g = img_size // patch_size
    return g > 1 and positions[1, 0] < positions[0, 0]  # x decreases along the first row


def original_panel(original, positions, patch_size, img_size, size):
    """The original image letterboxed into size x size, with the crop boxes of view 1 (red) and view 2 (blue)."""
    panel = Image.new("RGB", (size, size), BACKGROUND)
    scale = size / max(original.size)
    w, h = max(1, round(original.width * scale)), max(1, round(original.height * scale))
    ox, oy = (size - w) // 2, (size - h) // 2
    panel.paste(original.resize((w, h), Image.BICUBIC), (ox, oy))
    draw = ImageDraw.Draw(panel)
    for pos, colour in zip(positions, BOX_COLOURS):
        left, top, right, bottom = crop_box(pos, patch_size, img_size)
        draw.rectangle([ox + left * scale, oy + top * scale, ox + right * scale - 1, oy + bottom * scale - 1],
                       outline=colour, width=2)
    return panel


# --------------------------------------------------------------------------------------------------------------
# The figure
# --------------------------------------------------------------------------------------------------------------
def draw_figure(c, args, tile=128, originals=None, title=""):
    """PIL image of the dict `compute` returns; originals: optional list of B PIL images (for the crop boxes)."""
    if tile % 2 or tile < 32:
        raise ValueError(f"tile must be an even number of pixels >= 32, got {tile}")
    B, H, n_steps = c["labels"].shape[:3]
    k_start, k_max = n_steps + 1, args.k_max or n_steps + 1
    colours = cluster_colours(k_start)
    small = tile // 2
    fig = Image.new("RGB", figure_size(B, H, n_steps, tile), BACKGROUND)
    draw = ImageDraw.Draw(fig)
    font = ImageFont.load_default()
    patch_size = args.patch_size
    img_size = c["images"].shape[2]
    per_head = c["attention"].shape[1] == H

    draw.text((MARGIN, MARGIN), f"{title + ': ' if title else ''}{args.arch}/{patch_size} at {img_size} px, "
              f"tokens '{args.which_features}', K_start {k_start}, K_max {k_max}, lambda_pos {args.lambda_pos}, "
              f"Sinkhorn lambda {args.sinkhorn_lambda} x {args.sinkhorn_iterations}", fill=TEXT, font=font)
    draw.text((MARGIN, MARGIN + LINE), "colour = cluster, named by its first seed (kept through the merges)",
              fill=TEXT, font=font)
    draw.text((MARGIN, MARGIN + 2 * LINE), "grey hatched = pruned, in one view only (Eq. 16); red = selected K, "
              "smallest d_c (Eq. 13)", fill=TEXT, font=font)
    x_merge = MARGIN + 4 * tile + 3 * GAP + SECTION
    y = MARGIN + TITLE
    for b in range(B):
        # header: original with crop boxes, the two views, a summary
        pos = c["positions"][b]
        x = MARGIN
        if originals is not None:
            draw.text((x, y), "original, crops:", fill=TEXT, font=font)
            draw.text((x, y + LINE), "view 1 red, view 2 blue", fill=TEXT, font=font)
            fig.paste(original_panel(originals[b], pos, patch_size, img_size, tile), (x, y + CAPTION))
        for v in range(2):
            x = MARGIN + (1 + v) * (tile + GAP)
            flip = " (flipped)" if is_flipped(pos[v], patch_size, img_size) else ""
            draw.text((x, y + LINE), f"view {v + 1}{flip}", fill=TEXT, font=font)
            fig.paste(Image.fromarray(resize(c["images"][b, v], tile)), (x, y + CAPTION))
        summary = [f"image {b}: selected K and kept clusters (both views) per head"]
        for hd in range(H):
            step = k_start - c["k"][b, hd]
            kept = kept_names(c["labels"][b, hd, step], k_start).sum()
            summary.append(f"  head {hd}: K = {c['k'][b, hd]}, kept {kept}, d_c = {c['cost'][b, hd, step]:.4f}")
        x = MARGIN + 3 * (tile + GAP) + SECTION
        for i, line in enumerate(summary[: (CAPTION + tile) // LINE]):
            draw.text((x, y + i * LINE), line, fill=TEXT, font=font)
        y += CAPTION + tile

        for hd in range(H):
            y += GAP
            labels, costs, k = c["labels"][b, hd], c["cost"][b, hd], c["k"][b, hd]
            selected = k_start - k
            kept = kept_names(labels[selected], k_start)
            head = f"head {hd}" if H > 1 else "all heads"
            draw.text((MARGIN, y), f"{head}: K = {k}, kept {kept.sum()}", fill=TEXT, font=font)
            draw.text((MARGIN, y + LINE), "clusters, views 1 | 2", fill=TEXT, font=font)
            draw.text((MARGIN + 2 * (tile + GAP), y), f"CLS attention{f' head {hd}' if per_head else ', mean'}",
                      fill=TEXT, font=font)
            draw.text((MARGIN + 2 * (tile + GAP), y + LINE), "views 1 | 2", fill=TEXT, font=font)
            for v in range(2):
                image = c["images"][b, v]
                fig.paste(Image.fromarray(cluster_panel(image, labels[selected, v], kept, colours, tile)),
                          (MARGIN + v * (tile + GAP), y + CAPTION))
                attention = c["attention"][b, hd if per_head else 0, v]
                fig.paste(Image.fromarray(attention_panel(image, attention, tile)),
                          (MARGIN + (2 + v) * (tile + GAP), y + CAPTION))
            for s in range(n_steps):  # Fig. 3: K = k_start .. 2
                x = x_merge + s * (small + GAP)
                K = k_start - s
                colour = SELECTED if s == selected else (MUTED if K > k_max else TEXT)
                draw.text((x, y), f"K = {K}", fill=colour, font=font)
                draw.text((x, y + LINE), f"d_c {costs[s]:.4f}", fill=colour, font=font)
                step_kept = kept_names(labels[s], k_start)
                for v in range(2):
                    panel = cluster_panel(c["images"][b, v], labels[s, v], step_kept, colours, small)
                    fig.paste(Image.fromarray(panel), (x, y + CAPTION + v * small))
                draw.line([x, y + CAPTION + small, x + small - 1, y + CAPTION + small], fill=BACKGROUND)  # v1 | v2
                if s == selected:
                    draw.rectangle([x - 2, y + CAPTION - 2, x + small + 1, y + CAPTION + tile + 1], outline=SELECTED,
                                   width=2)
            y += CAPTION + tile
        y += SECTION
    return fig


@torch.no_grad()
def render_clusters(backbone, views, positions, args, path=None, originals=None, *, seed=0, tile=128, title=""):
    """Draw the clusters, merge steps and CLS attention of `backbone` (the teacher's) for a batch of view pairs.

    views: (B, 2, 3, S, S) normalised; positions: (B, 2, N, 2) in original pixels (as TwoViews / the loader give);
    args: needs arch, patch_size, which_features and the clustering flags of train.py (k_start, k_max, lambda_pos,
    sinkhorn_lambda, sinkhorn_iterations, marginal_temp, uniform_marginals). originals: optional B PIL images, for
    the crop boxes. Saves a PNG to path when given; returns (the PIL image, the `compute` dict).
    """
    c = compute(backbone, views, positions, args, seed)
    fig = draw_figure(c, args, tile, originals, title)
    if path:
        fig.save(path)
    return fig, c


def original_images(dataset, n):
    """The first n readable (index, PIL RGB) of a pretraining dataset (SyntheticPretrain or PretrainImages)."""
    out = []
    for i in range(len(dataset)):
        if len(out) == n:
            break
        if hasattr(dataset, "scenes"):
            out.append(dataset.scenes[i][0])
            continue
        try:
            out.append(data.load_rgb(dataset.files[i]))
        except Exception:  # PretrainImages skips unreadable files too (and warns about them in training)
            continue
    return out


def fixed_batch(dataset, n=4, seed=0):
    """(views (B, 2, 3, S, S), positions (B, 2, N, 2), originals) of the first n images of a pretraining dataset,
    cropped once by its TwoViews transform with torch seed `seed`; the global RNG is restored afterwards, so that
    drawing the batch changes nothing in training."""
    originals = original_images(dataset, n)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        pairs = [dataset.transform(img) for img in originals]
    return torch.stack([v for v, _ in pairs]), torch.stack([p for _, p in pairs]), originals


# --------------------------------------------------------------------------------------------------------------
# Command line
# --------------------------------------------------------------------------------------------------------------
# None on the command line: the checkpoint's, then below
FROM_TRAINING = ("arch", "patch_size", "img_size", "which_features", "global_crops_scale", "synthetic_size",
                 "synthetic_grey") + clustering.CLUSTER_SETTINGS
# Without a checkpoint: the paper's model and views (train.py's defaults; a test keeps the two equal), and
# clustering.cluster's own defaults for the clustering.
VIEW_DEFAULTS = {"arch": "vit_small", "patch_size": 16, "img_size": 224, "which_features": "v",
                 "global_crops_scale": (0.25, 1.0), "synthetic_size": 128, "synthetic_grey": False}


def default_setting(name):
    if name in VIEW_DEFAULTS:
        return VIEW_DEFAULTS[name]
    return inspect.signature(clustering.cluster).parameters[name].default


# --------------------------------------------------------------------------------------------------------------
# Training curves from log.txt (one JSON line per epoch), Pillow only
# --------------------------------------------------------------------------------------------------------------
# (title, [(log key, label)], reference) per panel; reference: a config key whose log is drawn dashed (uniform
# collapse: the teacher's entropy reaches log(out_dim)).
CURVE_PANELS = [
    ("losses", [("loss", "loss"), ("loss_glob", "loss_glob (Eq. 6)"), ("loss_dense", "loss_dense (Eq. 4)")], None),
    ("teacher entropy, image head", [("teacher_entropy", "H(P_t)")], "out_dim"),
    ("teacher entropy, centroid head", [("teacher_entropy_c", "H(P_t), centroids")], "out_dim_c"),
    ("selected K (mean)", [("mean_k", "mean K")], None),
    ("kept centroids per image", [("kept_centroids", "kept (Eq. 16)")], None),
    ("share of images with no centroid", [("share_images_no_centroid", "no centroid")], None),
    ("dense quality (--eval_every)", [("eval_kmeans_miou", "k-means mIoU (%)")], None),
]
PANEL_W, PANEL_H, PLOT_PAD = 420, 230, 44


def read_log(path):
    """The JSON lines of a train.py log.txt -> list of dicts, with an error naming the file and line."""
    records = []
    with open(path) as f:
        for number, line in enumerate(f, 1):
            if line.strip():
                try:
                    records.append(json.loads(line))
                except json.JSONDecodeError as e:
                    raise data.InputError(f"{path}, line {number}: not a JSON line of train.py's log ({e})") from e
    if not records:
        raise data.InputError(f"{path}: no epoch logged yet")
    return records


def draw_panel(draw, x0, y0, title, series, reference, font):
    """One line plot: series [(label, xs, ys)], an optional dashed horizontal reference (label, value)."""
    draw.text((x0 + PLOT_PAD, y0 + 2), title, fill=TEXT, font=font)
    left, top, right, bottom = x0 + PLOT_PAD, y0 + 2 * LINE, x0 + PANEL_W - GAP, y0 + PANEL_H - 2 * LINE
    draw.rectangle([left, top, right, bottom], outline=MUTED)
    points = [(x, y) for _, xs, ys in series for x, y in zip(xs, ys)]
    if not points:
        draw.text((left + GAP, top + GAP), "not logged", fill=MUTED, font=font)
        return
    ys_all = [y for _, y in points] + ([reference[1]] if reference else [])
    lo, hi = min(ys_all), max(ys_all)
    lo, hi = (lo - 0.5, hi + 0.5) if hi - lo < 1e-9 else (lo - 0.05 * (hi - lo), hi + 0.05 * (hi - lo))
    x_lo, x_hi = min(x for x, _ in points), max(x for x, _ in points)
    x_span = max(x_hi - x_lo, 1)

    def at(x, y):
        return (left + (x - x_lo) / x_span * (right - left), bottom - (y - lo) / (hi - lo) * (bottom - top))
    for value in (lo, hi):
        draw.text((x0 + 2, at(x_lo, value)[1] - LINE / 2), f"{value:.3g}", fill=MUTED, font=font)
    draw.text((left, bottom + 2), f"epoch {x_lo}", fill=MUTED, font=font)
    draw.text((right - 60, bottom + 2), f"epoch {x_hi}", fill=MUTED, font=font)
    if reference:
        label, value = reference
        y = at(x_lo, value)[1]
        for x in range(int(left), int(right), 8):
            draw.line([(x, y), (min(x + 4, right), y)], fill=SELECTED)
        draw.text((right - 120, y - LINE), label, fill=SELECTED, font=font)
    for i, (label, xs, ys) in enumerate(series):
        colour = PALETTE[i % len(PALETTE)]
        xy = [at(x, y) for x, y in zip(xs, ys)]
        if len(xy) > 1:
            draw.line(xy, fill=colour, width=2)
        for px, py in xy:
            draw.ellipse([px - 2, py - 2, px + 2, py + 2], fill=colour)
        draw.text((left + GAP, top + GAP + i * LINE), label, fill=colour, font=font)


def draw_curves(log_path, output, config=None):
    """Draw a train.py log.txt as a PNG: losses, both teacher entropies against log(out_dim) (uniform collapse),
    mean K, kept centroids, the share of images with none, and the --eval_every k-means mIoU, per epoch.
    config: the run's config.json (default: the one beside log.txt, if any), for out_dim and out_dim_c."""
    records = read_log(log_path)
    if config is None:
        beside = os.path.join(os.path.dirname(os.path.abspath(log_path)), "config.json")
        config = json.load(open(beside)) if os.path.isfile(beside) else {}
    font = ImageFont.load_default()
    columns = 2
    rows = -(-len(CURVE_PANELS) // columns)
    image = Image.new("RGB", (2 * MARGIN + columns * PANEL_W, 2 * MARGIN + TITLE + rows * PANEL_H), BACKGROUND)
    draw = ImageDraw.Draw(image)
    draw.text((MARGIN, MARGIN), f"{log_path}: {len(records)} epochs", fill=TEXT, font=font)
    for i, (title, keys, reference_key) in enumerate(CURVE_PANELS):
        series = []
        for key, label in keys:
            logged = [(r["epoch"], r[key]) for r in records if isinstance(r.get(key), (int, float))]
            if logged:
                series.append((label, [e for e, _ in logged], [v for _, v in logged]))
        reference = None
        if reference_key and config.get(reference_key):
            reference = (f"log({reference_key}) = {math.log(config[reference_key]):.2f}", math.log(config[reference_key]))
        draw_panel(draw, MARGIN + (i % columns) * PANEL_W, MARGIN + TITLE + (i // columns) * PANEL_H, title, series,
                   reference, font)
    image.save(output)
    return image


def get_args_parser():
    p = argparse.ArgumentParser("CrOC cluster pictures", add_help=False)
    g = p.add_argument_group("input (default: synthetic scene 0)")
    src = g.add_mutually_exclusive_group()
    src.add_argument("--image", help="Any image file (read as RGB).")
    src.add_argument("--synthetic_index", type=int, default=0,
                     help="Scene I of train.py's built-in synthetic set (data.SyntheticScenes with seed --seed).")
    src.add_argument("--training_images", type=int,
                     help="The first N images of the training set of the --weights checkpoint (its --data_path or "
                          "synthetic scenes), cropped with --seed: the fixed batch of train.py --visualize_every.")
    g.add_argument("--synthetic_size", type=int, help="Side of the synthetic scene (train.py default 128).")
    g.add_argument("--synthetic_grey", type=bool_flag, help="The scene in one grey palette (train.py default false).")
    g = p.add_argument_group("model (one of --weights, --random_init), or --log for training curves")
    w = g.add_mutually_exclusive_group(required=True)
    w.add_argument("--log", help="Draw this train.py log.txt as training curves (losses, teacher entropies against "
                                 "log(out_dim), K statistics, --eval_every mIoU) to --output, and nothing else.")
    add_backbone_args(g, source=w)  # --arch, --patch_size: the checkpoint's, else train.py's
    g.add_argument("--img_size", type=int, help="Side of both views (train.py: 224).")
    g.add_argument("--global_crops_scale", nargs=2, type=float, help="Crop scale range (train.py: 0.25 1.0).")
    g = p.add_argument_group("clustering (Sec. 3.3; defaults: the checkpoint's, then train.py's)")
    g.add_argument("--which_features", choices=["last", "q", "k", "v"], help="Tokens clustered (Eq. 21).")
    g.add_argument("--k_start", type=int, help="K_start (paper: 12).")
    g.add_argument("--k_max", type=int, help="Largest selectable K (default: k_start).")
    g.add_argument("--lambda_pos", type=float, help="Weight of the positional cost (Eq. 18; paper: 4).")
    g.add_argument("--sinkhorn_lambda", type=float, help="Entropy regularisation (Eq. 11; 20).")
    g.add_argument("--sinkhorn_iterations", type=int, help="Sinkhorn rounds (5).")
    g.add_argument("--marginal_temp", type=float, help="Temperature of the r and c marginals (2.0).")
    g.add_argument("--uniform_marginals", action="store_true", default=None, help="Uniform r and c.")
    g = p.add_argument_group("output")
    g.add_argument("--seed", type=int, default=0, help="Seeds the crops, the photometry and the cluster seeds.")
    g.add_argument("--tile", type=int, default=128, help="Side of a view panel in pixels (even).")
    g.add_argument("--device", default="cpu", help="cpu (bit-exact PNGs) or cuda.")
    g.add_argument("--output", default="clusters.png", help="PNG to write.")
    return p


def training_run(weights):
    """(the training args, the epochs trained) that a checkpoint holds: ({}, None) for bare weights."""
    ckpt = read_checkpoint(local_weights(weights)) if weights else {}
    return stored_args(ckpt), ckpt.get("epoch") if isinstance(ckpt, dict) else None


def resolve_args(args, stored):
    """Fill every FROM_TRAINING flag left at None: the checkpoint's training args (stored), else
    `default_setting`."""
    for name in FROM_TRAINING:
        if getattr(args, name) is None:
            setattr(args, name, stored.get(name, default_setting(name)))
    if args.k_max is None:
        args.k_max = args.k_start
    args.global_crops_scale = tuple(args.global_crops_scale)
    return args


def check_args(args):
    """data.InputError naming the flag, its range and its value. A setting left at None (the checkpoint's, later)
    is not checked: main checks again once resolve_args has filled them in. A missing input file: MissingInput."""
    def need(flag, ok, why):
        value = getattr(args, flag)
        data.need(value is None or ok(value), args, flag, why)
    for flag, what in (("image", "image"), ("weights", "checkpoint"), ("log", "train.py log")):
        value = getattr(args, flag)
        if value and "://" not in value and not os.path.isfile(value):  # a URL is downloaded and checked later
            raise data.MissingInput(f"--{flag} {value}: no such {what} file")
    need("tile", lambda v: v >= 32 and v % 2 == 0, "must be an even number of pixels, at least 32")
    for flag in ("patch_size", "training_images", "synthetic_size", "sinkhorn_iterations"):
        need(flag, lambda v: v >= 1, "must be at least 1")
    for flag in ("synthetic_index", "seed"):
        need(flag, lambda v: v >= 0, "must be >= 0")
    need("img_size", lambda v: v >= 1 and v % (args.patch_size or 1) == 0,
         f"must be a positive multiple of --patch_size {args.patch_size}")
    tokens = 2 * (args.img_size // args.patch_size) ** 2 if args.img_size and args.patch_size else math.inf
    need("k_start", lambda v: 2 <= v <= tokens, f"must lie in [2, {tokens}] (the joint tokens of both views)")
    need("k_max", lambda v: 2 <= v <= (args.k_start or v), f"must lie in [2, --k_start {args.k_start}]")
    need("lambda_pos", lambda v: math.isfinite(v) and v >= 0, "must be a finite number >= 0")
    need("marginal_temp", lambda v: math.isfinite(v) and v > 0, "must be a finite number > 0")
    most = clustering.max_sinkhorn_lambda(torch.float32)
    need("sinkhorn_lambda", lambda v: 0 < v <= most, f"must lie in (0, {most:.1f}]")
    need("global_crops_scale", lambda v: 0 < v[0] <= v[1] <= 1, "needs 0 < min <= max <= 1")


def read_image(path):
    """--image as RGB, read whole; data.InputError naming the file if it cannot be (truncated, not an image)."""
    try:
        return data.load_rgb(path)
    except Exception as e:  # Pillow's own messages ("image file is truncated") do not name the file
        raise data.InputError(f"--image {path}: cannot read it as an image ({type(e).__name__}: {e})") from e


def main(args):
    if args.log:
        draw_curves(args.log, args.output)
        print(f"wrote {args.output}: curves of {args.log}")
        return
    stored, epochs = training_run(args.weights)
    args = resolve_args(resolve_backbone_args(args), stored)  # the checkpoint's arch; a contradicting flag fails
    check_args(args)  # again, with the checkpoint's settings
    original = read_image(args.image) if args.image else None  # before any model work
    print("\n".join(f"{k}: {v}" for k, v in sorted(vars(args).items())))
    torch.manual_seed(args.seed)  # the random init, then the crops
    try:
        backbone = load_backbone(args.arch, args.patch_size, args.weights, args.checkpoint_key).to(args.device)
    except ValueError as e:  # weights of another architecture or patch size (model.load_pretrained names them)
        raise data.InputError(f"--weights {args.weights}: {e}") from e
    if args.training_images:
        if "synthetic_images" not in stored:
            raise data.InputError(f"--training_images: {args.weights} holds no training args of train.py")
        views, positions, originals = fixed_batch(data.pretraining_dataset(argparse.Namespace(**stored)),
                                                  args.training_images, args.seed)  # train.py's fixed batch
        render_clusters(backbone, views, positions, args, args.output, originals, seed=args.seed, tile=args.tile,
                        title=f"epoch {epochs}")
        print(f"wrote {args.output}: the first {len(originals)} training images")
        return
    if args.image:
        name = os.path.basename(args.image)
    else:
        scenes = data.SyntheticScenes(args.synthetic_index + 1, args.synthetic_size, args.seed,  # train.py's scenes
                                      grey=args.synthetic_grey)
        original = scenes[args.synthetic_index][0]
        name = f"synthetic scene {args.synthetic_index}"
    transform = data.TwoViews(args.img_size, args.patch_size, args.global_crops_scale)
    torch.manual_seed(args.seed)
    views, positions = transform(original)
    weights = os.path.basename(args.weights) if args.weights else "random init"
    _, c = render_clusters(backbone, views[None], positions[None], args, args.output, [original], seed=args.seed,
                           tile=args.tile, title=f"{name}, {weights}, seed {args.seed}")
    summary = {"k": c["k"][0].tolist(), "kept": [int(kept_names(c["labels"][0, h, args.k_start - k], args.k_start)
                                                    .sum()) for h, k in enumerate(c["k"][0])]}
    print(f"wrote {args.output}: per head {json.dumps(summary)}")


if __name__ == "__main__":
    parser = argparse.ArgumentParser("CrOC cluster pictures", parents=[get_args_parser()],
                                     formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    data.cli(main, parser, check=check_args)  # a user's mistake: one line, exit 2
