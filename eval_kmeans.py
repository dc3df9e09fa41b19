"""K-means + Hungarian matching on frozen dense features (App. C "Transfer learning via unsupervised
segmentation"; Table 3).

Every val image is resized to 448x448; the concatenated last n_b token maps are bilinearly upsampled to 100x100
and the masks nearest-resized to 100x100, giving one feature per pixel (App. C: "the ground-truth segmentation
masks and features are down-/up-sampled to have the same resolution (100x100)"; Leopart's PredsmIoUKmeans). The
features are standardised (per-dimension mean/std over all pixels) and PCA-projected to 50 dims; k-means with
K = number of classes is fitted on a random subsample of pixels and then assigns every pixel; clusters are
matched to classes with the Hungarian algorithm on the dataset-pooled IoU matrix. Repeated for seeds 0-4: mean
+- std of the mIoU.

Switches for comparing with Leopart's own numbers:
- `--granularity tokens`: k-means on the tokens and the assignment maps nearest-upsampled to 100x100 (Leopart's
  sup_overcluster.py, the script of its 5-seed tables);
- `--num_clusters K` with K > C: over-clustering with many-to-one matching (each cluster to the class it is most
  precise for). App. C argues against it as a main metric: it scores object parts, not their relations.
Several `--n_last_blocks` values come from one feature pass and are reported each.

Differences from the reference (Leopart) that the numbers inherit:
- all 1,449 PVOC12 val images are used; Leopart's loader (drop_last=True) silently drops 9 of them;
- scikit-learn k-means (k-means++, Lloyd, --n_init runs per seed, default 1) on at most --fit_samples points
  instead of faiss (niter 50, nredo 5, K x 256 subsample); PCA is fitted on a subsample instead of the first 4M pixels.

Memory: the token maps are kept (float16, N x n_b D x h x w, 12.75x smaller than the 100x100 pixel features at
448/16) and the pixel features exist as float16 only after standardisation + PCA (N x 10^4 x 50); standardisation,
PCA and bilinear upsampling are all affine with weights summing to one, so projecting tokens and then upsampling
equals upsampling and then projecting. With --pca 0 the pixel array is N x 10^4 x n_b D float16. No N x N or
N x K x D tensor is ever built. One process only (k-means needs every point in one place).

    python eval_kmeans.py --dataset pvoc --data_path /data --weights croc.pth --output_dir out/km_pvoc
"""
import argparse
import os
import time

import numpy as np
import torch
import torch.nn.functional as F
from einops import rearrange
from sklearn.cluster import KMeans
from tqdm import tqdm

import metrics
from data import InputError, Transformed, ValTransform, build_segmentation_dataset, cli, need
from metrics import count_pairs, match_clusters, match_many_to_one
from model import backbone_from_args, dense_features

STD_EPS = 1e-5  # Leopart PredsmIoUKmeans: (x - mean) / (std + 1e-5)
ASSIGN_CHUNK = 1 << 18  # points per assignment chunk: chunk x K distances at a time


# ----------------------------------------------------------------------------------------------------------------
# Features: pass 1 (tokens, masks, streaming statistics, PCA subsample) and pass 2 (projected features)

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


def grid(args):
    """(points per image side, tokens per image side): mask_size for pixels, img_size / patch for tokens."""
    tokens = args.img_size // args.patch_size
    return (args.mask_size if args.granularity == "pixels" else tokens), tokens


