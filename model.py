"""CrOC's networks, objective and training step, in the paper's order: the ViT backbone, the projection head, the
view centroids (Eq. 2), the loss (Eq. 3-7), one training step (Fig. 2), DINO's optimisation, and the paper's
pretraining settings (Sec. 4.1, App. B); the plumbing at the bottom (distributed setup, checkpoint loading, the
evaluation scripts' flags and features).

Parameter names follow DINO and timm (`blocks.0.attn.qkv.weight`, `head.last_layer.weight_g`, ...), so official
DINO and CrOC checkpoints load without renaming. One forward pass returns everything CrOC's training step needs:
the CLS output, the patch tokens after the final norm, and the last block's per-head queries, keys or values
(Eq. 21), so that the teacher never runs twice.
"""
import argparse
import dataclasses
import datetime
import fcntl
import math
import os
import pickle
import urllib.parse
from typing import NamedTuple, Optional, Tuple

import numpy as np
import torch
import torch.distributed as dist
import torch.distributed.nn.functional as dist_nn
import torch.nn as nn
import torch.nn.functional as F
from einops import rearrange
from torch.profiler import record_function

import clustering
import data

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)

# --------------------------------------------------------------------------------------------------------------
# Vision Transformer (DINO's `vision_transformer.py`, written from scratch with SDPA attention)
# --------------------------------------------------------------------------------------------------------------
def drop_path(x, drop_prob: float, training: bool):
    """Stochastic depth: drop the whole residual branch of a sample with probability `drop_prob`."""
    if drop_prob == 0.0 or not training:
        return x
    keep = 1.0 - drop_prob
    mask = x.new_empty((x.shape[0],) + (1,) * (x.ndim - 1)).bernoulli_(keep)
    return x * mask / keep


class DropPath(nn.Module):
    def __init__(self, drop_prob=0.0):
        super().__init__()
        self.drop_prob = drop_prob

    def forward(self, x):
        return drop_path(x, self.drop_prob, self.training)


class Mlp(nn.Module):
    def __init__(self, dim, hidden_dim):
        super().__init__()
        self.fc1 = nn.Linear(dim, hidden_dim)
        self.act = nn.GELU()
        self.fc2 = nn.Linear(hidden_dim, dim)

    def forward(self, x):
        return self.fc2(self.act(self.fc1(x)))


