"""K-means + Hungarian matching on frozen dense features (CrOC App. C "Transfer learning via unsupervised
segmentation"; eval_protocols.md sections B and E.3).

Every val image is resized to 448x448; the concatenated last `--n_last_blocks` token maps are bilinearly upsampled
to 100x100 and the masks nearest-resized to 100x100, giving one feature per pixel (Leopart's PredsmIoUKmeans,
the variant that matches the CrOC wording). The pixel features are standardised (per-dimension mean/std over all
pixels) and PCA-projected to 50 dims; k-means with K = number of classes is fitted on a random subsample of
pixels and then assigns every pixel; clusters are matched to classes with the Hungarian algorithm on the
dataset-pooled IoU matrix (B.3). Repeated for seeds 0-4: mean +- std of the mIoU.

Differences from the reference (Leopart) that the numbers inherit:
- all 1,449 PVOC12 val images are used; Leopart's loader (drop_last=True) silently drops 9 of them;
- scikit-learn k-means (k-means++, Lloyd, one run per seed) on at most --fit_samples pixels instead of faiss
  (niter 50, nredo 5, K x 256 subsample); PCA is fitted on a subsample instead of the first 4M pixels.

Memory: the token maps are kept (float16, N x nD x h x w, 12.75x smaller than the 100x100 pixel features) and
the pixel features exist as float16 only after standardisation + PCA (N x 10^4 x 50); standardisation, PCA and
bilinear upsampling are all affine with weights summing to one, so projecting tokens and then upsampling equals
upsampling and then projecting. With --pca 0 the pixel array is N x 10^4 x nD float16. No N x N or N x K x D
tensor is ever built.

    python eval_kmeans.py --dataset pvoc --data_path /data --weights croc.pth --output_dir out/km_pvoc
"""
import argparse
import os
import time

import numpy as np
import torch
import torch.nn.functional as F
from einops import rearrange
from scipy.optimize import linear_sum_assignment
from sklearn.cluster import KMeans
from tqdm import tqdm

import eval_linear
from data import build_segmentation_dataset
from model import backbone_from_args, dense_features

STD_EPS = 1e-5  # Leopart PredsmIoUKmeans: (x - mean) / (std + 1e-5)
ASSIGN_CHUNK = 1 << 18  # pixels per assignment chunk: chunk x K distances at a time


# ----------------------------------------------------------------------------------------------------------------
# Metric (B.3)

def match_clusters(counts):
    """Hungarian matching on pooled (C, K) counts M[c, k] (K >= C)  # B.3

    S[c, k] = IoU(gt == c, pred == k) = M[c,k] / max(row_c + col_k - M[c,k], 1e-8);
    linear_sum_assignment(1 - S) maximises the summed IoU; unmatched clusters (K > C) become class 0.
    Returns (mIoU, per-class IoU (C,) float64, mapping (K,) int64 cluster -> class)."""
    counts = counts.double().cpu()
    num_classes, num_clusters = counts.shape
    union = counts.sum(1, keepdim=True) + counts.sum(0, keepdim=True) - counts
    score = counts / union.clamp(min=1e-8)  # (C, K)
    rows, cols = linear_sum_assignment(1 - score.numpy())
    mapping = torch.zeros(num_clusters, dtype=torch.long)
    mapping[torch.as_tensor(cols)] = torch.as_tensor(rows, dtype=torch.long)
    # column k of the counts joins column mapping[k]: the (C, C) confusion of the relabelled prediction
    confusion = torch.zeros(num_classes, num_classes, dtype=torch.float64).index_add_(1, mapping, counts)
    miou_value, iou = eval_linear.miou(confusion)
    return miou_value, iou, mapping


def hungarian_miou(pred, gt, num_classes, ignore_index=255, num_clusters=None):
    """(mIoU, per-class IoU (C,), mapping (K,) cluster -> class) of cluster ids pred against labels gt, pooled over
    every pixel given (any equal shapes) except gt == ignore_index. K = num_clusters (default num_classes) must be
    >= num_classes; cluster ids outside 0..K-1 on valid pixels raise ValueError."""
    num_clusters = num_classes if num_clusters is None else num_clusters
    if num_clusters < num_classes:
        raise ValueError(f"num_clusters={num_clusters} < num_classes={num_classes}: Hungarian matching needs K >= C")
    counts = eval_linear._count_pairs(pred, gt, num_classes, num_clusters, ignore_index)
    return match_clusters(counts)