@torch.no_grad()
def extract(backbone, data, n_images, args, device, main):
    """Pass 1 over the val split. Returns tokens (N, n_max D, h, w) float16 (CPU) of the largest n_b, masks
    (N, S, S) uint8 at S = --mask_size, per-dimension mean and std over every point (each of the N*S*S
    upsampled pixels, or each of the N*h*w tokens with --granularity tokens), and the raw features (n_fit, n_max D)
    float32 of a random subsample of points (for the PCA fit; empty with --pca 0). A smaller n_b is a slice of
    the channels of all of these."""
    size, points = args.mask_size, grid(args)[0]
    n_points = n_images * points * points
    generator = torch.Generator().manual_seed(args.seed)  # PCA fitted once, shared by all k-means seeds
    n_fit = args.fit_samples if args.pca else 0
    fit_idx = torch.randperm(n_points, generator=generator)[:n_fit].sort().values
    tokens, masks, subsample, moments, start = None, None, [], None, 0
    for img, mask in tqdm(data, desc="extracting features", disable=not main):
        feats = dense_features(backbone, img.to(device, non_blocking=True), max(args.n_last_blocks))
        b = feats.shape[0]  # feats (B, n_max D, h, w)
        if tokens is None:
            tokens = torch.empty((n_images, *feats.shape[1:]), dtype=torch.float16)
            masks = torch.empty((n_images, size, size), dtype=torch.uint8)
            moments = RunningMoments(feats.shape[1], device)
        tokens[start:start + b] = feats.half().cpu()
        masks[start:start + b] = mask
        if args.granularity == "pixels":  # one feature per pixel, bilinearly upsampled to S x S
            feats = F.interpolate(feats, size=(size, size), mode="bilinear", align_corners=False)
        moments.update(feats)
        feats = rearrange(feats, "b d h w -> (b h w) d")
        lo, hi = start * points * points, (start + b) * points * points
        sel = fit_idx[torch.searchsorted(fit_idx, lo):torch.searchsorted(fit_idx, hi)] - lo
        subsample.append(feats[sel.to(device)].cpu())
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
    """Pass 2: (N * P * P, d) float16 standardised (+ PCA-projected) features, image-major raster order, with
    P = S (pixels: the affine maps run at token resolution before the bilinear upsampling, the same result) or
    P = h (tokens)."""
    upsample = getattr(args, "granularity", "pixels") == "pixels"
    size, n_images = args.mask_size if upsample else tokens.shape[-1], tokens.shape[0]
    dim = pca[1].shape[1] if pca is not None else tokens.shape[1]
    out = torch.empty((n_images * size * size, dim), dtype=torch.float16)
    mean, scale = mean.to(device)[:, None, None], (std.to(device) + STD_EPS)[:, None, None]
    if pca is not None:
        pca_mean, components = pca[0].to(device)[:, None, None], pca[1].to(device)
    for start in tqdm(range(0, n_images, args.batch_size), desc="projecting", disable=not main):
        x = (tokens[start:start + args.batch_size].to(device).float() - mean) / scale  # (b, nD, h, w)
        if pca is not None:
            x = torch.einsum("bdhw,dk->bkhw", x - pca_mean, components)
        if upsample:
            x = F.interpolate(x, size=(size, size), mode="bilinear", align_corners=False)
        lo = start * size * size
        out[lo:lo + x.shape[0] * size * size] = rearrange(x, "b k h w -> (b h w) k").half().cpu()
    return out


# ----------------------------------------------------------------------------------------------------------------
# K-means

def fit_kmeans(z, num_clusters, seed, args):
    """Centroids (K, d) float32 of k-means (k-means++ init, Lloyd) on <= --fit_samples random rows of z."""
    generator = torch.Generator().manual_seed(seed)
    idx = torch.randperm(z.shape[0], generator=generator)[:args.fit_samples]
    kmeans = KMeans(n_clusters=num_clusters, init="k-means++", n_init=args.n_init, max_iter=args.kmeans_iters,
                    random_state=seed)  # n_init > 1: the fit of lowest inertia (Leopart's faiss nredo)
    kmeans.fit(z[idx].float().numpy())
    return torch.from_numpy(kmeans.cluster_centers_).float()


@torch.no_grad()
def assign(z, centroids, device):
    """(n,) int64 nearest centroid of every row of z, in chunks."""
    centroids = centroids.to(device)
    c_sq = centroids.square().sum(1)
    out = torch.empty(z.shape[0], dtype=torch.int64)
    for start in range(0, z.shape[0], ASSIGN_CHUNK):
        x = z[start:start + ASSIGN_CHUNK].to(device).float()
        out[start:start + ASSIGN_CHUNK] = (c_sq - 2 * x @ centroids.T).argmin(1).cpu()  # ||x||^2: same for all
    return out


def upsample_assignments(pred, n_images, tokens_side, size):
    """Token cluster ids (N * h * w,) -> (N * S * S,) by nearest upsampling (Leopart's sup_overcluster)."""
    maps = rearrange(pred, "(n h w) -> n 1 h w", n=n_images, h=tokens_side).float()
    return F.interpolate(maps, size=(size, size), mode="nearest").long().reshape(-1)


@torch.no_grad()
def assign_and_count(z, gt, centroids, num_classes, device):
    """Nearest centroid of every pixel, accumulated into pooled (C, K) counts over gt != 255."""
    return count_pairs(assign(z, centroids, device), gt, num_classes, centroids.shape[0])


def match(counts):
    """Hungarian (K == C) or many-to-one (K > C, over-clustering) matching of pooled (C, K) counts."""
    return match_clusters(counts) if counts.shape[1] == counts.shape[0] else match_many_to_one(counts)