class Attention(nn.Module):
    def __init__(self, dim, num_heads, qkv_bias=True):
        super().__init__()
        self.num_heads = num_heads
        self.scale = (dim // num_heads) ** -0.5
        self.qkv = nn.Linear(dim, dim * 3, bias=qkv_bias)
        self.proj = nn.Linear(dim, dim)

    def qkv_heads(self, x):
        """(B, T, D) -> q, k, v, each (B, heads, T, head_dim): Eq. 20's Z W^{q,k,v}_i for every head i."""
        qkv = rearrange(self.qkv(x), "b t (three h d) -> three b h t d", three=3, h=self.num_heads)
        return qkv[0], qkv[1], qkv[2]

    def forward(self, x):
        q, k, v = self.qkv_heads(x)
        out = F.scaled_dot_product_attention(q, k, v)  # Eq. 20
        return self.proj(rearrange(out, "b h t d -> b t (h d)")), (q, k, v)  # Eq. 19

    def attention_map(self, x):
        """softmax(q k^T / sqrt(D)) of every head: (B, heads, T, T), for pictures of attention."""
        q, k, _ = self.qkv_heads(x)
        return (q @ k.transpose(-2, -1) * self.scale).softmax(dim=-1)


class Block(nn.Module):
    """Pre-norm transformer block: x + attn(norm1(x)), then x + mlp(norm2(x))."""

    def __init__(self, dim, num_heads, mlp_ratio=4.0, qkv_bias=True, drop_path=0.0):
        super().__init__()
        self.norm1 = nn.LayerNorm(dim, eps=1e-6)
        self.attn = Attention(dim, num_heads, qkv_bias)
        self.drop_path = DropPath(drop_path)
        self.norm2 = nn.LayerNorm(dim, eps=1e-6)
        self.mlp = Mlp(dim, int(dim * mlp_ratio))

    def forward(self, x):
        y, qkv = self.attn(self.norm1(x))
        x = x + self.drop_path(y)
        x = x + self.drop_path(self.mlp(self.norm2(x)))
        return x, qkv


class ViTFeatures(NamedTuple):
    cls: torch.Tensor  # (B, D) CLS token after the final norm: the image-level representation z-bar
    patch: torch.Tensor  # (B, N, D) patch tokens after the final norm: Z of Eq. 1-2
    tokens: Optional[torch.Tensor]  # (B, H, 1+N, d) tokens to cluster (Eq. 21), CLS at index 0; None if not asked
    grid: tuple  # (h, w) patch grid


class VisionTransformer(nn.Module):
    def __init__(self, patch_size=16, embed_dim=384, depth=12, num_heads=6, mlp_ratio=4.0, qkv_bias=True,
                 drop_path_rate=0.0, img_size=224):
        super().__init__()
        self.patch_size, self.embed_dim, self.num_heads = patch_size, embed_dim, num_heads
        self.patch_embed = nn.Module()
        self.patch_embed.proj = nn.Conv2d(3, embed_dim, kernel_size=patch_size, stride=patch_size)
        num_patches = (img_size // patch_size) ** 2
        self.cls_token = nn.Parameter(torch.zeros(1, 1, embed_dim))
        self.pos_embed = nn.Parameter(torch.zeros(1, 1 + num_patches, embed_dim))  # learned for the 224 grid
        rates = torch.linspace(0, drop_path_rate, depth).tolist()  # stochastic depth grows with depth
        self.blocks = nn.ModuleList(Block(embed_dim, num_heads, mlp_ratio, qkv_bias, r) for r in rates)
        self.norm = nn.LayerNorm(embed_dim, eps=1e-6)
        nn.init.trunc_normal_(self.pos_embed, std=0.02)
        nn.init.trunc_normal_(self.cls_token, std=0.02)
        self.apply(_init_weights)

    def interpolate_pos_encoding(self, h, w):
        """Positional embedding for an (h, w) patch grid, resized bicubically as DINO does (+0.1 trick)."""
        n = self.pos_embed.shape[1] - 1
        if h * w == n and h == w:
            return self.pos_embed
        m = int(math.sqrt(n))
        grid = rearrange(self.pos_embed[:, 1:], "1 (m n) d -> 1 d m n", m=m)
        # DINO scales by (h + 0.1) / m instead of asking for size (h, w): the +0.1 avoids a floating-point
        # off-by-one, and the scale factor (not the size) sets the sampling grid, so results match DINO's.
        grid = F.interpolate(grid.float(), scale_factor=((h + 0.1) / m, (w + 0.1) / m), mode="bicubic",
                             align_corners=False).to(self.pos_embed.dtype)
        assert grid.shape[-2:] == (h, w), f"positional embedding resized to {tuple(grid.shape[-2:])}, not {(h, w)}"
        return torch.cat([self.pos_embed[:, :1], rearrange(grid, "1 d h w -> 1 (h w) d")], dim=1)

    def prepare_tokens(self, x):
        B, _, H, W = x.shape
        p = self.patch_size
        if H % p or W % p:
            raise ValueError(f"input size {H}x{W} is not a multiple of the patch size {p}")
        x = rearrange(self.patch_embed.proj(x), "b d h w -> b (h w) d")  # (B, N, D), raster order
        x = torch.cat([self.cls_token.expand(B, -1, -1), x], dim=1)  # (B, 1+N, D)
        return x + self.interpolate_pos_encoding(H // p, W // p)

    def forward_features(self, x, which=None):
        """One pass: CLS and patch outputs, plus the last block's q/k/v per head (Eq. 21) or its final tokens.

        which: None, 'q', 'k' or 'v' (tokens (B, heads, 1+N, head_dim)), or 'last' (tokens (B, 1, 1+N, D), the
        final normed tokens, Table 6's `last`).
        """
        if which not in (None, "q", "k", "v", "last"):
            raise ValueError(f"which={which!r}: expected None, 'q', 'k', 'v' or 'last'")
        grid = (x.shape[-2] // self.patch_size, x.shape[-1] // self.patch_size)
        x = self.prepare_tokens(x)
        for blk in self.blocks:
            x, qkv = blk(x)  # qkv of the last block survives the loop: Z^(B-2) W^{q,k,v} (Eq. 21)
        x = self.norm(x)
        tokens = None
        if which == "last":
            tokens = x.unsqueeze(1)
        elif which is not None:
            tokens = qkv["qkv".index(which)]
        return ViTFeatures(cls=x[:, 0], patch=x[:, 1:], tokens=tokens, grid=grid)

    def forward(self, x):
        return self.forward_features(x).cls

    def get_intermediate_layers(self, x, n=1):
        """Outputs of the last n blocks, each through the final norm (DINO's definition): list of (B, 1+N, D)."""
        x = self.prepare_tokens(x)
        out = []
        for i, blk in enumerate(self.blocks):
            x, _ = blk(x)
            if i >= len(self.blocks) - n:
                out.append(self.norm(x))
        return out

    def dense_features(self, x, n_last_blocks=1):
        """(B, n*D, h, w): the last n blocks through the final norm, CLS dropped, concatenated on channels: the
        features of the evaluations (App. C)."""
        h, w = x.shape[-2] // self.patch_size, x.shape[-1] // self.patch_size
        layers = self.get_intermediate_layers(x, n_last_blocks)
        feats = torch.cat([t[:, 1:] for t in layers], dim=-1)  # (B, N, n*D)
        return rearrange(feats, "b (h w) d -> b d h w", h=h, w=w)

    def get_last_selfattention(self, x):
        """Attention maps of the last block: (B, heads, 1+N, 1+N); row 0 is the CLS attention."""
        x = self.prepare_tokens(x)
        for blk in self.blocks[:-1]:
            x, _ = blk(x)
        return self.blocks[-1].attn.attention_map(self.blocks[-1].norm1(x))


def _init_weights(m):
    """DINO's init: trunc-normal(0.02) Linear weights, zero biases, unit LayerNorms."""
    if isinstance(m, nn.Linear):
        nn.init.trunc_normal_(m.weight, std=0.02)
        if m.bias is not None:
            nn.init.zeros_(m.bias)
    elif isinstance(m, nn.LayerNorm):
        nn.init.ones_(m.weight)
        nn.init.zeros_(m.bias)


# (embed_dim, depth, heads). vit_nano is not the paper's (nor DINO's): a 4-block, 96-d ViT for CPU runs on the
# synthetic scenes, about 1/12 of ViT-Ti's compute per token.
ARCHS = {"vit_nano": (96, 4, 3), "vit_tiny": (192, 12, 3), "vit_small": (384, 12, 6), "vit_base": (768, 12, 12)}


def build_vit(arch, patch_size=16, **kwargs):
    if arch not in ARCHS:
        raise ValueError(f"--arch {arch!r}: expected one of {sorted(ARCHS)}")
    dim, depth, heads = ARCHS[arch]
    return VisionTransformer(patch_size=patch_size, embed_dim=dim, depth=depth, num_heads=heads, **kwargs)


def vit_tiny(patch_size=16, **kwargs):
    return build_vit("vit_tiny", patch_size, **kwargs)


def vit_small(patch_size=16, **kwargs):
    return build_vit("vit_small", patch_size, **kwargs)


def vit_base(patch_size=16, **kwargs):
    return build_vit("vit_base", patch_size, **kwargs)


# --------------------------------------------------------------------------------------------------------------
# Projection head (Sec. 4.1): DINO's head with a second last layer for the centroids
# --------------------------------------------------------------------------------------------------------------
class WeightNormLinear(nn.Module):
    """Linear layer without bias, weight = g * v / ||v|| per output row.

    Written out (rather than torch.nn.utils.weight_norm) so that the parameters keep the names `weight_g` and
    `weight_v` that every DINO and CrOC checkpoint uses.
    """

    def __init__(self, in_dim, out_dim, fix_norm=True):
        super().__init__()
        v = nn.Linear(in_dim, out_dim, bias=False).weight.detach()  # nn.Linear's default init, as in DINO
        self.weight_v = nn.Parameter(v.clone())
        self.weight_g = nn.Parameter(torch.ones(out_dim, 1))
        self.weight_g.requires_grad = not fix_norm  # norm_last_layer: the rows keep unit norm

    def forward(self, x):
        weight = self.weight_g * F.normalize(self.weight_v, dim=1)
        return F.linear(x, weight)


class CrOCHead(nn.Module):
    """MLP (in -> 2048 -> 2048 -> 256; hidden_dim sets the 2048), L2-normalise, then one of two weight-normalised
    last layers, the only weights the image-level and centroid heads do not share (Sec. 4.1):
    `last_layer` (L-bar = out_dim, image level, Eq. 5) or `last_layer_c` (L = out_dim_c, centroids, Eq. 3).

    use_bn: DINO's `--use_bn_in_head` option, not the paper's (off in DINO's and CrOC's runs, App. B): a BatchNorm
    after each hidden linear layer, HeadBatchNorm below."""

    def __init__(self, in_dim, out_dim=65536, out_dim_c=8192, hidden_dim=2048, bottleneck_dim=256, nlayers=3,
                 norm_last_layer=False, use_bn=False):
        super().__init__()
        dims = [in_dim] + [hidden_dim] * (nlayers - 1)
        layers = []
        for a, b in zip(dims[:-1], dims[1:]):
            layers += [nn.Linear(a, b)] + ([HeadBatchNorm(b)] if use_bn else []) + [nn.GELU()]
        layers.append(nn.Linear(dims[-1], bottleneck_dim))
        self.mlp = nn.Sequential(*layers)  # keys mlp.0, mlp.2, mlp.4 as in DINO (with BN: mlp.0, 1, 3, 4, 6)
        self.mlp.apply(_init_weights)
        self.last_layer = WeightNormLinear(bottleneck_dim, out_dim, norm_last_layer)
        self.last_layer_c = WeightNormLinear(bottleneck_dim, out_dim_c, norm_last_layer)

    def forward(self, x, centroids=False):
        """x: (..., in_dim): the images' CLS tokens, or the kept centroids (the BatchNorms take their statistics
        over every row given)."""
        x = F.normalize(self.mlp(x), dim=-1)
        return self.last_layer_c(x) if centroids else self.last_layer(x)


# DINO's `--use_bn_in_head` option (not in the paper): the BatchNorm of the head, for the centroids too
class HeadBatchNorm(nn.BatchNorm1d):
    """The BatchNorm1d of DINO's `--use_bn_in_head`, its statistics summed over the ranks (differentiably, as
    SyncBatchNorm, which DINO uses on GPUs), so that they are the same with any number of processes, on CPU as on
    GPU; SyncBatchNorm has no CPU kernel. The images and the centroids go through it as two batches, each
    normalised over its own rows; the centroids' batch is the kept centroids of both views (Eq. 16), as in the
    official code, which indexes them out before its head. A rank may bring no row at all: the others' rows
    give the statistics, and with none anywhere the mean and variance are 0, not NaN.
    In one process it is nn.BatchNorm1d (a test checks): mean and biased variance of the batch in training mode,
    the running ones updated with the unbiased variance, and used in eval mode. Computed in fp32, as cuDNN's
    batch norm does for fp16 inputs."""

    def forward(self, x):
        if not self.training:  # the running statistics, per row whatever x's leading shape
            return super().forward(x.reshape(-1, x.shape[-1])).reshape(x.shape)
        rows = x.reshape(-1, x.shape[-1]).float()  # (n, C)
        n = _sum_over_ranks(rows.new_full((), len(rows))).clamp(min=1)
        mean = _sum_over_ranks(rows.sum(dim=0)) / n
        centred = rows - mean
        var = _sum_over_ranks(centred.square().sum(dim=0)) / n  # biased, as BatchNorm normalises
        with torch.no_grad():
            m = self.momentum
            self.running_mean.mul_(1 - m).add_(m * mean)
            self.running_var.mul_(1 - m).add_(m * var * n / (n - 1).clamp(min=1))  # unbiased, as BatchNorm keeps
            self.num_batches_tracked.add_(1)
        y = torch.addcmul(self.bias, centred, self.weight / torch.sqrt(var + self.eps))  # centred / std * w + b
        return y.to(x.dtype).reshape(x.shape)


def _sum_over_ranks(t):
    """Sum over the ranks with a gradient (each rank's loss depends on every rank's rows through the statistics)."""
    return dist_nn.all_reduce(t) if world_size() > 1 else t


# --------------------------------------------------------------------------------------------------------------
# View centroids (Eq. 2) and the student-teacher pair (Sec. 3.2)
# --------------------------------------------------------------------------------------------------------------
def view_centroids(patch, cls, plan):
    """Centroids of each view (Eq. 2: C^T = Z^T Q*), L2-normalised and rescaled to the mean CLS norm.

    patch: (2B, N, D) final tokens, view 1 then view 2; cls: (2B, D); plan: Q* split view-wise (2, B, N, K), the
    heads' clusters side by side on K (Sec. 3.3.3). Returns (2, B, K, D). As in the official code, the centroids
    get the norm of an average CLS token so that the shared head sees inputs of the scale it sees for images; a
    pruned or padded (zero) column gives a zero centroid, which train_step leaves out of the heads.
    """
    c = clustering.centroids(patch, rearrange(plan, "v b n k -> (v b) n k"))  # (2B, K, D) Eq. 2
    return cls.norm(dim=-1).mean() * F.normalize(rearrange(c, "(v b) k d -> v b k d", v=2), dim=-1)


class CrOCModel(nn.Module):
    """Backbone + head, with the state-dict keys (`backbone.*`, `head.*`) of the official checkpoints."""

    def __init__(self, backbone, head):
        super().__init__()
        self.backbone = backbone
        self.head = head

    def forward(self, x, plan=None, kept=None):
        """x: (2B, 3, H, W), view 1 then view 2. -> image logits (2, B, L) (Eq. 5) and, given the teacher's
        Q* split view-wise (2, B, N, K) and the (image, slot) indices of its n kept centroids (Eq. 16), (n,) each,
        the logits of the kept centroids of both views (2, n, L_c) (Eq. 2-3), else None."""
        f = self.backbone.forward_features(x)
        img = rearrange(self.head(f.cls), "(v b) l -> v b l", v=2)
        if plan is None:
            return img, None
        image, slot = kept
        centroids = view_centroids(f.patch, f.cls, plan)  # (2, B, K, D)
        return img, self.head(centroids[:, image, slot], centroids=True)


def build_student_teacher(arch, patch_size, out_dim, out_dim_c, head_hidden_dim, norm_last_layer, use_bn_in_head,
                          drop_path_rate):
    """The student g_s and the teacher g_t (Sec. 3.2): each a ViT and the shared head, with the same initial weights
    (DINO); the teacher has no stochastic depth (drop_path_rate is the student's) and gets no gradient."""
    def make(drop_path):
        backbone = build_vit(arch, patch_size, drop_path_rate=drop_path)
        return CrOCModel(backbone, CrOCHead(backbone.embed_dim, out_dim, out_dim_c, hidden_dim=head_hidden_dim,
                                            norm_last_layer=norm_last_layer, use_bn=use_bn_in_head))
    student, teacher = make(drop_path_rate), make(0.0)
    teacher.load_state_dict(student.state_dict())
    teacher.requires_grad_(False)
    return student, teacher


# --------------------------------------------------------------------------------------------------------------
# The CrOC objective (Eq. 3-7)
# --------------------------------------------------------------------------------------------------------------
def teacher_distribution(logits, center, temp):
    """P_t = softmax((logits - center) / temp): Eq. 3 and 5's tempered softmax after DINO's centring (Caron et al.
    2021; the paper does not write it), and its entropy per row (nats), for the collapse diagnostics."""
    log_p = F.log_softmax((logits - center) / temp, dim=-1)
    p = log_p.exp()
    return p, -(p * log_p).sum(-1)


def cross_view_entropy(student_logits, teacher_p, temp):
    """H(P_t2, P_s1) + H(P_t1, P_s2) per row (Eq. 4, 6): each view's student against the other view's teacher.

    student_logits and teacher_p are (2, ..., L), view 1 then view 2; teacher_p has no gradient.
    """
    log_q = F.log_softmax(student_logits / temp, dim=-1)  # log P_s
    return -(teacher_p.flip(0) * log_q).sum(-1).sum(0)


class CrOCLoss(nn.Module):
    """L_glob and L_dense of Eq. 7 (train_step adds them, the second weighted by alpha), each a cross-view
    cross-entropy between a centred, sharpened teacher and the student (Eq. 3-6), with one running centre per
    head (image and centroids).

    As DINO's DINOLoss: out_dim and out_dim_c are L-bar and L; the teacher's temperature rises linearly from
    warmup_teacher_temp to teacher_temp over the first warmup_teacher_temp_epochs of nepochs, then stays
    (tau_t, Eq. 3, 5); student_temp is tau_s; center_momentum is the momentum of both centres (DINO's centring)."""

    def __init__(self, out_dim, out_dim_c, warmup_teacher_temp, teacher_temp, warmup_teacher_temp_epochs, nepochs,
                 student_temp, center_momentum):
        super().__init__()
        self.student_temp, self.center_momentum = student_temp, center_momentum
        self.register_buffer("center", torch.zeros(1, out_dim))
        self.register_buffer("center_c", torch.zeros(1, out_dim_c))
        warm = min(warmup_teacher_temp_epochs, nepochs)
        self.teacher_temps = np.concatenate([np.linspace(warmup_teacher_temp, teacher_temp, warm),
                                             np.full(nepochs - warm, teacher_temp)])

    def forward(self, s_img, t_img, s_cen, t_cen, epoch):
        """s_img, t_img: (2, B, L); s_cen, t_cen: (2, n, Lc), this rank's n kept centroids (Eq. 16) of both views,
        or None.

        Returns (loss_glob, loss_dense). The dense loss averages over every kept centroid of the whole batch, all
        ranks together: this rank's sum is divided by the global count and multiplied by the world size, so that
        DDP's gradient average gives the exact global mean however many centroids each rank keeps. (Eq. 4 writes
        1/K per image; the official code averages over the kept centroids of the batch, per rank.) An image
        whose clusters were all pruned adds nothing, a rank that kept none adds 0, and a batch with none
        anywhere gives 0, not NaN.
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
        n = t_cen.shape[1]
        count = all_reduce(t_cen.new_full((), n))  # kept centroids on all ranks: sum and count, never a mean of means
        tc, tc_entropy = teacher_distribution(t_cen, self.center_c, temp)
        ce = cross_view_entropy(s_cen, tc, self.student_temp)  # (n,): H(P_t2, P_s1) + H(P_t1, P_s2)
        loss_dense = 0.5 * ce.sum() / count.clamp(min=1) * world_size()  # Eq. 4
        self.stats["teacher_entropy_c"] = (tc_entropy.mean(0).sum() / max(n, 1)).detach()  # averaged over the views
        batch_center_c = all_reduce(t_cen.sum(dim=(0, 1)).unsqueeze(0))  # (1, Lc) the kept centroids of both views
        new_c = self.center_c * self.center_momentum + batch_center_c / (2 * count).clamp(min=1) * (
            1 - self.center_momentum)
        self.center_c.copy_(torch.where(count > 0, new_c, self.center_c))  # no kept centroid anywhere: keep it
        return loss_glob, loss_dense


# --------------------------------------------------------------------------------------------------------------
# One training step (Fig. 2): train.py runs it, bench.py times it
# --------------------------------------------------------------------------------------------------------------
def train_step(student, teacher, loss_fn, views, positions, epoch, generator, autocast, *, alpha, which_features,
               cluster_settings):
    """One CrOC step up to the loss (Fig. 2). views: (B, 2, 3, S, S); positions: (B, 2, N, 2). -> loss, stats.

    alpha: the weight of the dense loss (Eq. 7; 0 is plain DINO, and the clustering is skipped); which_features:
    the teacher's tokens to cluster ('q', 'k', 'v' of the last block, Eq. 21, or 'last', Table 6);
    cluster_settings: the clustering's hyper-parameters, any object with the attributes clustering.CLUSTER_SETTINGS
    (a PretrainConfig, train.py's flags). generator draws the clusters' seeds; autocast: the mixed-precision
    context (nullcontext() for fp32).

    The parts are labelled with torch.profiler.record_function (free when no profiler runs; bench.py reads
    them). The heads and the dense loss see the kept centroids only (Eq. 16), as in the official code.
    """
    x = rearrange(views, "b v c h w -> (v b) c h w")  # both views in one pass: view 1 then view 2
    with autocast:
        with torch.no_grad():
            with record_function("teacher forward"):
                tf = teacher.backbone.forward_features(x, which=which_features if alpha > 0 else None)
                t_img = rearrange(teacher.head(tf.cls), "(v b) l -> v b l", v=2)
            plan = valid = kept = res = t_cen = None
            if alpha > 0:
                with record_function("clustering"):
                    plan, valid, res = clustering.cluster_views(tf.tokens, positions, cluster_settings, generator)
                    # The step's one host synchronisation (nonzero): the heads' batch is the n kept centroids,
                    # a number only the clustering's result knows. The official code indexes them out too.
                    kept = valid.nonzero(as_tuple=True)  # (image, slot) of each kept centroid, (n,) each
                with record_function("teacher centroid head"):
                    image, slot = kept
                    t_cen = teacher.head(view_centroids(tf.patch, tf.cls, plan)[:, image, slot],
                                         centroids=True)  # Eq. 2-3: (2, n, Lc)
        with record_function("student forward"):
            s_img, s_cen = student(x, plan, kept)  # the same Q* pools the student's tokens (Eq. 2)
    with record_function("loss"):
        loss_glob, loss_dense = loss_fn(s_img.float(), t_img.float(), None if s_cen is None else s_cen.float(),
                                        None if t_cen is None else t_cen.float(), epoch)
        loss = loss_glob + alpha * loss_dense  # Eq. 7
    stats = {"loss": loss.detach(), "loss_glob": loss_glob.detach(), "loss_dense": loss_dense.detach(),
             **loss_fn.stats}
    if res is not None:
        kept = valid.sum(dim=1).float()  # kept centroids per image, all heads
        stats.update(mean_k=res.k.float().mean(), kept_centroids=kept.mean(),
                     share_images_no_centroid=(kept == 0).float().mean())
    return loss, stats


# --------------------------------------------------------------------------------------------------------------
# DINO's optimisation: AdamW groups, per-parameter clipping, last-layer freeze, teacher EMA
# --------------------------------------------------------------------------------------------------------------
def param_groups(model):
    """Weight decay on weights only, not on biases and norms (DINO)."""
    decay, no_decay = [], []
    for name, p in model.named_parameters():
        if p.requires_grad:
            (no_decay if p.ndim <= 1 or name.endswith(".bias") else decay).append(p)
    return [{"params": decay}, {"params": no_decay, "weight_decay": 0.0}]


def clip_gradients(model, clip):
    for p in model.parameters():
        if p.grad is not None:
            norm = p.grad.norm()
            p.grad.mul_(torch.clamp(clip / (norm + 1e-6), max=1.0))  # per parameter, as DINO; no host sync


def optimizer_step(student, teacher, optimizer, scaler, loss, epoch, momentum, *, clip_grad, freeze_last_layer):
    """Backward, optional clipping, last-layer freeze, AdamW step, then the teacher's EMA update (DINO).

    momentum: the teacher's EMA momentum at this step; clip_grad: the largest gradient norm of each parameter (0:
    no clipping); freeze_last_layer: the epochs during which the heads' last layers get no update."""
    optimizer.zero_grad(set_to_none=True)
    with record_function("backward"):
        scaler.scale(loss).backward()
    if clip_grad > 0:
        scaler.unscale_(optimizer)
        clip_gradients(student, clip_grad)
    if epoch < freeze_last_layer:
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


# --------------------------------------------------------------------------------------------------------------
# The paper's pretraining settings (Sec. 4.1, App. B): train.py's defaults, and what bench.py and the tests run
# --------------------------------------------------------------------------------------------------------------
@dataclasses.dataclass
class PretrainConfig:
    """The settings that the networks, the loss and the step read, at the paper's values: Sec. 4.1, and App. B,
    which lists DINO's COCO run (its footnote 4: "CrOC uses the same setting"). train.py's parser takes its
    defaults from here. Where the paper gives no value, the comment names whose value it is."""
    # networks (Sec. 4.1)
    arch: str = "vit_small"  # ViT-S/16
    patch_size: int = 16
    img_size: int = 224  # both views, DINO's global crops (App. B: local_crops_number 0)
    out_dim: int = 65536  # L-bar, the image-level head (Sec. 4.1)
    out_dim_c: int = 8192  # L, the centroid head (Sec. 4.1)
    head_hidden_dim: int = 2048  # DINO's head: "identical to that of [6]" (Sec. 4.1)
    norm_last_layer: bool = False  # App. B
    use_bn_in_head: bool = False  # App. B
    momentum_teacher: float = 0.996  # App. B; cosine to 1 (DINO)
    drop_path_rate: float = 0.1  # App. B: the student's stochastic depth
    # the dense loss and the clustering (Sec. 3.3, 4.1)
    alpha: float = 1.0  # Eq. 7: "the same weight is given to the dense and global loss" (Sec. 4.1)
    which_features: str = "v"  # the last block's values (Eq. 21; Sec. 4.1, the COCO runs)
    k_start: int = 12  # K_start (Sec. 4.1)
    k_max: Optional[int] = None  # the largest K the selection may pick; None: k_start (official code: 4, K_start 5)
    lambda_pos: float = 4.0  # Eq. 18 (Sec. 4.1, COCO; 3 on ImageNet and in the ablations)
    sinkhorn_lambda: float = 20.0  # lambda of Eq. 11 (Sec. 4.1)
    sinkhorn_iterations: int = 5  # the official code's (the paper gives none)
    marginal_temp: float = 2.0  # the official code's temperature of r and c (Eq. 10 has none)
    uniform_marginals: bool = False  # False: r from the CLS token (Sec. 3.3), c by Eq. 10
    # temperatures and centring (Eq. 3, 5)
    warmup_teacher_temp: float = 0.04  # App. B
    teacher_temp: float = 0.07  # tau_t = tau-bar_t (Sec. 4.1, App. B)
    warmup_teacher_temp_epochs: int = 30  # App. B
    student_temp: float = 0.1  # tau_s = tau-bar_s (Sec. 4.1)
    center_momentum: float = 0.9  # DINO's
    # optimisation: DINO's (Sec. 4.1, App. B)
    precision: str = "fp16"  # App. B: use_fp16 true
    batch_size_per_gpu: int = 128  # Sec. 4.1: a batch of 256 over 2 GPUs
    epochs: int = 300  # Sec. 4.1, App. B
    lr: float = 5e-4  # App. B, for a batch of 256 (scaled linearly, DINO)
    min_lr: float = 1e-5  # App. B
    warmup_epochs: int = 10  # App. B
    weight_decay: float = 0.04  # App. B; cosine to weight_decay_end
    weight_decay_end: float = 0.4  # App. B
    clip_grad: float = 0.0  # App. B (official code: 3.0)
    freeze_last_layer: int = 1  # App. B
    global_crops_scale: Tuple[float, float] = (0.25, 1.0)  # App. B


# --------------------------------------------------------------------------------------------------------------
# Plumbing: distributed runs (torchrun), checkpoint loading, the scripts' shared flags, dense features
# --------------------------------------------------------------------------------------------------------------
def init_distributed(timeout_minutes=30.0, backend="auto"):
    """-> (rank, world_size, local_rank, device) from torchrun's environment (a plain `python` run is one
    process). backend auto: gloo on CPU, nccl on GPU. Training and the linear probe share it.

    timeout_minutes bounds every collective: a rank that dies is noticed in seconds (torchrun tears the group
    down), but a rank that is alive and silent (stopped, deadlocked, stuck on a file system) only when a
    collective waits this long for it."""
    if "RANK" not in os.environ or int(os.environ.get("WORLD_SIZE", 1)) == 1:
        return 0, 1, 0, torch.device("cuda" if torch.cuda.is_available() else "cpu")
    rank, world, local = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"]), int(os.environ["LOCAL_RANK"])
    if torch.cuda.is_available():
        local = local % torch.cuda.device_count()  # more ranks than GPUs: they share them (gloo; nccl may refuse)
        torch.cuda.set_device(local)
        device = torch.device("cuda", local)
    else:
        device = torch.device("cpu")
    if not dist.is_initialized():
        if backend == "auto":
            backend = "nccl" if device.type == "cuda" else "gloo"
        dist.init_process_group(backend, timeout=datetime.timedelta(minutes=timeout_minutes))
    return rank, world, local, device


def all_reduce(t):
    """Sum over the ranks in place (DDP training); the tensor itself in one process."""
    if dist.is_initialized():
        dist.all_reduce(t)
    return t


def world_size():
    return dist.get_world_size() if dist.is_initialized() else 1


# Loading checkpoints: DINO's and CrOC's releases, DINO and official CrOC training checkpoints, this project's, timm,
# Hugging Face and Lightning weights; from a path or a URL
class Release(NamedTuple):
    url: str
    file: str  # its name in torch.hub's cache (the CrOC URLs end in a number)
    arch: str
    patch_size: int


# The authors' released weights (the official CrOC README, DINO's README); hubconf.py's entry points
RELEASES = {
    "croc_vits16_coco": Release("https://rdr.kuleuven.be/api/access/datafile/31383", "croc_vits16_coco.pth",
                                "vit_small", 16),
    "croc_vits16_cocoplus": Release("https://rdr.kuleuven.be/api/access/datafile/31400",
                                    "croc_vits16_cocoplus.pth", "vit_small", 16),
    "croc_vits16_in1k": Release("https://rdr.kuleuven.be/api/access/datafile/28925", "croc_vits16_in1k.pth",
                                "vit_small", 16),
    "dino_vits16": Release("https://dl.fbaipublicfiles.com/dino/dino_deitsmall16_pretrain/"
                           "dino_deitsmall16_pretrain.pth", "dino_deitsmall16_pretrain.pth", "vit_small", 16),
    "dino_vits8": Release("https://dl.fbaipublicfiles.com/dino/dino_deitsmall8_pretrain/"
                          "dino_deitsmall8_pretrain.pth", "dino_deitsmall8_pretrain.pth", "vit_small", 8),
    "dino_vitb16": Release("https://dl.fbaipublicfiles.com/dino/dino_vitbase16_pretrain/"
                           "dino_vitbase16_pretrain.pth", "dino_vitbase16_pretrain.pth", "vit_base", 16),
}


def _print(*args):
    """Print on rank 0 only (torchrun sets RANK), so DDP evaluation and training logs are not doubled."""
    if int(os.environ.get("RANK", 0)) == 0:
        print(*args)


def local_weights(weights):
    """A path as it is; a URL (http, https, file) downloaded once into torch.hub's cache (TORCH_HOME), as
    torch.hub.load_state_dict_from_url does, but read afterwards by read_checkpoint (weights_only=True, any format
    here). Processes that start together download it once: the first holds a lock on it."""
    if "://" not in weights:
        if not os.path.isfile(weights):
            raise data.MissingInput(f"checkpoint not found: {weights}")
        return weights
    url = urllib.parse.urlparse(weights)
    if url.scheme not in ("http", "https", "file"):
        raise data.InputError(f"{weights}: only http, https and file URLs are downloaded")
    name = next((r.file for r in RELEASES.values() if r.url == weights), os.path.basename(url.path))
    if not name:
        raise data.InputError(f"{weights}: the URL names no file")
    folder = os.path.join(torch.hub.get_dir(), "checkpoints")
    os.makedirs(folder, exist_ok=True)
    path = os.path.join(folder, name)
    with open(path + ".lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)  # released when the file closes, or by the kernel if the process dies
        if not os.path.isfile(path):
            _print(f"downloading {weights} to {path}")
            try:  # a temporary file, renamed when complete
                torch.hub.download_url_to_file(weights, path, progress=int(os.environ.get("RANK", 0)) == 0)
            except (OSError, ValueError) as e:  # urllib's URLError and HTTPError are OSErrors
                raise data.MissingInput(f"could not download {weights}: {e}") from e
    return path


def torch_load(path, mmap=False):
    """torch.load with weights_only=True, allowing only the one class official checkpoints need (their args).

    A failure (data.InputError) says what went wrong: a missing, empty, truncated or foreign file, or a pickle that
    asks to run code, which weights_only refuses (only then is the pickle untrusted). mmap: map a zip checkpoint's
    tensors instead of reading them (a quick look at its args)."""
    if not os.path.isfile(path):
        raise data.MissingInput(f"checkpoint not found: {path}")
    if os.path.getsize(path) == 0:
        raise data.InputError(f"checkpoint {path} is empty (0 bytes): its write was interrupted, or it is not a "
                              f"checkpoint")
    with open(path, "rb") as f:
        magic = f.read(4)
    # torch.save writes a zip archive; its legacy format (and torch < 1.6) is a pickle, protocol byte 0x80 first
    if magic != b"PK\x03\x04" and magic[:1] != b"\x80":
        raise data.InputError(f"{path} is not a PyTorch checkpoint: neither a zip archive nor a pickle "
                              f"(it starts with {magic!r})")
    try:
        with torch.serialization.safe_globals([argparse.Namespace]):
            return torch.load(path, map_location="cpu", weights_only=True, mmap=mmap and magic == b"PK\x03\x04")
    except pickle.UnpicklingError as e:
        if "Weights only load failed" in str(e):  # the reason is the paragraph naming the refused global
            reason = next((line for line in str(e).splitlines() if "GLOBAL" in line or "Unsupported" in line), "")
            raise data.InputError(f"refused to load checkpoint {path} with weights_only=True: its pickle asks for "
                                  f"something other than tensors and plain containers, and untrusted pickles are "
                                  f"not executed. {reason}") from e
        raise data.InputError(f"checkpoint {path} is a corrupt pickle: {e}") from e
    except (RuntimeError, EOFError) as e:
        what = "truncated or corrupt" if "zip archive" in str(e) or isinstance(e, EOFError) else "unreadable"
        raise data.InputError(f"checkpoint {path} ({os.path.getsize(path)} bytes) is {what}: "
                              f"{str(e).splitlines()[0] if str(e) else type(e).__name__}") from e
    except Exception as e:
        raise data.InputError(f"could not load checkpoint {path}: {type(e).__name__}: {e}") from e


def read_checkpoint(path, mmap=False):
    """A checkpoint file: a torch.save pickle (torch_load) or a safetensors file (timm's and the Hugging Face
    weights), which needs the safetensors package; croc does not depend on it."""
    if not os.path.isfile(path):
        raise data.MissingInput(f"checkpoint not found: {path}")
    with open(path, "rb") as f:
        head = f.read(9)
    # safetensors: an 8-byte little-endian header length, then the JSON header; torch.save: a zip or a pickle
    if not path.endswith(".safetensors") and (head[:4] == b"PK\x03\x04" or head[:1] == b"\x80" or head[8:9] != b"{"):
        return torch_load(path, mmap)
    try:
        from safetensors.torch import load_file
    except ImportError:
        raise data.InputError(f"{path} is a safetensors file: reading it needs the safetensors package "
                              f"(pip install safetensors)") from None
    try:
        return load_file(path, device="cpu")
    except Exception as e:
        raise data.InputError(f"{path}: unreadable safetensors file: {type(e).__name__}: {e}") from e


def _is_state_dict(obj):
    return isinstance(obj, dict) and len(obj) > 0 and all(torch.is_tensor(v) for v in obj.values())


def _pick_state_dict(ckpt, key, path):
    """The state dict to load: ckpt[key] for training checkpoints (DINO's, CrOC's, ours), the checkpoint itself for
    bare weights, ckpt['state_dict'] of a Lightning checkpoint (Leopart's), its `key.` entries if it has any, or
    ckpt['model'] (timm's and DeiT's training scripts)."""
    if _is_state_dict(ckpt):
        return ckpt
    if not isinstance(ckpt, dict):
        raise data.InputError(f"{path}: expected a dict, found {type(ckpt).__name__}")
    if key in ckpt and _is_state_dict(ckpt[key]):
        return ckpt[key]
    for container in ("state_dict", "model"):
        if _is_state_dict(ckpt.get(container)):
            sd = ckpt[container]
            inner = {k[len(key) + 1:]: v for k, v in sd.items() if k.startswith(key + ".")}
            return inner or sd
    options = [k for k, v in ckpt.items() if _is_state_dict(v)]
    raise data.InputError(f"{path} has no state dict under key {key!r}; keys holding state dicts: {options} "
                          f"(pass one with --checkpoint_key)")


# Hugging Face transformers' ViTModel names (facebook/dino-vits16) -> timm's; q, k and v are one qkv here
_TRANSFORMERS_NAMES = {"embeddings.cls_token": "cls_token", "embeddings.position_embeddings": "pos_embed",
                       "embeddings.patch_embeddings.projection.": "patch_embed.proj.", "layernorm.": "norm.",
                       "layernorm_before.": "norm1.", "layernorm_after.": "norm2.",
                       "attention.output.dense.": "attn.proj.", "intermediate.dense.": "mlp.fc1.",
                       "output.dense.": "mlp.fc2."}


def _from_transformers(sd):
    out, qkv = {}, {}
    for k, v in sd.items():
        k = k[len("vit."):] if k.startswith("vit.") else k
        k = k.replace("encoder.layer.", "blocks.")
        part = next((p for p in ("query", "key", "value") if f".attention.attention.{p}." in k), None)
        if part:  # blocks.i.attention.attention.query.weight -> blocks.i.attn.qkv.weight, rows (q, k, v)
            qkv.setdefault(k.replace(f"attention.attention.{part}.", "attn.qkv."), {})[part] = v
            continue
        for old, new in _TRANSFORMERS_NAMES.items():
            if k.startswith(old) or f".{old}" in k:
                k = k.replace(old, new, 1)
                break
        out[k] = v
    for k, parts in qkv.items():
        out[k] = torch.cat([parts["query"], parts["key"], parts["value"]])  # "(three h d)", as Attention reads it
    return out


def _normalise_keys(sd):
    """Strip DDP's `module.`, rename Hugging Face names and convert weight-norm variants of the head's last layers to
    weight_g/weight_v."""
    if any(k.endswith("embeddings.cls_token") for k in sd):
        sd = _from_transformers(sd)
    out = {}
    for k, v in sd.items():
        k = k.replace("module.", "", 1) if k.startswith("module.") else k
        k = k.replace(".parametrizations.weight.original0", ".weight_g")  # new torch weight-norm API
        k = k.replace(".parametrizations.weight.original1", ".weight_v")
        out[k] = v
    for k in [k for k in out if k.endswith(("last_layer.weight", "last_layer_c.weight"))]:
        w = out.pop(k)  # a plain Linear weight: v = w, g = ||w|| per row reproduces it exactly
        out[k[: -len("weight")] + "weight_v"] = w
        out[k[: -len("weight")] + "weight_g"] = w.norm(dim=1, keepdim=True)
    return out


def _backbone_keys(sd, path):
    """The backbone's entries, its prefix (`backbone.`, Lightning's `model.`, ...) stripped and the heads dropped
    (timm's classifier `head.`, DINO's and CrOC's heads): what a VisionTransformer loads."""
    prefixes = sorted({k[: -len("cls_token")] for k in sd if k.endswith("cls_token")})
    if len(prefixes) > 1:
        raise data.InputError(f"{path} holds several backbones (prefixes {prefixes}): pick one with "
                              f"--checkpoint_key")
    p = prefixes[0] if prefixes else ""
    return {k[len(p):]: v for k, v in sd.items() if k.startswith(p) and not k[len(p):].startswith("head.")}


def checkpoint_state_dict(ckpt, key, path):
    return _normalise_keys(_pick_state_dict(ckpt, key, path))


def stored_args(ckpt):
    """The training flags a checkpoint holds: DINO and official CrOC store an argparse.Namespace, train.py a dict."""
    stored = ckpt.get("args") if isinstance(ckpt, dict) else None
    if isinstance(stored, argparse.Namespace):
        return vars(stored)
    return dict(stored) if isinstance(stored, dict) else {}


def checkpoint_arch(ckpt, sd, path):
    """(arch, patch_size) of a checkpoint: its stored training args when it has them (DINO's `deit_small` is
    vit_small), else read off the backbone's shapes (bare weights); (None, None) when it holds no ViT."""
    stored = stored_args(ckpt)
    if "arch" in stored and "patch_size" in stored:
        arch = str(stored["arch"]).replace("deit_", "vit_")
        if arch not in ARCHS:
            raise data.InputError(f"{path}: its training args name arch {stored['arch']!r}; this code builds "
                                  f"{sorted(ARCHS)}")
        return arch, int(stored["patch_size"])
    sd = _backbone_keys(sd, path)
    if "patch_embed.proj.weight" not in sd:
        return None, None
    dim, _, patch, _ = sd["patch_embed.proj.weight"].shape  # (D, 3, p, p)
    depth = len({k.split(".")[1] for k in sd if k.startswith("blocks.")})
    arch = next((a for a, (d, n, _) in ARCHS.items() if (d, n) == (dim, depth)), None)
    if arch is None:
        raise data.InputError(f"{path}: a ViT of width {dim} and depth {depth}, none of {sorted(ARCHS)}")
    return arch, patch


def resolve_arch(arch, patch_size, found, weights):
    """The architecture to build: the checkpoint's (found), else vit_small/16 (the paper's); an arch or patch size
    given that contradicts the checkpoint is a data.InputError naming both values."""
    for flag, given, stored in zip(("--arch", "--patch_size"), (arch, patch_size), found):
        if given is not None and stored is not None and given != stored:
            raise data.InputError(f"{flag} {given} contradicts {weights}, a {found[0]}/{found[1]} checkpoint (its "
                                  f"training args, or its shapes): pass {flag} {stored}, or other weights")
    def first(*values):
        return next(v for v in values if v is not None)
    return first(arch, found[0], "vit_small"), first(patch_size, found[1], 16)


def checkpoint_arch_of(weights, key="teacher"):
    """(arch, patch_size) of a checkpoint (path or URL) at the cost of a look: zip checkpoints are memory-mapped."""
    path = local_weights(weights)
    ckpt = read_checkpoint(path, mmap=True)
    return checkpoint_arch(ckpt, checkpoint_state_dict(ckpt, key, path), path)


def _load_state_dict(model, sd, what):
    """Load sd into a VisionTransformer (its backbone entries) or a CrOCModel -> {'missing', 'unexpected'}."""
    if isinstance(model, CrOCModel):
        if not any(k.startswith(("backbone.", "head.")) for k in sd):
            sd = {"backbone." + k: v for k, v in _backbone_keys(sd, what).items()}  # the head stays as initialised
    else:
        sd = _backbone_keys(sd, what)  # the heads' keys are left aside (they are not "unexpected")
    own = model.state_dict()
    for k, v in sd.items():
        if k in own and own[k].shape != v.shape:
            raise data.InputError(f"{what}: shape mismatch for {k}: checkpoint {tuple(v.shape)}, model "
                                  f"{tuple(own[k].shape)} (wrong --arch or --patch_size?)")
    result = model.load_state_dict(sd, strict=False)
    missing, unexpected = list(result.missing_keys), list(result.unexpected_keys)
    if missing or unexpected:
        _print(f"loaded {what}: {len(missing)} missing keys {missing[:8]}, "
               f"{len(unexpected)} unexpected keys {unexpected[:8]}")
    else:
        _print(f"loaded {what}: all {len(sd)} keys matched")
    return {"missing": missing, "unexpected": unexpected}


def load_pretrained(model, weights, key="teacher"):
    """Load any supported checkpoint (a path or a URL) into a VisionTransformer or a CrOCModel.

    Reads (a) a bare backbone state dict (DINO's released weights; timm's names; Hugging Face's, renamed; .pth or
    .safetensors), (b) a DINO or official CrOC training checkpoint (`student`/`teacher` dicts, `module.`/`backbone.`
    prefixes, argparse.Namespace args, old weight-norm keys), (c) this project's checkpoints (the same layout),
    (d) a Lightning checkpoint (Leopart's: `state_dict` of `model.` entries). Returns {'missing', 'unexpected'}.
    """
    path = local_weights(weights)
    return _load_state_dict(model, checkpoint_state_dict(read_checkpoint(path), key, path), f"{path} [{key}]")


def read_backbone(weights, key="teacher", arch=None, patch_size=None):
    """-> (state dict, arch, patch_size): a checkpoint's weights and the architecture to build for them
    (resolve_arch: the checkpoint's; arch or patch_size given and contradicting it: data.InputError)."""
    path = local_weights(weights)
    ckpt = read_checkpoint(path)
    sd = checkpoint_state_dict(ckpt, key, path)
    return (sd,) + resolve_arch(arch, patch_size, checkpoint_arch(ckpt, sd, path), weights)


def load_backbone_weights(vit, sd, what):
    """Load a checkpoint's backbone into vit, every key of which it must hold (else data.InputError)."""
    missing = _load_state_dict(vit, sd, what)["missing"]
    if missing:
        raise data.InputError(f"{what}: {len(missing)} of the {len(vit.state_dict())} keys of the backbone are "
                              f"not in the checkpoint, e.g. {missing[:4]}")


def load_backbone(arch=None, patch_size=None, weights=None, checkpoint_key="teacher"):
    """A frozen backbone for evaluation, of the checkpoint's architecture (read_backbone); random init (DINO's)
    of arch (default vit_small/16) when weights is None."""
    if weights:
        sd, arch, patch_size = read_backbone(weights, checkpoint_key, arch, patch_size)
    else:
        arch, patch_size = resolve_arch(arch, patch_size, (None, None), None)
    model = build_vit(arch, patch_size)
    if weights:
        load_backbone_weights(model, sd, f"{weights} [{checkpoint_key}]")
    else:
        _print(f"{arch}/{patch_size}: random initialisation")
    model.eval()
    model.requires_grad_(False)
    return model


# Flags the scripts share, and the evaluations' dense features
def bool_flag(s):
    """argparse type of a true/false flag (DINO's utils.bool_flag)."""
    if s.lower() in ("true", "1", "yes", "on"):
        return True
    if s.lower() in ("false", "0", "no", "off"):
        return False
    raise argparse.ArgumentTypeError(f"expected a boolean, got {s!r}")


def add_backbone_args(parser, source=None):
    """The flags of a frozen backbone (backbone_from_args): --weights (alias DINO's --pretrained_weights) or
    --random_init, --checkpoint_key, --arch, --patch_size. source: the (mutually exclusive) group --weights and
    --random_init go to; default: parser."""
    source = parser if source is None else source
    source.add_argument("--weights", "--pretrained_weights", dest="weights", default=None, type=str,
                        help="Checkpoint to evaluate, a path or a URL (downloaded once to torch.hub's cache): our "
                             "training checkpoints, official CrOC/DINO ones, bare, timm or Hugging Face state dicts "
                             "(.pth, or .safetensors with the safetensors package), Lightning checkpoints (anything "
                             "model.load_pretrained reads). README: the released checkpoints' URLs.")
    parser.add_argument("--checkpoint_key", default="teacher", type=str,
                        help="Which network of a training checkpoint to read (default: teacher, as DINO/CrOC).")
    source.add_argument("--random_init", action="store_true",
                        help="A randomly initialised backbone (DINO's init) instead of --weights: a lower bound.")
    parser.add_argument("--arch", default=None, choices=sorted(ARCHS),
                        help="Backbone architecture. Default: the checkpoint's (its training args, else its "
                             "shapes); vit_small (the paper's ViT-S/16) with --random_init.")
    parser.add_argument("--patch_size", default=None, type=int,
                        help="Patch size. Default: the checkpoint's; 16 (the paper's) with --random_init.")


def resolve_backbone_args(args):
    """Check the backbone flags and fill --arch and --patch_size from the checkpoint (resolve_arch), so that the
    checks and config.json that come before the backbone is loaded see them."""
    if args.random_init == (args.weights is not None):
        raise data.InputError("pass exactly one of --weights PATH_OR_URL and --random_init")
    found = checkpoint_arch_of(args.weights, args.checkpoint_key) if args.weights else (None, None)
    args.arch, args.patch_size = resolve_arch(args.arch, args.patch_size, found, args.weights)
    return args


def backbone_from_args(args):
    """The frozen backbone that the evaluation flags ask for: exactly one of --weights PATH_OR_URL (with
    --checkpoint_key) and --random_init, plus --arch and --patch_size (default: the checkpoint's)."""
    if args.arch is None or args.patch_size is None or args.random_init == (args.weights is not None):
        resolve_backbone_args(args)
    return load_backbone(args.arch, args.patch_size, args.weights, args.checkpoint_key)


@torch.no_grad()
def dense_features(model, images, n_last_blocks=1):
    """(B, n*D, h, w): the last n blocks through the final norm, CLS dropped, concatenated on channels
    (VisionTransformer.dense_features, without gradients)."""
    return model.dense_features(images, n_last_blocks)