# ----------------------------------------------------------------------------------------------------------------
# Features: pass 1 (tokens, masks, streaming statistics, PCA subsample) and pass 2 (projected pixel features)

class RunningMoments:
    """Per-channel mean and population variance over streamed (b, D, h, w) chunks (Chan et al.'s parallel
    update), i.e. over every pixel of every image seen."""

    def __init__(self, dim, device):
        self.n = 0
        self.mean = torch.zeros(dim, dtype=torch.float64, device=device)
        self.m2 = torch.zeros(dim, dtype=torch.float64, device=device)

    def update(self, x):
        var_b, mean_b = torch.var_mean(x, dim=(0, 2, 3), correction=0)
        n_a, n_b = self.n, x.numel() // x.shape[1]
        n = n_a + n_b
        delta = mean_b.double() - self.mean
        self.mean += delta * (n_b / n)
        self.m2 += var_b.double() * n_b + delta.square() * (n_a * n_b / n)
        self.n = n

    def std(self):
        return (self.m2 / self.n).sqrt()


@torch.no_grad()
def extract(backbone, data, n_images, args, device, main):
    """Pass 1 over the val split. Returns tokens (N, nD, h, w) float16 (CPU), masks (N, S, S) uint8 at
    S = --mask_size, per-dimension mean and std over all N*S*S upsampled pixels, and the raw upsampled features
    (n_fit, nD) float32 of a random pixel subsample (for the PCA fit; empty with --pca 0)."""
    size = args.mask_size
    n_pixels = n_images * size * size
    generator = torch.Generator().manual_seed(args.seed)  # PCA fitted once, shared by all k-means seeds
    n_fit = args.fit_samples if args.pca else 0
    fit_idx = torch.randperm(n_pixels, generator=generator)[:n_fit].sort().values
    tokens, masks, subsample, moments, start = None, None, [], None, 0
    for img, mask in tqdm(data, desc="extracting features", disable=not main):
        feats = dense_features(backbone, img.to(device, non_blocking=True), args.n_last_blocks)  # (B, nD, h, w)
        b = feats.shape[0]
        if tokens is None:
            tokens = torch.empty((n_images, *feats.shape[1:]), dtype=torch.float16)
            masks = torch.empty((n_images, size, size), dtype=torch.uint8)
            moments = RunningMoments(feats.shape[1], device)
        tokens[start:start + b] = feats.half().cpu()
        masks[start:start + b] = mask
        # E.3: one feature per pixel, bilinearly upsampled to S x S
        pixels = F.interpolate(feats, size=(size, size), mode="bilinear", align_corners=False)  # (B, nD, S, S)
        moments.update(pixels)
        pixels = rearrange(pixels, "b d h w -> (b h w) d")
        lo, hi = start * size * size, (start + b) * size * size
        sel = fit_idx[torch.searchsorted(fit_idx, lo):torch.searchsorted(fit_idx, hi)] - lo
        subsample.append(pixels[sel.to(device)].cpu())
        start += b
    return tokens, masks, moments.mean.float(), moments.std().float(), torch.cat(subsample)


def fit_pca(x, n_components):
    """(mean (D,), components (D, n_components)) of the rows of x, by eigendecomposition of the covariance;
    each component's sign is fixed so that its largest-magnitude entry is positive (as sklearn's svd_flip)."""
    mean = x.mean(0)
    cov = torch.zeros(x.shape[1], x.shape[1], dtype=torch.float64, device=x.device)
    for chunk in (x - mean).split(16384):  # float32 products, float64 sum
        cov += (chunk.T @ chunk).double()
    _, eigvecs = torch.linalg.eigh(cov / x.shape[0])  # ascending eigenvalues
    components = eigvecs[:, -n_components:].flip(-1)  # (D, n_components), largest variance first
    signs = components.gather(0, components.abs().argmax(0, keepdim=True)).sign()
    return mean, (components * signs).float()