def get_args_parser():
    parser = argparse.ArgumentParser("K-means + Hungarian unsupervised segmentation (App. C)", add_help=False)
    metrics.add_backbone_args(parser)
    parser.set_defaults(output_dir="output/eval_kmeans")
    parser.add_argument("--mask_size", default=100, type=int,
                        help="Features (bilinear) and masks (nearest) are resized to mask_size x mask_size "
                             "(default: 100, App. C and Leopart).")
    parser.add_argument("--granularity", default="pixels", choices=("pixels", "tokens"),
                        help="pixels: one feature per pixel of the mask_size grid (default, App. C's wording); "
                             "tokens: k-means on the tokens, assignments nearest-upsampled to mask_size (Leopart's "
                             "sup_overcluster.py, for comparing with its tables).")
    parser.add_argument("--num_clusters", default=None, type=int,
                        help="K (default: the number of classes, App. C). K > C is over-clustering, scored with "
                             "many-to-one matching (Leopart); App. C argues against it as a main metric.")
    parser.add_argument("--pca", default=50, type=int,
                        help="Standardise, then PCA to this many dims before k-means (default: 50, Leopart; the "
                             "paper does not say). 0 disables PCA (standardisation is kept).")
    parser.add_argument("--fit_samples", default=200_000, type=int,
                        help="Random points the PCA and each k-means are fitted on; every point is then "
                             "assigned (default: 200,000; Leopart's faiss fits on K x 256 points).")
    parser.add_argument("--seeds", default=[0, 1, 2, 3, 4], type=int, nargs="+",
                        help="One full k-means fit per seed (default: 0 1 2 3 4, App. C: five seeds).")
    parser.add_argument("--n_init", default=1, type=int,
                        help="k-means restarts per seed, the one of lowest inertia kept (scikit-learn's n_init; "
                             "Leopart's faiss nredo is 5). Default: 1.")
    parser.add_argument("--kmeans_iters", default=100, type=int,
                        help="Maximum Lloyd iterations per fit (default: 100, Leopart's sup_overcluster niter).")
    return parser


def evaluate_blocks(n, tokens, masks, mean, std, subsample, embed_dim, num_clusters, class_names, args, device):
    """Every k-means seed on the last n blocks (a channel slice of the largest n_b's pass-1 outputs)."""
    keep = slice(tokens.shape[1] - n * embed_dim, tokens.shape[1])
    mean, std = mean[keep], std[keep]
    pca = fit_pca((subsample[:, keep].to(device) - mean.to(device)) / (std.to(device) + STD_EPS), args.pca) \
        if args.pca else None
    z = project(tokens[:, keep], mean, std, pca, args, device, main=True)  # (N * P * P, d) float16
    gt = masks.reshape(-1)  # image-major raster order, as z (pixels) or its upsampled assignments (tokens)
    per_seed, first_pred = [], None
    for seed in tqdm(args.seeds, desc=f"k-means seeds, n_b={n}"):
        centroids = fit_kmeans(z, num_clusters, seed, args)
        pred = assign(z, centroids, device)
        if args.granularity == "tokens":
            pred = upsample_assignments(pred, len(masks), grid(args)[1], args.mask_size)
        counts = count_pairs(pred, gt, len(class_names), num_clusters)
        miou_value, iou, mapping = match(counts)
        if first_pred is None:
            first_pred = mapping[pred[:args.n_pictures * args.mask_size ** 2]]
        per_seed.append({"seed": seed, "miou": miou_value, "per_class_iou": dict(zip(class_names, iou.tolist())),
                         "cluster_to_class": mapping.tolist(), "cluster_sizes": counts.sum(0).tolist(),
                         "confusion": metrics.relabel(counts, mapping).long().tolist()})
        tqdm.write(f"n_b={n} seed {seed}: mIoU {100 * miou_value:.2f}")
    mious = np.array([r["miou"] for r in per_seed])
    mean_iou = torch.tensor([list(r["per_class_iou"].values()) for r in per_seed]).mean(0)
    run = {"miou_mean": float(mious.mean()), "miou_std": float(mious.std()),  # population std (ddof=0)
           "miou_per_seed": mious.tolist(), "per_class_iou_mean": dict(zip(class_names, mean_iou.tolist())),
           "per_seed": per_seed, "n_last_blocks": n, "n_pixels": int(z.shape[0]) if args.granularity == "pixels"
           else int(gt.numel()), "feature_dim": int(z.shape[1])}
    return run, first_pred


def check_args(args):
    """The range of every numeric flag (InputError naming it), before any work."""
    metrics.check_feature_size(args)
    need(args.mask_size >= 1, args, "mask_size", "must be at least 1")
    need(args.num_clusters is None or args.num_clusters >= 1, args, "num_clusters",
         "must be at least 1 (and at least the number of classes)")
    need(args.pca >= 0, args, "pca", "must be >= 0 (0: no PCA)")
    need(args.fit_samples >= 1, args, "fit_samples", "must be at least 1")
    need(min(args.seeds) >= 0, args, "seeds", "must be >= 0 (scikit-learn's random_state)")
    need(args.kmeans_iters >= 1, args, "kmeans_iters", "must be at least 1")
    need(args.n_init >= 1, args, "n_init", "must be at least 1")
    return args


def main(args):
    if int(os.environ.get("WORLD_SIZE", 1)) > 1:
        raise InputError("eval_kmeans.py runs in one process (k-means needs every point in one place): "
                         "launch it with python, not torchrun")
    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    check_args(args)
    metrics.print_config(args)

    val_set = build_segmentation_dataset(args.dataset, args.data_path, args.val_split,
                                         ignore_unknown_labels=args.ignore_unknown_labels)
    num_classes, class_names = val_set.num_classes, list(val_set.class_names)
    num_clusters = args.num_clusters or num_classes
    if num_clusters < num_classes:
        raise InputError(f"--num_clusters {num_clusters} < {num_classes} classes: matching needs K >= C")
    torch.manual_seed(args.seed)  # a --random_init backbone is the same in every run
    backbone = backbone_from_args(args).to(device)
    if args.pca >= min(args.n_last_blocks) * backbone.embed_dim:
        raise InputError(f"--pca {args.pca} must be smaller than the feature dimension "
                         f"{min(args.n_last_blocks) * backbone.embed_dim}")
    # only once the inputs are checked: a failed rerun leaves the old config beside its results
    os.makedirs(args.output_dir, exist_ok=True)
    metrics.write_json(os.path.join(args.output_dir, "config.json"), vars(args))

    start_time = time.time()
    data = Transformed(val_set, ValTransform(args.img_size, args.mask_size))
    tokens, masks, mean, std, subsample = extract(backbone, metrics.loader(data, args), len(val_set), args,
                                                  device, main=True)
    n_valid = int((masks != 255).sum())
    metrics.check_scored_pixels(n_valid, masks.numel(), val_set, "evaluation")
    print(f"{len(val_set)} images, {n_valid} of {masks.numel()} pixels evaluated, features in "
          f"{time.time() - start_time:.0f} s", flush=True)

    runs = {}
    for n in args.n_last_blocks:
        runs[f"nb{n}"], pred = evaluate_blocks(n, tokens, masks, mean, std, subsample, backbone.embed_dim,
                                               num_clusters, class_names, args, device)
        if args.n_pictures > 0:
            pictures = [(metrics.denormalize(data[i][0]), masks[i].numpy(),
                         pred[i * args.mask_size ** 2:(i + 1) * args.mask_size ** 2].reshape(
                             args.mask_size, args.mask_size).numpy())
                        for i in range(min(args.n_pictures, len(val_set)))]
            metrics.save_prediction_pictures(os.path.join(args.output_dir, f"predictions_nb{n}.png"), pictures)
    best = max(runs, key=lambda r: runs[r]["miou_mean"])
    results = {
        **{k: v for k, v in runs[best].items() if k != "n_last_blocks"},
        "best_run": best,
        "runs": runs,
        "class_names": class_names,
        "dataset": args.dataset,
        "val_split": args.val_split,
        "weights": args.weights if args.weights is not None else "random_init",
        "checkpoint_key": args.checkpoint_key,
        "arch": args.arch,
        "patch_size": args.patch_size,
        "n_last_blocks": args.n_last_blocks,
        "granularity": args.granularity,
        "num_clusters": num_clusters,
        "matching": "hungarian" if num_clusters == num_classes else "many-to-one",
        "n_images": len(val_set),
        "n_valid_pixels": n_valid,
        "config": vars(args),
    }
    best_run = runs[best]
    print(metrics.format_iou_table(class_names, torch.tensor(list(best_run["per_class_iou_mean"].values())),
                                   best_run["miou_mean"]))
    for name, run in runs.items():
        print(f"k-means (K={num_clusters}, {results['matching']}, {args.granularity}) mIoU on {args.dataset} "
              f"{args.val_split} ({len(val_set)} images, {len(args.seeds)} seeds), {name}: "
              f"{100 * run['miou_mean']:.2f} +- {100 * run['miou_std']:.2f}")
    print(f"best: {best} {100 * best_run['miou_mean']:.2f}")
    metrics.write_json(os.path.join(args.output_dir, "results.json"), results)
    return results


if __name__ == "__main__":
    cli(main, argparse.ArgumentParser(parents=[get_args_parser()]), check=check_args)