@torch.no_grad()
def project(tokens, mean, std, pca, args, device, main):
    """Pass 2: (N * S * S, d) float16 standardised (+ PCA-projected) pixel features, image-major raster order.
    The affine maps run at token resolution before the bilinear upsampling, which is the same result."""
    size, n_images = args.mask_size, tokens.shape[0]
    dim = pca[1].shape[1] if pca is not None else tokens.shape[1]
    out = torch.empty((n_images * size * size, dim), dtype=torch.float16)
    mean, scale = mean.to(device)[:, None, None], (std.to(device) + STD_EPS)[:, None, None]
    if pca is not None:
        pca_mean, components = pca[0].to(device)[:, None, None], pca[1].to(device)
    for start in tqdm(range(0, n_images, args.batch_size), desc="projecting", disable=not main):
        x = (tokens[start:start + args.batch_size].to(device).float() - mean) / scale  # (b, nD, h, w)
        if pca is not None:
            x = torch.einsum("bdhw,dk->bkhw", x - pca_mean, components)
        x = F.interpolate(x, size=(size, size), mode="bilinear", align_corners=False)
        lo = start * size * size
        out[lo:lo + x.shape[0] * size * size] = rearrange(x, "b k h w -> (b h w) k").half().cpu()
    return out


# ----------------------------------------------------------------------------------------------------------------
# K-means (E.3)

def fit_kmeans(z, num_clusters, seed, args):
    """Centroids (K, d) float32 of k-means (k-means++ init, Lloyd) on <= --fit_samples random rows of z."""
    generator = torch.Generator().manual_seed(seed)
    idx = torch.randperm(z.shape[0], generator=generator)[:args.fit_samples]
    kmeans = KMeans(n_clusters=num_clusters, init="k-means++", n_init=1, max_iter=args.kmeans_iters,
                    random_state=seed)
    kmeans.fit(z[idx].float().numpy())
    return torch.from_numpy(kmeans.cluster_centers_).float()


@torch.no_grad()
def assign_and_count(z, gt, centroids, num_classes, device):
    """Nearest centroid of every pixel, in chunks, accumulated into pooled (C, K) counts over gt != 255."""
    centroids = centroids.to(device)
    c_sq = centroids.square().sum(1)
    counts = torch.zeros(num_classes, centroids.shape[0], dtype=torch.int64, device=device)
    for start in range(0, z.shape[0], ASSIGN_CHUNK):
        x = z[start:start + ASSIGN_CHUNK].to(device).float()
        dist = c_sq - 2 * x @ centroids.T  # (chunk, K); ||x||^2 is the same for every centroid
        pred = dist.argmin(1)
        counts += eval_linear._count_pairs(pred, gt[start:start + ASSIGN_CHUNK].to(device), num_classes,
                                           centroids.shape[0])
    return counts.cpu()


def get_args_parser():
    parser = argparse.ArgumentParser("K-means + Hungarian unsupervised segmentation (CrOC App. C, spec E.3)",
                                     add_help=False)
    eval_linear.add_backbone_args(parser)
    parser.set_defaults(output_dir="output/eval_kmeans")
    parser.add_argument("--mask_size", default=100, type=int,
                        help="Features (bilinear) and masks (nearest) are resized to mask_size x mask_size "
                             "(default: 100, CrOC paper and Leopart).")
    parser.add_argument("--pca", default=50, type=int,
                        help="Standardise, then PCA to this many dims before k-means (default: 50, Leopart; the "
                             "CrOC paper does not say). 0 disables PCA (standardisation is kept).")
    parser.add_argument("--fit_samples", default=200_000, type=int,
                        help="Random pixels the PCA and each k-means are fitted on; every pixel is then "
                             "assigned (default: 200,000; Leopart's faiss fits on K x 256 pixels).")
    parser.add_argument("--seeds", default=[0, 1, 2, 3, 4], type=int, nargs="+",
                        help="One full k-means fit per seed (default: 0 1 2 3 4, CrOC: five seeds).")
    parser.add_argument("--kmeans_iters", default=100, type=int,
                        help="Maximum Lloyd iterations per fit (default: 100, Leopart's sup_overcluster niter).")
    return parser


def main(args):
    if int(os.environ.get("WORLD_SIZE", 1)) > 1:
        raise ValueError("eval_kmeans.py runs in one process (k-means needs every pixel in one place): "
                         "launch it with python, not torchrun")
    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    eval_linear.check_feature_size(args)
    if args.pca < 0 or args.fit_samples < 1:
        raise ValueError("--pca must be >= 0 and --fit_samples >= 1")
    eval_linear.print_config(args)
    os.makedirs(args.output_dir, exist_ok=True)
    eval_linear.write_json(os.path.join(args.output_dir, "config.json"), vars(args))

    val_set = build_segmentation_dataset(args.dataset, args.data_path, args.val_split)
    num_classes, class_names = val_set.num_classes, list(val_set.class_names)
    torch.manual_seed(args.seed)  # a --random_init backbone is the same in every run
    backbone = backbone_from_args(args).to(device)
    n_dim = args.n_last_blocks * backbone.embed_dim
    if args.pca >= n_dim:
        raise ValueError(f"--pca {args.pca} must be smaller than the feature dimension {n_dim}")

    start_time = time.time()
    data = eval_linear.Transformed(val_set, eval_linear.ValTransform(args.img_size, args.mask_size))
    tokens, masks, mean, std, subsample = extract(backbone, eval_linear.loader(data, args), len(val_set), args,
                                                  device, main=True)
    pca = fit_pca((subsample.to(device) - mean.to(device)) / (std.to(device) + STD_EPS), args.pca) \
        if args.pca else None
    z = project(tokens, mean, std, pca, args, device, main=True)  # (N * S * S, d) float16
    del tokens, subsample
    gt = masks.reshape(-1)  # same image-major raster order as z
    print(f"{len(val_set)} images, {z.shape[0]} pixels of dim {z.shape[1]} "
          f"({int((gt != 255).sum())} evaluated), features in {time.time() - start_time:.0f} s", flush=True)

    per_seed = []
    for seed in tqdm(args.seeds, desc="k-means seeds"):
        centroids = fit_kmeans(z, num_classes, seed, args)  # E.3: K = number of classes
        counts = assign_and_count(z, gt, centroids, num_classes, device)
        miou_value, iou, mapping = match_clusters(counts)
        per_seed.append({"seed": seed, "miou": miou_value, "per_class_iou": dict(zip(class_names, iou.tolist())),
                         "cluster_to_class": mapping.tolist(), "cluster_sizes": counts.sum(0).tolist()})
        tqdm.write(f"seed {seed}: mIoU {100 * miou_value:.2f}")

    mious = np.array([r["miou"] for r in per_seed])
    mean_iou = torch.tensor([list(r["per_class_iou"].values()) for r in per_seed]).mean(0)
    results = {
        "miou_mean": float(mious.mean()),
        "miou_std": float(mious.std()),  # population std over seeds (ddof=0)
        "miou_per_seed": mious.tolist(),
        "per_class_iou_mean": dict(zip(class_names, mean_iou.tolist())),
        "per_seed": per_seed,
        "dataset": args.dataset,
        "val_split": args.val_split,
        "weights": args.weights if args.weights is not None else "random_init",
        "checkpoint_key": args.checkpoint_key,
        "arch": args.arch,
        "patch_size": args.patch_size,
        "n_last_blocks": args.n_last_blocks,
        "num_clusters": num_classes,
        "n_images": len(val_set),
        "n_pixels": int(z.shape[0]),
        "n_valid_pixels": int((gt != 255).sum()),
        "feature_dim": int(z.shape[1]),
        "config": vars(args),
    }
    print(eval_linear.format_iou_table(class_names, mean_iou, float(mious.mean())))
    print(f"k-means (K={num_classes}) + Hungarian mIoU on {args.dataset} {args.val_split} ({len(val_set)} images, "
          f"{len(args.seeds)} seeds): {100 * mious.mean():.2f} +- {100 * mious.std():.2f}")
    eval_linear.write_json(os.path.join(args.output_dir, "results.json"), results)
    return results


if __name__ == "__main__":
    parser = argparse.ArgumentParser(parents=[get_args_parser()])
    main(parser.parse_args())
