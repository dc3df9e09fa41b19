"""The test suite: CPU, tiny synthetic inputs, seconds per test; the torchrun tests spawn 2 processes.

    python -m pytest -q test_croc.py

The paper's tests come first, in the paper's order:
  1. the clusterer (Sec. 3.3): seeds and marginals (Eq. 8, 10), Sinkhorn (Eq. 11-13), the merge (Eq. 14), the
     choice of K, the hard assignment and the pruning (Eq. 15-16), `cluster` as a whole, the positional cost
     (Eq. 17-18);
  2. the views with positions (Sec. 3.3.2, data.TwoViews);
  3. the objective and the training step (Sec. 3.2, Eq. 1-7): view centroids, CrOCLoss, train_step, the head;
  4. the ViT (Sec. 3.3.3, Eq. 19-21): timm names, the last block's q/k/v.
Then the machinery that the rest uses (TINY, the one tiny training configuration; `run`, the script runner;
`early`, the end-to-end runs started in the background), and the rest: 5. the evaluations (metrics, eval_linear,
eval_kmeans, eval_davis), 6. visualize.py, 7. bench.py and repro.sh, 8. checkpoint loading, 9. data plumbing,
10. the repository's imports and defaults, 11. training reliability (resume, signals, torchrun, bad input),
12. CUDA. A reference implementation or a fixture writer sits beside the tests that use it; the few that several
sections use sit beside most of their users (the folder writers `_write_image`, `_voc_fixture` in 9, the
in-process training run `_train_here` in 11).
"""
from concurrent.futures import ThreadPoolExecutor
from contextlib import nullcontext, redirect_stderr, redirect_stdout
from pathlib import Path
import argparse
import copy
import csv
import dataclasses
import fcntl
import inspect
import io
import json
import math
import multiprocessing
import os
import random
import resource
import runpy
import shutil
import signal
import socket
import subprocess
import sys
import time
import traceback
import warnings

from PIL import Image
from einops import rearrange, reduce
from torchvision.transforms import InterpolationMode
import numpy as np
import pytest
import torch
import torch.nn.functional as F

from clustering import ClusterResult, centroids, cluster, sinkhorn
from model import CrOCHead, CrOCModel, build_vit
import clustering
import data
import eval_davis as ed
import eval_kmeans
import eval_linear
import metrics
import model as M
import synthetic
import bench
import train
import visualize


ROOT = Path(__file__).resolve().parent  # the repository: scripts run from here


# ==============================================================================================================
# 1. The clusterer (Sec. 3.3, clustering.py)
# ==============================================================================================================
def grouped_tokens(n_problems, groups_view1, groups_view2, d=16, noise=0.05, seed=0):
    """Tokens of orthogonal groups with small noise: view 1 holds `groups_view1` labels, view 2 `groups_view2`.

    Returns tokens (P, 2N, d), positions (P, 2N, 2) at random, labels (P, 2N); views are shuffled per problem.
    """
    gen = torch.Generator().manual_seed(seed)
    n_groups = int(max(groups_view1.max(), groups_view2.max())) + 1
    directions = torch.linalg.qr(torch.randn(n_problems, d, n_groups, generator=gen))[0].transpose(1, 2)
    labels = torch.stack([torch.cat([groups_view1[torch.randperm(len(groups_view1), generator=gen)],
                                     groups_view2[torch.randperm(len(groups_view2), generator=gen)]])
                          for _ in range(n_problems)])  # (P, 2N)
    tokens = torch.gather(directions, 1, labels[..., None].expand(-1, -1, d))
    tokens = tokens + noise * torch.randn(tokens.shape, generator=gen)
    positions = 224 * torch.rand(n_problems, labels.shape[1], 2, generator=gen)
    return tokens, positions, labels


def same_partition(assignment, labels):
    """(P,) bool: the hard assignment groups tokens exactly as labels do (up to renaming)."""
    predicted = assignment.argmax(dim=-1)
    same_pred = predicted[:, :, None] == predicted[:, None, :]
    same_true = labels[:, :, None] == labels[:, None, :]
    return (same_pred == same_true).flatten(1).all(dim=1)


def assert_valid_result(result, n_problems, n, k_start, k_max):
    assert isinstance(result, ClusterResult)
    assert result.assignment.shape == (n_problems, n, k_max)
    assert result.valid.shape == (n_problems, k_max) and result.valid.dtype == torch.bool
    assert result.k.shape == (n_problems,) and result.k.dtype == torch.long
    assert result.d_c.shape == (n_problems, k_start - 1)
    assert torch.isfinite(result.assignment).all() and torch.isfinite(result.d_c).all()
    assert ((result.assignment == 0) | (result.assignment == 1)).all()
    assert (result.assignment.sum(-1) <= 1).all()  # one cluster per token at most (pruned: none)
    assert ((2 <= result.k) & (result.k <= k_max)).all()
    beyond_k = torch.arange(k_max) >= result.k[:, None]
    assert not (result.valid & beyond_k).any()
    assert (result.assignment.sum(1)[~result.valid] == 0).all()  # pruned / unused columns are empty


# --------------------------------------------------------------------------------------------------------------
# seeds and the marginals r, c (Eq. 8, 10)
# --------------------------------------------------------------------------------------------------------------
def test_sample_seeds_draws_distinct_tokens_following_the_cls_marginal():
    """Seeds follow r: tokens the CLS token points at are picked far more often; never twice in one problem."""
    d, n = 8, 40
    cls = torch.zeros(1, d)
    cls[0, 0] = 1.0
    tokens = torch.randn(1, n, d, generator=torch.Generator().manual_seed(0))
    tokens[0, :10, 0] = 50.0  # cos ~ 1 with the CLS token; the rest ~ 0
    s = clustering.cls_similarity(torch.nn.functional.normalize(tokens, dim=-1), cls)
    r = clustering.token_marginal(s, 0.05)
    picks = clustering.sample_seeds(r.expand(200, -1), 5, torch.Generator().manual_seed(0))  # (200, 5)
    assert (picks.sort(1).values.diff(dim=1) > 0).all()
    assert (picks < 10).float().mean() > 0.95


def test_token_marginal_with_per_view_cls_compares_each_view_with_its_own_cls():
    torch.manual_seed(0)
    joint = torch.nn.functional.normalize(torch.randn(3, 10, 8), dim=-1)
    cls = torch.randn(3, 2, 8)
    r = clustering.token_marginal(clustering.cls_similarity(joint, cls), temperature=2.0)
    c1, c2 = torch.nn.functional.normalize(cls, dim=-1).unbind(1)
    sim = torch.cat([joint[:, :5] @ c1.unsqueeze(-1), joint[:, 5:] @ c2.unsqueeze(-1)], 1).squeeze(-1)
    torch.testing.assert_close(r, torch.softmax(sim / 2.0, dim=-1))
    # one CLS shared by both views is the special case of identical per-view CLS tokens
    same = clustering.cls_similarity(joint, cls[:, :1].expand(3, 2, 8))
    torch.testing.assert_close(same, clustering.cls_similarity(joint, cls[:, 0]))


def test_centroid_marginal_is_the_softmax_of_the_seeds_raw_cls_similarity():
    """Eq. 10 as the official code computes it: c = softmax(Y^T s / T) on the raw similarities s, far from uniform
    when they differ (softmax(Y^T r) on the softmaxed r would be uniform to four decimals); uniform marginals
    are s = 0."""
    gen = torch.Generator().manual_seed(15)
    joint = torch.nn.functional.normalize(torch.randn(4, 392, 16, generator=gen), dim=-1)  # 2N of ViT-S/16 224
    cls = torch.randn(4, 2, 16, generator=gen)
    joint[:, :5] = torch.nn.functional.normalize(cls[:, :1], dim=-1)  # 5 tokens identical to view 1's CLS: s = 1
    s = clustering.cls_similarity(joint, cls)
    seeds = torch.stack([torch.tensor([0, 70, 140, 210, 280, 350])] * 4)  # token 0 has s = 1, the others ~ 0
    y = clustering.seed_matrix(seeds, 392, torch.float32)
    c = clustering.centroid_marginal(y, s, 2.0)
    torch.testing.assert_close(c, torch.softmax(torch.gather(s, 1, seeds) / 2.0, -1))
    assert (c.amax(1) / c.amin(1) > 1.3).all()  # s spans ~1: max/min ~ e^(1/2)
    literal = clustering.centroid_marginal(y, clustering.token_marginal(s, 2.0), 2.0)  # Eq. 10 read on r
    assert (literal.amax(1) / literal.amin(1) < 1.001).all()  # uniform to three decimals: it would do nothing
    merged = torch.cat([(y[:, :, :1] + y[:, :, 1:2]) / 2, y[:, :, 2:]], -1)  # Eq. 14 averages Y's columns
    want = torch.softmax(torch.cat([(s[:, :1] + s[:, 70:71]) / 2, s[:, 140::70]], 1) / 2.0, -1)
    torch.testing.assert_close(clustering.centroid_marginal(merged, s, 2.0), want)
    uniform = clustering.centroid_marginal(y, torch.zeros_like(s), 2.0)
    torch.testing.assert_close(uniform, torch.full_like(uniform, 1 / 6))


def test_cluster_uses_the_cls_similarity_for_c_and_uniform_marginals_without_it():
    """`cluster` feeds Sinkhorn c = softmax(Y^T s / T); with --uniform_marginals every Sinkhorn sees uniform r, c."""
    gen = torch.Generator().manual_seed(16)
    tokens, positions = torch.randn(2, 30, 8, generator=gen), 50 * torch.rand(2, 30, 2, generator=gen)
    cls = torch.randn(2, 8, generator=gen)
    seen = []
    original = clustering.sinkhorn
    clustering.sinkhorn = lambda cost, r, c, *a: (seen.append((r, c)), original(cost, r, c, *a))[1]
    try:
        cluster(tokens, positions, cls, k_start=5, seeds=torch.tensor([[0, 1, 2, 3, 4]] * 2))
        cluster(tokens, positions, cls, k_start=5, seeds=torch.tensor([[0, 1, 2, 3, 4]] * 2), uniform_marginals=True)
    finally:
        clustering.sinkhorn = original
    s = clustering.cls_similarity(torch.nn.functional.normalize(tokens, dim=-1), cls)
    r, c = seen[0]
    torch.testing.assert_close(r, torch.softmax(s / 2.0, -1))
    torch.testing.assert_close(c, torch.softmax(s[:, :5] / 2.0, -1))
    for r, c in seen[4:]:
        torch.testing.assert_close(r, torch.full_like(r, 1 / 30))
        torch.testing.assert_close(c, torch.full_like(c, 1 / c.shape[1]))


def test_cluster_uniform_marginals_ignore_cls():
    gen = torch.Generator().manual_seed(9)
    tokens = torch.randn(3, 30, 8, generator=gen)
    positions = 50 * torch.rand(3, 30, 2, generator=gen)
    seeds = torch.randint(0, 30, (3, 5), generator=gen)
    with_cls = cluster(tokens, positions, torch.randn(3, 8, generator=gen), k_start=5, seeds=seeds,
                       uniform_marginals=True)
    without = cluster(tokens, positions, None, k_start=5, seeds=seeds)
    for a, b in zip(with_cls, without):
        assert torch.equal(a, b)


# --------------------------------------------------------------------------------------------------------------
# sinkhorn (Eq. 11-13)
# --------------------------------------------------------------------------------------------------------------
def entropic_ot_reference(cost, r, c, lam, n_iter=5000):
    """Entropic OT plan argmin <Q, cost> - H(Q) / lam over U(r, c), by dual (log-domain) iteration in float64."""
    cost, r, c = cost.double(), r.double(), c.double()
    f = torch.zeros_like(r)
    g = torch.zeros_like(c)
    for _ in range(n_iter):
        f = r.log() - torch.logsumexp(g[:, None, :] - lam * cost, dim=2)
        g = c.log() - torch.logsumexp(f[:, :, None] - lam * cost, dim=1)
    return (f[:, :, None] + g[:, None, :] - lam * cost).exp()


def test_sinkhorn_plan_has_requested_marginals_after_many_iterations():
    gen = torch.Generator().manual_seed(0)
    cost = torch.rand(3, 40, 6, generator=gen, dtype=torch.float64)
    r = torch.softmax(torch.randn(3, 40, generator=gen, dtype=torch.float64), -1)
    c = torch.softmax(torch.randn(3, 6, generator=gen, dtype=torch.float64), -1)
    plan, transport = sinkhorn(cost, r, c, lam=20.0, n_iter=500)
    torch.testing.assert_close(plan.sum(2), r, atol=1e-9, rtol=0)
    torch.testing.assert_close(plan.sum(1), c, atol=1e-12, rtol=0)
    torch.testing.assert_close(transport, (plan * cost).sum((1, 2)))


def test_sinkhorn_plan_equals_entropic_ot_solution():
    gen = torch.Generator().manual_seed(1)
    cost = torch.rand(2, 12, 4, generator=gen, dtype=torch.float64)
    r = torch.softmax(torch.randn(2, 12, generator=gen, dtype=torch.float64), -1)
    c = torch.softmax(torch.randn(2, 4, generator=gen, dtype=torch.float64), -1)
    for lam in (5.0, 20.0):
        plan, _ = sinkhorn(cost, r, c, lam=lam, n_iter=2000)
        torch.testing.assert_close(plan, entropic_ot_reference(cost, r, c, lam), atol=1e-10, rtol=1e-7)


def sinkhorn_scaling_vectors(cost, r, c, lam, n_iter):
    """Sinkhorn in its scaling-vector form: every rescaling of the whole matrix keeps P = diag(u) K diag(v),
    K = exp(-lam * cost), so a round updates only u and v (two matrix-vector products) and P is formed at the end."""
    kernel = torch.exp(-lam * cost)
    u = 1.0 / kernel.sum(dim=(1, 2))[:, None].expand(-1, cost.shape[1])  # P /= sum(P)
    v = torch.ones_like(c)
    for _ in range(n_iter):
        u = r / (kernel @ v[:, :, None]).squeeze(2)  # rows sum to r: u_i (K v)_i = r_i
        v = c / (u[:, None, :] @ kernel).squeeze(1)  # columns sum to c: v_j (K^T u)_j = c_j
    plan = u[:, :, None] * kernel * v[:, None, :]
    return plan, (plan * cost).sum((1, 2))


def test_sinkhorn_rescaling_the_whole_matrix_equals_its_scaling_vector_form():
    """The literal rescaling of rows and columns (Eq. 11-12) gives the numbers of the diag(u) K diag(v) form, plan
    and d_c (official defaults: 5 rounds), also at the largest lambda a float32 cost allows."""
    gen = torch.Generator().manual_seed(2)
    cost = torch.rand(4, 30, 5, generator=gen)
    r = torch.softmax(torch.randn(4, 30, generator=gen), -1)
    c = torch.softmax(torch.randn(4, 5, generator=gen), -1)
    for lam in (20.0, clustering.max_sinkhorn_lambda(torch.float32)):
        for n_iter in (0, 1, 5):
            plain = torch.exp(-lam * cost)  # the textbook iteration, written out
            plain = plain / plain.sum((1, 2), keepdim=True)
            for _ in range(n_iter):
                plain = plain * (r / plain.sum(2))[:, :, None]
                plain = plain * (c / plain.sum(1))[:, None, :]
            want_plan, want_d_c = sinkhorn_scaling_vectors(cost, r, c, lam, n_iter)
            plan, d_c = sinkhorn(cost, r, c, lam=lam, n_iter=n_iter)
            torch.testing.assert_close(plan, plain, atol=1e-7, rtol=1e-4)
            torch.testing.assert_close(d_c, (plain * cost).sum((1, 2)), atol=1e-6, rtol=1e-4)
            torch.testing.assert_close(plan, want_plan, atol=1e-7, rtol=1e-4)
            torch.testing.assert_close(d_c, want_d_c, atol=1e-6, rtol=1e-4)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_sinkhorn_stays_finite_for_every_cost_the_clusterer_gives_it(dtype):
    """`cluster` min-max normalises its cost to [0, 1]: random, degenerate and one-hot costs, at the paper's lambda
    and at the largest lambda allowed for the dtype, give finite plans with exact column marginals."""
    gen = torch.Generator().manual_seed(3)
    far = torch.zeros(1, 50, 8)
    far[0, :, 3] = 1.0  # a column far worse than all others for every row
    one_hot = torch.zeros(1, 50, 8)
    one_hot[0, 7, 2] = 1.0  # the span of a cost with a single non-minimal entry
    cost = torch.cat([torch.rand(1, 50, 8, generator=gen), far, one_hot, torch.zeros(1, 50, 8)]).to(dtype)
    r = torch.softmax(torch.randn(4, 50, generator=gen) * 3, -1).to(dtype)
    c = torch.softmax(torch.randn(4, 8, generator=gen), -1).to(dtype)
    for lam in (20.0, clustering.max_sinkhorn_lambda(dtype)):
        for n_iter in (0, 5, 50):
            plan, transport = sinkhorn(cost, r, c, lam=lam, n_iter=n_iter)
            assert torch.isfinite(plan).all() and torch.isfinite(transport).all()
            assert (plan >= 0).all()
            if n_iter > 0:  # the last round scales the columns
                torch.testing.assert_close(plan.sum(1), c)
    torch.testing.assert_close(plan[3], r[3, :, None] * c[3, None, :])  # uniform cost: r c^T


def test_sinkhorn_rejects_a_lambda_whose_kernel_underflows():
    cost, r, c = torch.rand(1, 10, 3), torch.full((1, 10), 0.1), torch.full((1, 3), 1 / 3)
    with pytest.raises(ValueError, match="lambda"):
        sinkhorn(cost, r, c, lam=50.0)  # exp(-50) and its square are not normal float32 numbers
    sinkhorn(cost.double(), r.double(), c.double(), lam=50.0)  # they are in float64
    with pytest.raises(ValueError, match="sinkhorn_lambda"):
        cluster(torch.randn(1, 10, 4), torch.rand(1, 10, 2), k_start=3, sinkhorn_lambda=50.0)


def test_sinkhorn_rejects_mismatched_marginals():
    with pytest.raises(ValueError, match="r must be"):
        sinkhorn(torch.rand(2, 10, 3), torch.rand(2, 9), torch.rand(2, 3))
    with pytest.raises(ValueError, match="c must be"):
        sinkhorn(torch.rand(2, 10, 3), torch.rand(2, 10), torch.rand(1, 3))


def pot_sinkhorn_knopp(a, b, cost, reg, n_iter=2000):
    """POT's `ot.sinkhorn(a, b, M, reg)` (method 'sinkhorn', `sinkhorn_knopp`) for one problem, as that library
    writes it: u, v start at 1/n and 1/k; each round scales v to b, then u to a; plan = diag(u) K diag(v)."""
    kernel = torch.exp(-cost / reg)
    u, v = torch.full_like(a, 1 / len(a)), torch.full_like(b, 1 / len(b))
    for _ in range(n_iter):
        v = b / (kernel.T @ u)
        u = a / (kernel @ v)
    return u[:, None] * kernel * v[None, :]


def test_sinkhorn_equals_pot_sinkhorn_at_convergence():
    """Within 1e-4 of POT's `ot.sinkhorn` with reg = 1 / lambda, on costs in [0, 1]; when POT is installed, the
    library itself is compared too (it is not a dependency)."""
    gen = torch.Generator().manual_seed(14)
    cost = torch.rand(3, 40, 7, generator=gen, dtype=torch.float64)
    r = torch.softmax(torch.randn(3, 40, generator=gen, dtype=torch.float64), -1)
    c = torch.softmax(torch.randn(3, 7, generator=gen, dtype=torch.float64), -1)
    plan, _ = sinkhorn(cost, r, c, lam=20.0, n_iter=2000)
    try:
        import ot
    except ImportError:
        ot = None
    for p in range(3):
        torch.testing.assert_close(plan[p], pot_sinkhorn_knopp(r[p], c[p], cost[p], 1 / 20.0), atol=1e-4, rtol=0)
        if ot is not None:
            want = ot.sinkhorn(r[p].numpy(), c[p].numpy(), cost[p].numpy(), 1 / 20.0, numItermax=10000,
                               stopThr=1e-12)
            torch.testing.assert_close(plan[p], torch.from_numpy(want), atol=1e-4, rtol=0)


# --------------------------------------------------------------------------------------------------------------
# merge_closest (Eq. 14)
# --------------------------------------------------------------------------------------------------------------
def test_merge_closest_averages_the_most_similar_pair_and_removes_the_second():
    """Against a direct per-problem reference: rows/columns i and j (i < j, the highest cosine) are averaged
    into i, j is removed, the other rows keep their order."""
    gen = torch.Generator().manual_seed(6)
    for k in (2, 3, 7, 12):
        cents = torch.randn(5, k, 4, generator=gen, dtype=torch.float64)
        y = torch.rand(5, 20, k, generator=gen, dtype=torch.float64)
        merged_c, merged_y = clustering.merge_closest(cents, y)
        assert merged_c.shape == (5, k - 1, 4) and merged_y.shape == (5, 20, k - 1)
        for p in range(5):
            unit = F.normalize(cents[p], dim=-1)
            pairs = [(unit[a] @ unit[b], a, b) for a in range(k) for b in range(a + 1, k)]
            _, i, j = max(pairs, key=lambda t: t[0])
            keep = [m for m in range(k) if m != j]
            ref_c, ref_y = cents[p].clone(), y[p].clone()
            ref_c[i], ref_y[:, i] = (cents[p, i] + cents[p, j]) / 2, (y[p, :, i] + y[p, :, j]) / 2
            torch.testing.assert_close(merged_c[p], ref_c[keep], atol=1e-15, rtol=0)
            torch.testing.assert_close(merged_y[p], ref_y[:, keep], atol=1e-15, rtol=0)


def merge_by_matrix(cents, y):
    """Eq. 14 as one linear map (P, K - 1, K): row i averages old rows i and j, every other new row copies one old
    row in order, skipping j; left-multiply C by it, right-multiply Y by its transpose. The pair as merge_closest."""
    k = cents.shape[1]
    unit = F.normalize(cents, dim=-1)
    similarity = torch.einsum("pkd,pld->pkl", unit, unit).masked_fill(torch.ones(k, k, dtype=torch.bool).tril(),
                                                                      float("-inf"))
    pair = similarity.flatten(1).argmax(dim=1)
    i, j = torch.div(pair, k, rounding_mode="floor"), pair % k
    new, old = torch.arange(k - 1), torch.arange(k)
    copy = ((new + (new >= j[:, None]))[:, :, None] == old).to(cents.dtype)  # (P, K - 1, K) one-hot
    mean = ((old == i[:, None]) | (old == j[:, None])).to(cents.dtype) / 2  # (P, K): (e_i + e_j) / 2
    mix = torch.where((new == i[:, None])[:, :, None], mean[:, None, :], copy)
    return torch.einsum("pmk,pkd->pmd", mix, cents), torch.einsum("pnk,pmk->pnm", y, mix)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_merge_closest_equals_its_merge_matrix_form_with_ties(dtype):
    """The literal merge (average two rows of C and two columns of Y, remove row and column j) gives exactly the
    numbers of the one-hot merge matrix, for every K, with tied pairs (repeated centroids: the first pair in i < j
    order wins in both) and with pairs at the first and last columns."""
    gen = torch.Generator().manual_seed(7)
    for k in (2, 3, 5, 12):
        cents = torch.randn(9, k, 6, generator=gen, dtype=dtype)
        y = torch.rand(9, 30, k, generator=gen, dtype=dtype)
        cents[0, -1] = 3 * cents[0, 0]  # the pair (0, K - 1)
        if k >= 3:
            cents[1, 1], cents[1, 2] = cents[1, 0], cents[1, 0]  # tied pairs (0, 1), (0, 2), (1, 2): (0, 1) wins
            cents[2, k - 1] = cents[2, k - 2]  # the pair (K - 2, K - 1)
        if k >= 5:
            cents[3, 4], cents[3, 2], cents[3, 3] = cents[3, 1], -cents[3, 1], -cents[3, 1]  # tied (1, 4), (2, 3)
        merged_c, merged_y = clustering.merge_closest(cents, y)
        want_c, want_y = merge_by_matrix(cents, y)
        assert merged_c.dtype == dtype and merged_c.shape == (9, k - 1, 6) and merged_y.shape == (9, 30, k - 1)
        torch.testing.assert_close(merged_c, want_c, atol=0, rtol=0)
        torch.testing.assert_close(merged_y, want_y, atol=0, rtol=0)
        torch.testing.assert_close(merged_c[0, 0], 2 * cents[0, 0], atol=1e-6, rtol=1e-6)  # (c_0 + 3 c_0) / 2
        if k >= 3:
            torch.testing.assert_close(merged_y[1, :, 0], (y[1, :, 0] + y[1, :, 1]) / 2, atol=0, rtol=0)
            torch.testing.assert_close(merged_y[2, :, :k - 2], y[2, :, :k - 2], atol=0, rtol=0)
        if k >= 5:
            torch.testing.assert_close(merged_y[3, :, 1], (y[3, :, 1] + y[3, :, 4]) / 2, atol=0, rtol=0)


# --------------------------------------------------------------------------------------------------------------
# selecting K by d_c, the hard assignment M (Eq. 15), the pruning (Eq. 16), Q*
# --------------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("n_groups", [2, 3, 4, 5])
def test_cluster_recovers_well_separated_groups_spanning_both_views(n_groups):
    """k_max == R: the selection must land on K = R and the partition must be the groups, for every problem."""
    labels = torch.arange(n_groups).repeat_interleave(6)  # 6 tokens of every group in every view
    tokens, positions, truth = grouped_tokens(8, labels, labels, seed=n_groups)
    cls = torch.randn(8, 16, generator=torch.Generator().manual_seed(0))
    result = cluster(tokens, positions, cls, k_start=8, k_max=n_groups, lambda_pos=0.0,
                     generator=torch.Generator().manual_seed(n_groups))
    assert_valid_result(result, 8, 2 * len(labels), 8, n_groups)
    assert (result.k == n_groups).all()
    assert result.valid.all()
    assert same_partition(result.assignment, truth).all()


def test_cluster_with_one_seed_per_group_recovers_the_groups():
    """Seeds given, one per group: the first (and only) plan already splits the tokens along the groups."""
    labels = torch.arange(3).repeat_interleave(8)
    tokens, positions, truth = grouped_tokens(4, labels, labels, seed=7)
    seeds = torch.stack([torch.stack([(truth[p] == g).int().argmax() for g in range(3)]) for p in range(4)])
    result = cluster(tokens, positions, k_start=3, k_max=3, lambda_pos=0.0, seeds=seeds)
    assert (result.k == 3).all() and result.valid.all()
    assert same_partition(result.assignment, truth).all()


def test_cluster_pruning_drops_clusters_absent_from_one_view():
    view1 = torch.arange(3).repeat_interleave(8)  # groups 0, 1, 2
    view2 = torch.arange(2).repeat_interleave(12)  # groups 0, 1 only: group 2 is absent from view 2
    tokens, positions, truth = grouped_tokens(4, view1, view2, seed=11)
    result = cluster(tokens, positions, k_start=6, k_max=3, lambda_pos=0.0,
                     generator=torch.Generator().manual_seed(0))
    assert_valid_result(result, 4, 48, 6, 3)
    assert (result.k == 3).all()
    assert (result.valid.sum(1) == 2).all()
    assigned = result.assignment.sum(-1) > 0  # (P, 2N): token belongs to a kept cluster
    assert not assigned[truth == 2].any()
    assert assigned[truth != 2].all()
    kept = result.assignment.argmax(-1)
    for p in range(4):  # the kept clusters are exactly groups 0 and 1
        for g in (0, 1):
            assert kept[p][truth[p] == g].unique().numel() == 1
        assert kept[p][truth[p] == 0][0] != kept[p][truth[p] == 1][0]


def test_q_star_is_the_row_normalised_selected_plan_with_pruned_and_padded_columns_zero():
    """ClusterResult.q_star is Q* (end of Sec. 3.3, Eq. 16): rows sum to at most 1 (exactly 1 where no cluster was
    pruned), pruned and padded columns are zero, and its row argmax is the hard assignment M."""
    tokens, positions, _ = grouped_tokens(6, torch.tensor([0] * 8 + [1] * 8 + [2] * 4),
                                          torch.tensor([0] * 10 + [1] * 10), noise=0.3)
    res = cluster(tokens, positions, k_start=8, k_max=6, generator=torch.Generator().manual_seed(0))
    plan, m = res.q_star, res.assignment
    assert plan.shape == m.shape and (plan >= 0).all()
    assert (plan.sum(-1) <= 1 + 1e-6).all()
    assert (~res.valid).any()  # the setting prunes some clusters: the zero columns are tested
    assert (plan.sum(1)[~res.valid] == 0).all()  # pruned and beyond-K columns
    nothing_pruned = res.valid.sum(1) == res.k  # problems that keep every cluster: rows sum to exactly 1
    assert nothing_pruned.any() and (~nothing_pruned).any()
    torch.testing.assert_close(plan[nothing_pruned].sum(-1), torch.ones(int(nothing_pruned.sum()), 40))
    kept = m.sum(-1) > 0  # tokens whose cluster is kept
    assert torch.equal(plan.argmax(-1)[kept], m.argmax(-1)[kept])
    # Q* is the soft version of M: not one-hot
    assert ((plan[kept] > 0) & (plan[kept] < 0.99)).any()
    # ... and the selected Sinkhorn plan (ClusterResult.plan), rows normalised, pruned columns dropped
    beyond_k = torch.arange(6) >= res.k[:, None, None]
    assert (res.plan > 0).any() and (res.plan.masked_select(beyond_k) == 0).all()
    torch.testing.assert_close(plan, res.plan / res.plan.sum(-1, keepdim=True) * res.valid[:, None, :])


# --------------------------------------------------------------------------------------------------------------
# cluster as a whole: batched problems, determinism, dtypes, bad arguments, centroids, no host syncs
# --------------------------------------------------------------------------------------------------------------
def test_cluster_of_p_problems_equals_p_separate_calls():
    gen = torch.Generator().manual_seed(6)
    n_problems, n, d, k_start = 5, 40, 8, 6
    tokens = torch.randn(n_problems, n, d, generator=gen)
    positions = 100 * torch.rand(n_problems, n, 2, generator=gen)
    cls = torch.randn(n_problems, d, generator=gen)
    seeds = torch.stack([torch.randperm(n, generator=gen)[:k_start] for _ in range(n_problems)])
    tokens[3] = 1 + 0.01 * tokens[3]  # a problem with a narrow cost range must not rescale the others' costs
    batched = cluster(tokens, positions, cls, k_start=k_start, k_max=4, seeds=seeds)
    for p in range(n_problems):
        single = cluster(tokens[p:p + 1], positions[p:p + 1], cls[p:p + 1], k_start=k_start, k_max=4,
                         seeds=seeds[p:p + 1])
        torch.testing.assert_close(single.d_c, batched.d_c[p:p + 1], atol=1e-5, rtol=1e-5)
        assert torch.equal(single.assignment, batched.assignment[p:p + 1])
        assert torch.equal(single.valid, batched.valid[p:p + 1])
        assert torch.equal(single.k, batched.k[p:p + 1])


def test_cluster_is_deterministic_for_the_same_generator_seed_or_seeds():
    gen = torch.Generator().manual_seed(8)
    tokens = torch.randn(4, 60, 8, generator=gen)
    positions = 100 * torch.rand(4, 60, 2, generator=gen)
    cls = torch.randn(4, 8, generator=gen)
    runs = [cluster(tokens, positions, cls, k_start=8, generator=torch.Generator().manual_seed(42)) for _ in range(2)]
    for a, b in zip(*runs):
        assert torch.equal(a, b)
    seeds = torch.randint(0, 60, (4, 8), generator=gen)
    runs = [cluster(tokens, positions, cls, k_start=8, seeds=seeds) for _ in range(2)]
    for a, b in zip(*runs):
        assert torch.equal(a, b)


@pytest.mark.parametrize("same_positions", [False, True])
def test_cluster_identical_tokens_give_a_valid_result_without_nan(same_positions):
    n_problems, n, d = 3, 20, 8
    tokens = torch.ones(n_problems, n, d)
    tokens[2] = 0.0  # zero tokens too
    positions = torch.zeros(n_problems, n, 2) if same_positions else 10 * torch.rand(n_problems, n, 2)
    result = cluster(tokens, positions, torch.ones(n_problems, d), k_start=5,
                     generator=torch.Generator().manual_seed(0))
    assert_valid_result(result, n_problems, n, 5, 5)
    assert (result.valid.sum(1) >= 1).all()


def test_cluster_k_start_equal_to_token_count_is_valid():
    gen = torch.Generator().manual_seed(10)
    result = cluster(torch.randn(2, 8, 4, generator=gen), torch.rand(2, 8, 2, generator=gen), k_start=8, k_max=4,
                     generator=gen)
    assert_valid_result(result, 2, 8, 8, 4)


def test_cluster_accepts_half_precision_tokens():
    gen = torch.Generator().manual_seed(12)
    tokens = torch.randn(2, 20, 8, generator=gen)
    positions = 30 * torch.rand(2, 20, 2, generator=gen)
    seeds = torch.randint(0, 20, (2, 5), generator=gen)
    half = cluster(tokens.half(), positions, k_start=5, seeds=seeds)
    assert half.assignment.dtype == torch.float16
    assert_valid_result(half._replace(assignment=half.assignment.float()), 2, 20, 5, 5)


def test_cluster_inside_autocast_equals_cluster_outside():
    gen = torch.Generator().manual_seed(13)
    tokens = torch.randn(3, 40, 8, generator=gen)
    positions = 300 * torch.rand(3, 40, 2, generator=gen)
    seeds = torch.randint(0, 40, (3, 6), generator=gen)
    plain = cluster(tokens, positions, k_start=6, seeds=seeds)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        autocast = cluster(tokens, positions, k_start=6, seeds=seeds)
    for a, b in zip(plain, autocast):
        assert torch.equal(a, b)


def test_cluster_rejects_bad_arguments_with_clear_errors():
    tokens, positions = torch.randn(2, 10, 4), torch.rand(2, 10, 2)
    with pytest.raises(ValueError, match="k_start"):
        cluster(tokens, positions, k_start=11)
    with pytest.raises(ValueError, match="k_start"):
        cluster(tokens, positions, k_start=1)
    with pytest.raises(ValueError, match="k_max"):
        cluster(tokens, positions, k_start=6, k_max=7)
    with pytest.raises(ValueError, match="k_max"):
        cluster(tokens, positions, k_start=6, k_max=1)
    with pytest.raises(ValueError, match="positions"):
        cluster(tokens, positions[:, :8], k_start=4)
    with pytest.raises(ValueError, match="cls"):
        cluster(tokens, positions, torch.randn(2, 5), k_start=4)
    with pytest.raises(ValueError, match="tokens"):
        cluster(tokens[:, :9], positions[:, :9], k_start=4)  # odd number of joint tokens
    with pytest.raises(ValueError, match="seeds"):
        cluster(tokens, positions, k_start=4, seeds=torch.zeros(2, 3, dtype=torch.long))
    with pytest.raises(ValueError, match="seeds"):
        cluster(tokens, positions, k_start=4, seeds=torch.full((2, 4), 10))


def test_centroids_sum_each_clusters_tokens():
    tokens = torch.arange(12.0).reshape(1, 4, 3)
    assignment = torch.tensor([[[1.0, 0], [0, 1], [1, 0], [0, 0]]])
    expected = torch.stack([tokens[0, 0] + tokens[0, 2], tokens[0, 1]])[None]
    torch.testing.assert_close(centroids(tokens, assignment), expected)
    with pytest.raises(ValueError, match="centroids"):
        centroids(tokens, assignment[:, :3])


def test_centroids_from_a_one_hot_plan_equal_the_hard_pooled_ones():
    gen = torch.Generator().manual_seed(17)
    tokens = torch.randn(3, 12, 5, generator=gen)
    labels = torch.randint(0, 4, (3, 12), generator=gen)
    one_hot = torch.nn.functional.one_hot(labels, 4).float()
    hard = torch.stack([torch.stack([tokens[p][labels[p] == k].sum(0) for k in range(4)]) for p in range(3)])
    torch.testing.assert_close(centroids(tokens, one_hot), hard)


def test_clustering_source_has_no_host_device_synchronisation():
    source = inspect.getsource(clustering)
    for forbidden in (".item(", ".tolist(", "nonzero(", ".cpu(", ".numpy(", "multinomial("):
        assert forbidden not in source, forbidden


def test_cluster_traces_whole_under_torch_compile_and_gives_the_eager_result():
    """torch.compile(cluster, fullgraph=True) traces the whole clusterer: a graph break or a host sync would stop
    the trace. On CPU too, where the seeds' range check is skipped while tracing. The eager backend traces in
    seconds (bench.py --compile times inductor's kernels)."""
    n_problems, k_start = 4, 5
    tokens, positions, _ = grouped_tokens(n_problems, torch.arange(3).repeat_interleave(4),
                                          torch.arange(3).repeat_interleave(4))
    gen = torch.Generator().manual_seed(0)
    cls = torch.randn(n_problems, 2, 16, generator=gen)
    seeds = torch.stack([torch.randperm(tokens.shape[1], generator=gen)[:k_start] for _ in range(n_problems)])
    torch._dynamo.reset()
    try:
        compiled = torch.compile(cluster, fullgraph=True, backend="eager")
        got = compiled(tokens, positions, cls, k_start=k_start, k_max=4, seeds=seeds)
    finally:
        torch._dynamo.reset()
    want = cluster(tokens, positions, cls, k_start=k_start, k_max=4, seeds=seeds)
    for name in ClusterResult._fields:
        torch.testing.assert_close(getattr(got, name), getattr(want, name), msg=name)


def test_cluster_time_per_call_at_training_size():
    """Measured, not asserted: 8 images x 6 heads, 2 x 196 tokens, head dim 64, K_start 12 (paper settings)."""
    gen = torch.Generator().manual_seed(0)
    n_problems, n, d = 8 * 6, 2 * 196, 64
    tokens = torch.randn(n_problems, n, d, generator=gen)
    positions = 224 * torch.rand(n_problems, n, 2, generator=gen)
    cls = torch.randn(n_problems, d, generator=gen)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # one thread: stable on a shared 2-core machine, where 2 OpenMP threads can thrash
    try:
        cluster(tokens, positions, cls, generator=gen)  # warm-up
        times = []
        for _ in range(3):
            start = time.perf_counter()
            result = cluster(tokens, positions, cls, generator=gen)
            times.append(time.perf_counter() - start)
    finally:
        torch.set_num_threads(threads)
    print(f"\ncluster P={n_problems} 2N={n} d={d} k_start=12: {1e3 * min(times):.1f} ms per call (best of 3, "
          f"1 thread); chosen K histogram {torch.bincount(result.k, minlength=13)[2:].tolist()} for K = 2..12")


# --------------------------------------------------------------------------------------------------------------
# the positional cost (Sec. 3.3.2, Eq. 17-18)
# --------------------------------------------------------------------------------------------------------------
def test_cluster_large_lambda_pos_makes_clusters_spatially_compact():
    gen = torch.Generator().manual_seed(5)
    n_problems, side = 4, 8
    grid = torch.stack(torch.meshgrid(torch.arange(side), torch.arange(side), indexing="xy"), -1).reshape(-1, 2)
    positions = torch.cat([16.0 * grid + 8, 12.0 * grid + 40]).expand(n_problems, -1, -1)  # overlapping views
    tokens = torch.randn(n_problems, 2 * side * side, 32, generator=gen)

    def mean_spread(lambda_pos):
        result = cluster(tokens, positions, k_start=12, lambda_pos=lambda_pos,
                         generator=torch.Generator().manual_seed(0))
        m = result.assignment  # (P, 2N, K)
        size = m.sum(1).clamp_min(1)  # (P, K)
        mean = torch.einsum("pnk,pnc->pkc", m, positions) / size[..., None]
        spread = (torch.einsum("pnk,pnk->pk", m, torch.cdist(positions, mean)) / size)[result.valid]
        return spread.mean()

    compact, free = mean_spread(lambda_pos=10.0), mean_spread(lambda_pos=0.0)
    assert compact < 0.5 * free, (compact, free)  # measured: 18 vs 43 pixels


# ==============================================================================================================
# 2. The views with positions (Sec. 3.3.2, data.TwoViews): patch positions in original-image pixels
# ==============================================================================================================
def _decode_patch_means(view, patch):
    """(C, S, S) coordinate image -> (N, C) mean per patch, raster order."""
    return reduce(view, "c (h p) (w q) -> (h w) c", "mean", p=patch, q=patch)


@pytest.mark.parametrize("interpolation", [InterpolationMode.BILINEAR, InterpolationMode.BICUBIC])
@pytest.mark.parametrize("flip", [False, True])
def test_patch_positions_equal_decoded_coordinates_of_a_coordinate_image(interpolation, flip):
    H, W = 150, 200
    ys, xs = torch.meshgrid(torch.arange(H) + 0.5, torch.arange(W) + 0.5, indexing="ij")
    coords = torch.stack([xs, ys]).float()  # (2, H, W): each pixel holds its own centre (x, y)
    views = data.TwoViews(img_size=96, patch_size=16, scale=(0.05, 1.0), interpolation=interpolation)
    for seed in range(20):
        torch.manual_seed(seed)
        view, positions = views.geometric(coords, flip=flip)
        assert positions.shape == (36, 2) and positions.dtype == torch.float32
        decoded = _decode_patch_means(view, 16)
        assert torch.allclose(decoded, positions, atol=0.05), (decoded - positions).abs().max()


@pytest.mark.parametrize("flip", [False, True])
def test_patch_positions_equal_decoded_coordinates_of_an_8bit_rgb_image(flip):
    # The training path: a PIL RGB image, R = x and G = y (integer column/row, centre = value + 0.5).
    H, W = 180, 240
    ys, xs = np.mgrid[0:H, 0:W]
    img = Image.fromarray(np.stack([xs, ys, np.zeros_like(xs)], -1).astype(np.uint8))
    views = data.TwoViews(img_size=64, patch_size=16)  # bicubic, as in training
    for seed in range(20):
        torch.manual_seed(seed)
        view, positions = views.geometric(img, flip=flip)
        arr = torch.from_numpy(np.asarray(view, dtype=np.float32)).permute(2, 0, 1)[:2] + 0.5
        decoded = _decode_patch_means(arr, 16)
        assert (decoded - positions).abs().max() < 0.6  # 8-bit rounding of each pixel


def test_patch_positions_flip_mirrors_x_inside_the_crop_box():
    box = (10, 20, 50, 80)  # top, left, height, width
    plain = data.patch_positions(box, False, 64, 16)
    flipped = data.patch_positions(box, True, 64, 16)
    assert torch.allclose(flipped[:, 0], 2 * 20 + 80 - plain[:, 0])
    assert torch.allclose(flipped[:, 1], plain[:, 1])
    # raster order: x grows along a row, y along a column; first patch centre at 1/8 of the box
    assert torch.allclose(plain[0], torch.tensor([20 + 80 / 8, 10 + 50 / 8]))
    assert plain[1, 0] > plain[0, 0] and plain[4, 1] > plain[0, 1] and plain[1, 1] == plain[0, 1]


def test_two_views_returns_normalised_views_and_positions_inside_the_image():
    img = Image.fromarray(np.random.default_rng(0).integers(0, 255, (70, 90, 3), dtype=np.uint8))
    torch.manual_seed(0)
    views, positions = data.TwoViews(img_size=64, patch_size=16)(img)
    assert views.shape == (2, 3, 64, 64) and views.dtype == torch.float32
    assert positions.shape == (2, 16, 2) and positions.dtype == torch.float32
    assert (positions[..., 0] > 0).all() and (positions[..., 0] < 90).all()
    assert (positions[..., 1] > 0).all() and (positions[..., 1] < 70).all()
    assert views.min() < -0.5 and views.max() > 0.5  # normalised, not in [0, 1]


def test_two_views_blur_radius_scales_with_the_view_size():
    def blurs(views):
        return [t for compose in views.photometric for t in compose.transforms
                if isinstance(t, data.RandomGaussianBlurPIL)]
    at_224 = blurs(data.TwoViews(img_size=224, patch_size=16))
    assert [(b.p, b.radius_min, b.radius_max) for b in at_224] == [(1.0, 0.1, 2.0), (0.1, 0.1, 2.0)]  # DINO's
    at_48 = blurs(data.TwoViews(img_size=48, patch_size=8))
    assert [(b.radius_min, b.radius_max) for b in at_48] == [pytest.approx((0.1 * 48 / 224, 2.0 * 48 / 224))] * 2
    row = np.tile(np.array([0, 255], dtype=np.uint8).repeat(3), 8)  # (48,): vertical stripes, period 6 px
    img = Image.fromarray(np.ascontiguousarray(np.broadcast_to(row[None, :, None], (48, 48, 3))))
    torch.manual_seed(0)
    blurred = np.asarray(at_48[0](img), dtype=np.float64)
    assert blurred.max() - blurred.min() > 240  # 6-px stripes keep their contrast (unscaled radius 2: 191 of 255)


def test_two_views_rejects_img_size_not_multiple_of_patch():
    with pytest.raises(ValueError, match="multiple"):
        data.TwoViews(img_size=100, patch_size=16)


# ==============================================================================================================
# 3. The objective and the training step (Sec. 3.2, Eq. 1-7, model.py)
# ==============================================================================================================
def _args(extra=()):
    parser = train.get_args_parser()
    return parser.parse_args(TINY + ["--epochs", "2"] + list(extra))


def _models(args):
    """Student and teacher as train.py builds them, without stochastic depth: a test's step is deterministic."""
    return M.build_student_teacher(args.arch, args.patch_size, args.out_dim, args.out_dim_c, args.head_hidden_dim,
                                   args.norm_last_layer, args.use_bn_in_head, drop_path_rate=0.0)


def _loss(args, out_dim, out_dim_c):
    """CrOCLoss with the flags' temperatures and centring, as train.py builds it."""
    return M.CrOCLoss(out_dim, out_dim_c, args.warmup_teacher_temp, args.teacher_temp,
                      args.warmup_teacher_temp_epochs, args.epochs, args.student_temp, args.center_momentum)


def _batch(B=2, size=64, patch=16):
    torch.manual_seed(0)
    n = (size // patch) ** 2
    views = torch.randn(B, 2, 3, size, size)
    g = torch.arange(size // patch) * patch + patch / 2
    grid = torch.stack(torch.meshgrid(g, g, indexing="xy"), -1).reshape(n, 2)
    positions = torch.stack([grid, grid + 8.0], 0).expand(B, 2, n, 2)
    return views, positions


# --------------------------------------------------------------------------------------------------------------
# view centroids (Eq. 1-2)
# --------------------------------------------------------------------------------------------------------------
def test_teacher_and_student_centroids_pool_with_the_same_plan():
    """Eq. 2: the teacher's Q* pools the teacher's and the student's final tokens; the heads see exactly those."""
    args = _args()
    student, teacher = _models(args)
    views, positions = _batch(B=3)
    seen = {}
    original = M.view_centroids

    def spy(patch, cls, plan):
        seen.setdefault("plans", []).append(plan)
        seen.setdefault("patches", []).append(patch)
        return original(patch, cls, plan)
    M.view_centroids = spy
    try:
        loss_fn = _loss(args, args.out_dim, args.out_dim_c)
        M.train_step(student, teacher, loss_fn, views, positions, 0, torch.Generator().manual_seed(0), nullcontext(),
                     alpha=args.alpha, which_features=args.which_features, cluster_settings=args)
    finally:
        M.view_centroids = original
    teacher_plan, student_plan = seen["plans"]
    assert student_plan is teacher_plan
    x = rearrange(views, "b v c h w -> (v b) c h w")
    torch.testing.assert_close(seen["patches"][0], teacher.backbone.forward_features(x).patch)
    plan, _, _ = clustering.cluster_views(teacher.backbone.forward_features(x, which=args.which_features).tokens,
                                           positions, args, torch.Generator().manual_seed(0))
    torch.testing.assert_close(teacher_plan, plan)
    assert ((plan > 0) & (plan < 0.99)).any()  # soft, not the hard M


# --------------------------------------------------------------------------------------------------------------
# CrOCLoss (Eq. 3-7)
# --------------------------------------------------------------------------------------------------------------
def test_teacher_distribution_is_the_centred_sharpened_softmax_with_its_entropy():
    gen = torch.Generator().manual_seed(1)
    logits, center = torch.randn(2, 5, 9, generator=gen), torch.randn(1, 9, generator=gen)
    p, h = M.teacher_distribution(logits, center, 0.04)
    want = torch.softmax((logits - center) / 0.04, -1)
    torch.testing.assert_close(p, want)
    torch.testing.assert_close(h, -(want * want.clamp_min(1e-30).log()).sum(-1), rtol=1e-5, atol=1e-6)


class _ClosedFormCrossViewEntropy(torch.autograd.Function):
    """The previous implementation of Eq. 4/6, kept here as the reference: H(p_2, q_1) + H(p_1, q_2) per row with
    the closed-form gradient d/d logits_v = (q_v - p_other) / temp."""

    @staticmethod
    def forward(ctx, logits, p, temp):
        log_q = torch.log_softmax(logits / temp, dim=-1)
        ctx.save_for_backward(log_q, p)
        ctx.temp = temp
        return -(p[1] * log_q[0]).sum(-1) - (p[0] * log_q[1]).sum(-1)

    @staticmethod
    def backward(ctx, grad):
        log_q, p = ctx.saved_tensors
        out = log_q.exp()
        out[0].sub_(p[1])
        out[1].sub_(p[0])
        return out.mul_((grad / ctx.temp)[..., None]), None, None


def test_cross_view_entropy_values_and_gradients_equal_the_closed_form_in_fp64():
    gen = torch.Generator().manual_seed(0)
    logits = torch.randn(2, 3, 4, 11, generator=gen, dtype=torch.float64)
    p = torch.softmax(torch.randn(2, 3, 4, 11, generator=gen, dtype=torch.float64) / 0.3, -1)
    weights = torch.rand(3, 4, generator=gen, dtype=torch.float64)  # an arbitrary upstream gradient
    plain = logits.clone().requires_grad_()
    value = M.cross_view_entropy(plain, p, 0.1)
    (value * weights).sum().backward()
    closed = logits.clone().requires_grad_()
    reference = _ClosedFormCrossViewEntropy.apply(closed, p, 0.1)
    (reference * weights).sum().backward()
    torch.testing.assert_close(value, reference, atol=1e-12, rtol=1e-12)
    torch.testing.assert_close(plain.grad, closed.grad, atol=1e-12, rtol=1e-12)
    # and each view's student is paired with the other view's teacher
    torch.testing.assert_close(value, -(p[1] * torch.log_softmax(logits[0] / 0.1, -1)).sum(-1)
                               - (p[0] * torch.log_softmax(logits[1] / 0.1, -1)).sum(-1))


def test_croc_loss_values_and_gradients_equal_the_closed_form_implementation_in_fp64():
    """The whole CrOCLoss (Eq. 4, 6, 7) against the same loss built on the previous closed-form cross-entropy."""
    args = _args()
    gen = torch.Generator().manual_seed(1)
    s_img, t_img = torch.randn(2, 3, 8, generator=gen, dtype=torch.float64), torch.randn(2, 3, 8, generator=gen,
                                                                                          dtype=torch.float64)
    s_cen, t_cen = torch.randn(2, 9, 4, generator=gen, dtype=torch.float64), torch.randn(2, 9, 4, generator=gen,
                                                                                          dtype=torch.float64)
    results = []
    for ce in (M.cross_view_entropy, _ClosedFormCrossViewEntropy.apply):
        loss_fn = _loss(args, 8, 4).double()
        si, sc = s_img.clone().requires_grad_(), s_cen.clone().requires_grad_()
        original, M.cross_view_entropy = M.cross_view_entropy, ce
        try:
            glob, dense = loss_fn(si, t_img, sc, t_cen, 0)
        finally:
            M.cross_view_entropy = original
        (glob + dense).backward()
        results.append((glob.detach(), dense.detach(), si.grad, sc.grad))
    for a, b in zip(*results):
        torch.testing.assert_close(a, b, atol=1e-12, rtol=1e-12)


def test_dense_loss_is_one_mean_over_the_kept_centroids_of_the_batch():
    """Eq. 4 on the kept centroids of the batch: one mean over all of them, not a mean of per-image means."""
    args = _args()
    loss_fn = _loss(args, 8, 4)
    s_cen, t_cen = torch.randn(2, 3, 4), torch.randn(2, 3, 4)  # 3 kept centroids (say 1 of image 0, 2 of image 1)
    _, dense = loss_fn(torch.randn(2, 2, 8), torch.randn(2, 2, 8), s_cen, t_cen, 0)
    t = torch.softmax(t_cen / loss_fn.teacher_temps[0], -1)  # centre was zero before the call
    s = torch.log_softmax(s_cen / args.student_temp, -1)
    ce = -(t[0] * s[1]).sum(-1) - (t[1] * s[0]).sum(-1)
    torch.testing.assert_close(dense, 0.5 * ce.mean())


def test_dense_loss_without_kept_centroids_is_zero_not_nan():
    args = _args()
    loss_fn = _loss(args, 8, 4)
    s_img, t_img = torch.randn(2, 3, 8), torch.randn(2, 3, 8)
    s_cen, t_cen = torch.randn(2, 0, 4, requires_grad=True), torch.randn(2, 0, 4)  # no kept centroid
    center_before = loss_fn.center_c.clone()
    glob, dense = loss_fn(s_img, t_img, s_cen, t_cen, 0)
    assert torch.isfinite(glob) and dense.item() == 0.0
    dense.backward()
    assert torch.isfinite(s_cen.grad).all()
    assert torch.equal(loss_fn.center_c, center_before)


# --------------------------------------------------------------------------------------------------------------
# train_step and the schedules
# --------------------------------------------------------------------------------------------------------------
def _one_step():
    """A tiny CrOC train_step at init -> (loss, stats, student, teacher, loss_fn, args)."""
    args = _args()
    args.k_max = args.k_start
    student, teacher = _models(args)
    loss_fn = _loss(args, args.out_dim, args.out_dim_c)
    views, positions = _batch()
    loss, stats = M.train_step(student, teacher, loss_fn, views, positions, 0, torch.Generator(), nullcontext(),
                               alpha=args.alpha, which_features=args.which_features, cluster_settings=args)
    return loss, stats, student, teacher, loss_fn, args


def test_train_step_logs_teacher_entropies_for_collapse_diagnosis():
    """H(P_t) lies in [0, log L]; the loss is H(P_t) + KL >= H(P_t) (the log's collapse diagnostics)."""
    _, stats, _, _, loss_fn, args = _one_step()
    assert 0 < stats["teacher_entropy"] <= math.log(args.out_dim) + 1e-5
    assert 0 < stats["teacher_entropy_c"] <= math.log(args.out_dim_c) + 1e-5
    assert stats["loss_glob"] >= stats["teacher_entropy"] - 1e-5
    loss_fn.center.fill_(0)
    uniform = torch.zeros(2, 3, args.out_dim)
    loss_fn(uniform, uniform, None, None, 0)
    torch.testing.assert_close(loss_fn.stats["teacher_entropy"], torch.tensor(math.log(args.out_dim)))


def test_croc_loss_is_finite_with_gradients_in_the_student_only():
    loss, stats, student, teacher, _, _ = _one_step()
    assert torch.isfinite(loss) and stats["loss_dense"] > 0 and stats["kept_centroids"] > 0
    loss.backward()
    grads = [p.grad for p in student.parameters() if p.requires_grad]
    assert all(g is not None and torch.isfinite(g).all() for g in grads)
    assert student.head.last_layer_c.weight_v.grad.abs().sum() > 0  # the dense loss reaches its head
    assert all(p.grad is None for p in teacher.parameters())


# The step as it was before the heads saw only the kept centroids, kept here as the reference: every centroid slot
# of every image through the heads, the pruned ones left out of the BatchNorm statistics by a mask and weighted 0
# in Eq. 4.
def _masked_batchnorm(bn, x, keep):
    """HeadBatchNorm in training mode (one process) with its statistics over the rows that keep marks."""
    rows = x.reshape(-1, x.shape[-1]).float()
    w = keep.reshape(1, -1).to(rows.dtype)
    n = w.sum().clamp(min=1)
    mean = (w @ rows)[0] / n
    centred = rows - mean
    var = (w @ centred.square())[0] / n
    with torch.no_grad():
        bn.running_mean.mul_(1 - bn.momentum).add_(bn.momentum * mean)
        bn.running_var.mul_(1 - bn.momentum).add_(bn.momentum * var * n / (n - 1).clamp(min=1))
        bn.num_batches_tracked.add_(1)
    return (centred / torch.sqrt(var + bn.eps) * bn.weight + bn.bias).to(x.dtype).reshape(x.shape)


def _every_slot_head(head, centroids, keep):
    x = centroids
    for layer in head.mlp:
        x = _masked_batchnorm(layer, x, keep) if isinstance(layer, M.HeadBatchNorm) else layer(x)
    return head.last_layer_c(F.normalize(x, dim=-1))


def _every_slot_step(student, teacher, loss_fn, views, positions, generator, args):
    """-> loss, loss_dense, teacher_entropy_c of a step at epoch 0 with every slot through the heads."""
    x = rearrange(views, "b v c h w -> (v b) c h w")
    with torch.no_grad():
        tf = teacher.backbone.forward_features(x, which=args.which_features)
        t_img = rearrange(teacher.head(tf.cls), "(v b) l -> v b l", v=2)
        plan, valid, _ = clustering.cluster_views(tf.tokens, positions, args, generator)
        keep = valid.expand(2, *valid.shape)  # (2, B, K): a slot is kept or pruned in both views
        t_cen = _every_slot_head(teacher.head, M.view_centroids(tf.patch, tf.cls, plan), keep)  # (2, B, K, Lc)
    f = student.backbone.forward_features(x)
    s_img = rearrange(student.head(f.cls), "(v b) l -> v b l", v=2)
    s_cen = _every_slot_head(student.head, M.view_centroids(f.patch, f.cls, plan), keep)
    loss_glob, _ = loss_fn(s_img, t_img, None, None, 0)
    w = valid.to(t_cen.dtype)  # (B, K)
    count = w.sum().clamp(min=1)
    tc, tc_entropy = M.teacher_distribution(t_cen, loss_fn.center_c, loss_fn.teacher_temps[0])
    loss_dense = 0.5 * (M.cross_view_entropy(s_cen, tc, loss_fn.student_temp) * w).sum() / count
    entropy_c = (tc_entropy.mean(0) * w).sum() / count
    m = loss_fn.center_momentum
    loss_fn.center_c.mul_(m).add_(torch.einsum("bk,vbkl->l", w, t_cen) / (2 * count), alpha=1 - m)
    return loss_glob + args.alpha * loss_dense, loss_dense.detach(), entropy_c


@pytest.mark.parametrize("use_bn", [False, True])
def test_heads_on_the_kept_centroids_equal_every_slot_through_the_heads_masked(use_bn):
    """The heads and the dense loss see only the kept centroids (Eq. 16): the same losses, gradients, centres and
    BatchNorm statistics (over the same rows) as every slot through the heads with the pruned ones masked out."""
    args = _args(["--use_bn_in_head", str(use_bn).lower()])
    args.k_max = args.k_start
    models = [m.double() for m in _models(args)]
    views, positions = _batch(B=3)
    results = []
    for kept_only in (True, False):
        student, teacher = (copy.deepcopy(m) for m in models)
        loss_fn = _loss(args, args.out_dim, args.out_dim_c).double()
        generator = torch.Generator().manual_seed(0)
        if kept_only:
            loss, stats = M.train_step(student, teacher, loss_fn, views.double(), positions, 0, generator,
                                       nullcontext(), alpha=args.alpha, which_features=args.which_features,
                                       cluster_settings=args)
            values = [loss.detach(), stats["loss_dense"], stats["teacher_entropy_c"]]
            assert 0 < stats["kept_centroids"] < 3 * args.k_max  # some slots pruned
        else:
            loss, *rest = _every_slot_step(student, teacher, loss_fn, views.double(), positions, generator, args)
            values = [loss.detach(), *rest]
        loss.backward()
        results.append((values, [p.grad for p in student.parameters() if p.grad is not None],
                        [*student.buffers(), *teacher.buffers(), *loss_fn.buffers()]))
    (values, grads, buffers), (ref_values, ref_grads, ref_buffers) = results
    torch.testing.assert_close(values, ref_values)
    assert len(grads) == len(ref_grads) > 0
    torch.testing.assert_close(grads, ref_grads)
    assert len(buffers) == len(ref_buffers) == (2 + 12 if use_bn else 2)  # 2 centres; 2 x 2 BatchNorms x 3
    torch.testing.assert_close(buffers, ref_buffers)


_KEPT_DDP = """
import sys, torch, torch.distributed as dist
from contextlib import nullcontext
import clustering, model as M, train


def two_steps(rank, world, flags):
    '''Two CrOC steps of a BatchNorm-head student (DDP on 2 ranks) on this rank's share of 4 images; in the first,
    images 2 and 3 (rank 1's) keep no centroid (a second DDP step then checks that every gradient was reduced).
    -> per step: loss, kept centroids of this rank, the student's gradients, and every buffer (BatchNorm
    statistics, centres).'''
    args = train.get_args_parser().parse_args(flags)
    args.k_max = args.k_start
    torch.manual_seed(0)
    student, teacher = M.build_student_teacher(args.arch, args.patch_size, args.out_dim, args.out_dim_c,
                                               args.head_hidden_dim, args.norm_last_layer, args.use_bn_in_head, 0.0)
    ddp = torch.nn.parallel.DistributedDataParallel(student) if world > 1 else student
    loss_fn = M.CrOCLoss(args.out_dim, args.out_dim_c, args.warmup_teacher_temp, args.teacher_temp,
                         args.warmup_teacher_temp_epochs, args.epochs, args.student_temp, args.center_momentum)
    gen = torch.Generator().manual_seed(0)
    n = (args.img_size // args.patch_size) ** 2
    views = torch.randn(4, 2, 3, args.img_size, args.img_size, generator=gen)
    positions = torch.rand(4, 2, n, 2, generator=gen) * args.img_size
    seeds = torch.randperm(2 * n, generator=gen)[:args.k_start]  # every problem the same: no draw to split
    images = torch.arange(4).chunk(world)[rank]
    cluster, cluster_views, view_centroids = clustering.cluster, clustering.cluster_views, M.view_centroids
    out = []
    try:
        clustering.cluster = lambda tokens, *a, generator=None, **kw: cluster(
            tokens, *a, seeds=seeds.expand(len(tokens), -1), **kw)
        # the centroids' scale, the mean CLS norm, is each rank's own (as in the official code): a constant here,
        # so that the split of the batch is the only difference
        M.view_centroids = lambda patch, cls, plan: view_centroids(patch, torch.ones_like(cls), plan)
        for step in range(2):
            def dropping(*a, **kw):
                q_star, valid, res = cluster_views(*a, **kw)
                return q_star, valid & ((images < 2) | (step == 1))[:, None], res
            clustering.cluster_views = dropping
            loss, stats = M.train_step(ddp, teacher, loss_fn, views[images], positions[images], 0, gen, nullcontext(),
                                       alpha=args.alpha, which_features=args.which_features, cluster_settings=args)
            student.zero_grad()
            loss.backward()
            out.append({"loss": loss.detach(), "kept": stats["kept_centroids"] * len(images),  # this rank's
                        "grads": [p.grad.clone() for p in student.parameters() if p.grad is not None],
                        "buffers": [b.clone() for b in [*student.buffers(), *teacher.buffers(), *loss_fn.buffers()]]})
    finally:
        clustering.cluster, clustering.cluster_views, M.view_centroids = cluster, cluster_views, view_centroids
    return out


if __name__ == "__main__":
    rank = int(sys.argv[1])
    dist.init_process_group("gloo", init_method="file://" + sys.argv[2], rank=rank, world_size=2)
    torch.save(two_steps(rank, 2, sys.argv[3:]), sys.argv[2] + f".{rank}.pt")
    dist.destroy_process_group()
"""


def test_ddp_with_uneven_kept_centroids_equals_one_process_on_the_whole_batch(tmp_path):
    """Two gloo ranks whose images keep no centroid on rank 1, then different numbers on each, a BatchNorm head:
    the same mean loss, gradients, BatchNorm statistics and centres as one process on all the images."""
    init = str(tmp_path / "init")
    flags = TINY + ["--use_bn_in_head", "true"]
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    procs = [subprocess.Popen([sys.executable, "-c", _KEPT_DDP, str(r), init, *flags], env=env, cwd=ROOT)
             for r in range(2)]
    namespace = {}
    exec(_KEPT_DDP, namespace)
    one = namespace["two_steps"](0, 1, flags)
    assert [p.wait(timeout=120) for p in procs] == [0, 0]
    ranks = [torch.load(f"{init}.{r}.pt", weights_only=True) for r in range(2)]
    kept = [[float(r[step]["kept"]) for r in ranks] for step in range(2)]
    assert kept[0][0] > 0 and kept[0][1] == 0 and kept[1][0] != kept[1][1] and kept[1][1] > 0, kept
    for step in range(2):
        torch.testing.assert_close(sum(float(r[step]["kept"]) for r in ranks), float(one[step]["kept"]))
        torch.testing.assert_close((ranks[0][step]["loss"] + ranks[1][step]["loss"]) / 2, one[step]["loss"])
        for r in ranks:
            torch.testing.assert_close(r[step]["grads"], one[step]["grads"], rtol=1e-4, atol=1e-6)
            torch.testing.assert_close(r[step]["buffers"], one[step]["buffers"], rtol=1e-4, atol=1e-6)


def test_schedules_follow_dino():
    s = train.cosine_schedule(1.0, 0.1, epochs=4, iters_per_epoch=5, warmup_epochs=1)
    assert len(s) == 20 and s[0] == 0.0 and abs(s[5] - 1.0) < 1e-9 and abs(s[-1] - 0.1) < 0.01
    assert np.all(np.diff(s[5:]) <= 0)


# --------------------------------------------------------------------------------------------------------------
# the head: DINO's, with a second last layer for the centroids
# --------------------------------------------------------------------------------------------------------------
def test_head_parameter_names_match_dino_and_croc():
    head = M.CrOCHead(192, out_dim=64, out_dim_c=32)
    assert set(head.state_dict()) == {"mlp.0.weight", "mlp.0.bias", "mlp.2.weight", "mlp.2.bias", "mlp.4.weight",
                                      "mlp.4.bias", "last_layer.weight_g", "last_layer.weight_v",
                                      "last_layer_c.weight_g", "last_layer_c.weight_v"}
    x = torch.randn(5, 192)
    assert head(x).shape == (5, 64) and head(x, centroids=True).shape == (5, 32)


def test_head_last_layers_train_their_norm_by_default_and_norm_last_layer_freezes_it():
    """App. B (and its footnote 4 for CrOC): norm_last_layer false, so weight_g is trained."""
    for flag, frozen in (([], False), (["--norm_last_layer", "true"], True)):
        args = _args(flag)
        head = M.CrOCHead(192, args.out_dim, args.out_dim_c, norm_last_layer=args.norm_last_layer)
        for layer in (head.last_layer, head.last_layer_c):
            assert layer.weight_g.requires_grad is not frozen
    assert M.CrOCHead(192, 8, 4).last_layer.weight_g.requires_grad  # the class default too


def test_use_bn_in_head_is_dinos_batchnorm_head():
    """DINO's --use_bn_in_head: a BatchNorm after each hidden layer (DINO's keys), which spreads images that the
    plain head maps to nearly one direction; with every row kept it is nn.BatchNorm1d, in training and in eval."""
    torch.manual_seed(0)
    plain, bn = M.CrOCHead(32, 16, 8), M.CrOCHead(32, 16, 8, use_bn=True)
    keys = {k.rsplit(".", 1)[0] for k in bn.state_dict() if k.startswith("mlp.")}
    assert keys == {"mlp.0", "mlp.1", "mlp.3", "mlp.4", "mlp.6"}  # DINOHead(use_bn=True)
    assert {k.rsplit(".", 1)[0] for k in plain.state_dict() if k.startswith("mlp.")} == {"mlp.0", "mlp.2", "mlp.4"}
    x = torch.randn(1, 32) + 1e-3 * torch.randn(64, 32)  # 64 images, almost the same input

    def mean_cosine(head):
        z = F.normalize(head.mlp(x), dim=-1)
        return ((z @ z.T).sum() - len(z)) / (len(z) * (len(z) - 1))
    assert mean_cosine(plain) > 0.99 and mean_cosine(bn) < 0.5

    ours, ref = M.HeadBatchNorm(6), torch.nn.BatchNorm1d(6)
    with torch.no_grad():
        ours.weight.uniform_(0.5, 2), ours.bias.normal_()
    ref.load_state_dict(ours.state_dict())
    for step in range(3):  # training mode: batch statistics, gradients, running statistics
        x = (3 * torch.randn(10, 6) + 1).requires_grad_()
        g = torch.randn(10, 6)
        y, y_ref = ours(x), ref(x)
        torch.testing.assert_close(y, y_ref)
        gx, = torch.autograd.grad((y * g).sum(), x)
        gx_ref, = torch.autograd.grad((y_ref * g).sum(), x)
        torch.testing.assert_close(gx, gx_ref)
    for name, t in ref.state_dict().items():
        torch.testing.assert_close(ours.state_dict()[name], t)
    ours.eval(), ref.eval()
    torch.testing.assert_close(ours(x), ref(x))  # eval mode: the running statistics
    torch.testing.assert_close(ours(x.expand(2, 10, 6)), ref(x).expand(2, 10, 6))  # per row, e.g. centroids


_BN_RANK = """
import sys, torch, torch.distributed as dist
sys.path.insert(0, sys.argv[3])
import model as M
rank = int(sys.argv[1])
dist.init_process_group("gloo", init_method="file://" + sys.argv[2], rank=rank, world_size=2)
torch.manual_seed(0)
bn = M.HeadBatchNorm(6)
x = torch.randn(2, 10, 6) * 3 + 1
keep = torch.rand(2, 10) < 0.7
keep[1] &= sys.argv[4] == "some"  # rank 1 with rows of its own, or with none
x = x[rank][keep[rank]].requires_grad_()
y = bn(x)
g, = torch.autograd.grad((y * torch.arange(6.)).sum(), x)
torch.save({"y": y.detach(), "g": g, "running_var": bn.running_var}, sys.argv[2] + f".{rank}.pt")
dist.destroy_process_group()
"""


@pytest.mark.parametrize("rank_1_rows", ["some", "none"])
def test_head_batchnorm_statistics_are_summed_over_the_ranks(tmp_path, rank_1_rows):
    """Two gloo processes, each with its own number of rows (the kept centroids of its images; rank 1 perhaps
    none), give the outputs, gradients and running statistics of one process with all of them (as DINO's
    SyncBatchNorm, which has no CPU kernel)."""
    init = str(tmp_path / "init")
    procs = [subprocess.Popen([sys.executable, "-c", _BN_RANK, str(r), init, str(Path(__file__).parent),
                               rank_1_rows]) for r in range(2)]
    assert [p.wait(timeout=120) for p in procs] == [0, 0]
    ranks = [M.torch_load(f"{init}.{r}.pt") for r in range(2)]
    torch.manual_seed(0)
    bn = M.HeadBatchNorm(6)
    x = torch.randn(2, 10, 6) * 3 + 1
    keep = torch.rand(2, 10) < 0.7
    keep[1] &= rank_1_rows == "some"
    counts = keep.sum(dim=1).tolist()
    assert counts[0] != counts[1] and counts[0] > 0 and (counts[1] > 0) == (rank_1_rows == "some")
    x = x[keep].requires_grad_()  # rank 0's rows, then rank 1's
    y = bn(x)
    g, = torch.autograd.grad((y * torch.arange(6.)).sum(), x)
    for r, rows in enumerate(torch.arange(len(x)).split(counts)):
        torch.testing.assert_close(ranks[r]["y"], y[rows])
        torch.testing.assert_close(ranks[r]["g"], g[rows])
        torch.testing.assert_close(ranks[r]["running_var"], bn.running_var)


# ==============================================================================================================
# 4. The ViT (Sec. 3.3.3, Eq. 19-21, model.py): timm names, the last block's q/k/v
# ==============================================================================================================
@pytest.mark.parametrize("patch,size", [(16, (224, 224)), (8, (64, 96)), (16, (48, 80))])
def test_vit_shapes_at_square_and_non_square_sizes(patch, size):
    vit = M.vit_tiny(patch)
    x = torch.randn(2, 3, *size)
    h, w = size[0] // patch, size[1] // patch
    f = vit.forward_features(x, which="k")
    assert f.cls.shape == (2, 192) and f.patch.shape == (2, h * w, 192) and f.grid == (h, w)
    assert f.tokens.shape == (2, 3, 1 + h * w, 64)
    assert vit.forward_features(x, which="last").tokens.shape == (2, 1, 1 + h * w, 192)
    assert vit.forward_features(x).tokens is None
    assert vit.get_last_selfattention(x).shape == (2, 3, 1 + h * w, 1 + h * w)
    assert M.dense_features(vit, x, n_last_blocks=2).shape == (2, 2 * 192, h, w)


def test_vit_nano_has_four_blocks_of_96_dims_and_three_heads():
    vit = M.build_vit("vit_nano", 8)  # a CPU size for the synthetic scenes, not the paper's
    assert len(vit.blocks) == 4 and vit.embed_dim == 96 and vit.blocks[0].attn.num_heads == 3
    assert M.dense_features(vit, torch.randn(1, 3, 64, 64), n_last_blocks=4).shape == (1, 4 * 96, 8, 8)


def test_vit_rejects_input_not_multiple_of_patch():
    with pytest.raises(ValueError, match="multiple of the patch"):
        M.vit_tiny(16)(torch.randn(1, 3, 50, 64))


def test_forward_features_exposes_last_block_qkv_and_final_tokens_in_one_pass():
    torch.manual_seed(0)
    vit = M.vit_tiny(16).eval()
    x = torch.randn(2, 3, 32, 48)
    feats = {w: vit.forward_features(x, which=w) for w in ("q", "k", "v", "last")}
    # recompute the last block's input independently and project it
    t = vit.prepare_tokens(x)
    for blk in vit.blocks[:-1]:
        t, _ = blk(t)
    q, k, v = vit.blocks[-1].attn.qkv_heads(vit.blocks[-1].norm1(t))
    for name, ref in zip("qkv", (q, k, v)):
        torch.testing.assert_close(feats[name].tokens, ref)
    final = vit.get_intermediate_layers(x, 1)[0]
    torch.testing.assert_close(feats["last"].tokens[:, 0], final)
    torch.testing.assert_close(feats["k"].patch, final[:, 1:])
    torch.testing.assert_close(feats["k"].cls, vit(x))


def test_last_selfattention_matches_the_attention_used_in_the_forward_pass():
    torch.manual_seed(0)
    vit = M.vit_tiny(16).eval()
    x = torch.randn(1, 3, 32, 32)
    attn = vit.get_last_selfattention(x)
    torch.testing.assert_close(attn.sum(-1), torch.ones(attn.shape[:-1]))
    v = vit.forward_features(x, which="v").tokens
    t = vit.prepare_tokens(x)
    for blk in vit.blocks[:-1]:
        t, _ = blk(t)
    _, (_, _, _) = vit.blocks[-1].attn(vit.blocks[-1].norm1(t))
    q, k, _ = vit.blocks[-1].attn.qkv_heads(vit.blocks[-1].norm1(t))
    torch.testing.assert_close(attn @ v, torch.nn.functional.scaled_dot_product_attention(q, k, v))


def test_positional_embedding_is_unchanged_at_224_and_resized_for_other_grids():
    vit = M.vit_tiny(16)
    assert vit.interpolate_pos_encoding(14, 14) is vit.pos_embed
    assert vit.interpolate_pos_encoding(3, 5).shape == (1, 16, 192)


def test_backbone_parameter_names_match_dino_and_timm():
    keys = set(M.vit_tiny(16).state_dict())
    for k in ["cls_token", "pos_embed", "patch_embed.proj.weight", "blocks.0.norm1.weight", "blocks.0.attn.qkv.weight",
              "blocks.0.attn.qkv.bias", "blocks.11.attn.proj.weight", "blocks.0.norm2.bias", "blocks.0.mlp.fc1.weight",
              "blocks.0.mlp.fc2.bias", "norm.weight"]:
        assert k in keys, k


def test_vit_equals_timms_vit_small_patch16_224_on_the_same_weights(tmp_path):
    """The README's claim: the weights load into timm's ViT-S/16 with no missing or unexpected key and give its
    outputs; timm's state dict (with its classifier) loads back here. timm is not a dependency: skipped without."""
    timm = pytest.importorskip("timm")
    ours = M.build_vit("vit_small", 16).eval()
    theirs = timm.create_model("vit_small_patch16_224", pretrained=False, num_classes=0).eval()
    theirs.load_state_dict(ours.state_dict(), strict=True)
    x = torch.randn(2, 3, 224, 224)
    with torch.no_grad():
        torch.testing.assert_close(theirs(x), ours(x))  # the CLS token after the final norm
        torch.testing.assert_close(theirs.forward_features(x)[:, 1:], ours.forward_features(x).patch)
    torch.save(timm.create_model("vit_small_patch16_224", num_classes=1000).state_dict(), tmp_path / "timm.pth")
    assert M.load_pretrained(M.build_vit("vit_small", 16), str(tmp_path / "timm.pth")) == {"missing": [],
                                                                                           "unexpected": []}


# ==============================================================================================================
# Machinery for the tests below: the tiny training configuration, the script runner, the early runs
# ==============================================================================================================
# The one tiny training configuration: ViT-Ti/16 at 64 px on 16 synthetic scenes. A test that needs other shapes
# appends the flags it changes (argparse keeps the last value).
TINY = ["--arch", "vit_tiny", "--patch_size", "16", "--img_size", "64", "--out_dim", "128", "--out_dim_c", "64",
        "--k_start", "6", "--batch_size_per_gpu", "4", "--synthetic_images", "16", "--synthetic_size", "64",
        "--num_workers", "0", "--warmup_epochs", "1", "--warmup_teacher_temp_epochs", "1", "--log_freq", "2",
        "--lr", "1e-3"]


def run(cmd, env_extra=None, timeout=600, in_process=False, **kw):
    """Run a command in the repository root -> CompletedProcess with text output.

    in_process=True runs `python SCRIPT.py ARGS` as SCRIPT's __main__ in this process, which saves its ~5 s of
    imports: it sees the argv, folder and environment of its own process; its output, exit status, warnings and
    uncaught traceback come back as a process's would; the random states, thread count and signal handlers it
    changes are put back."""
    env_extra = dict(OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1", **(env_extra or {}))
    if not in_process:
        return subprocess.run(cmd, cwd=ROOT, env=dict(os.environ, **env_extra), capture_output=True, text=True,
                              timeout=timeout, **kw)
    assert cmd[0] == sys.executable and str(cmd[1]).endswith(".py") and not kw, cmd
    saved_env = {k: os.environ.get(k) for k in env_extra}
    saved = (sys.argv, os.getcwd(), torch.get_num_threads(), torch.get_rng_state(), np.random.get_state(),
             random.getstate())
    handlers = {sig: signal.getsignal(sig) for sig in train.StopFlag.SIGNALS}

    def show(message, category, filename, lineno, file=None, line=None):  # as a process prints a warning
        sys.stderr.write(warnings.formatwarning(message, category, filename, lineno, line))
    out, err, code = io.StringIO(), io.StringIO(), 0
    try:
        sys.argv = [str(ROOT / cmd[1])] + [str(a) for a in cmd[2:]]
        os.chdir(ROOT)
        os.environ.update(env_extra)
        torch.set_num_threads(1)
        with redirect_stdout(out), redirect_stderr(err), warnings.catch_warnings():
            warnings.simplefilter("default")
            warnings.showwarning = show
            try:
                runpy.run_path(sys.argv[0], run_name="__main__")
            except SystemExit as e:  # sys.exit(), sys.exit(2) or sys.exit("message"), as Python exits
                if e.code is None or isinstance(e.code, int):
                    code = e.code or 0
                else:
                    print(e.code, file=sys.stderr)
                    code = 1
            except Exception:
                traceback.print_exc()
                code = 1
    finally:
        sys.argv, cwd, threads, torch_rng, numpy_rng, python_rng = saved
        os.chdir(cwd)
        torch.set_num_threads(threads)
        torch.set_rng_state(torch_rng)
        np.random.set_state(numpy_rng)
        random.setstate(python_rng)
        for k, v in saved_env.items():  # key by key: the early runs' threads read os.environ meanwhile
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v
        for sig, handler in handlers.items():
            signal.signal(sig, handler)
    return subprocess.CompletedProcess(cmd, code, out.getvalue(), err.getvalue())


# The end-to-end runs start early: most of such a test's time is its processes' start-ups, on one core each. When
# the module's first test starts, two threads start the selected tests' runs, in the file's order, beside the
# in-process tests; each test then waits for its run's result and checks it.
EARLY = {}  # test function name -> job(folder, **the test's parameters)


def early(job):
    """Decorator of a test whose end-to-end part is job(folder, **parameters); the test's `early_run` fixture is
    job's result (or raises its exception)."""
    def register(test):
        EARLY[test.__name__] = job
        return test
    return register


@pytest.fixture(scope="module", autouse=True)
def early_runs(request, tmp_path_factory):
    items = [item for item in request.session.items if getattr(item, "originalname", None) in EARLY]
    if not items:
        yield {}
        return
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # the runs take the other core
    pool = ThreadPoolExecutor(max_workers=2)
    try:
        yield {item.nodeid: pool.submit(EARLY[item.originalname], tmp_path_factory.mktemp("early"),
                                        **(item.callspec.params if hasattr(item, "callspec") else {}))
               for item in items}
    finally:
        pool.shutdown(wait=True, cancel_futures=True)  # no process outlives the module
        torch.set_num_threads(threads)


@pytest.fixture
def early_run(request, early_runs):
    return early_runs[request.node.nodeid].result()


# ==============================================================================================================
# 5. The evaluations: metrics.py, eval_linear.py, eval_kmeans.py, eval_davis.py
# ==============================================================================================================
# --------------------------------------------------------------------------------------------------------------
# metrics.py
# --------------------------------------------------------------------------------------------------------------
def hand_case():
    # gt row 1 holds a 255 pixel whose prediction (0) must be ignored
    gt = torch.tensor([[0, 0, 1], [1, 255, 2]])
    pred = torch.tensor([[0, 1, 1], [2, 0, 2]])
    return pred, gt


def test_confusion_matrix_counts_gt_by_pred_over_valid_pixels_only():
    pred, gt = hand_case()
    expected = torch.tensor([[1, 1, 0], [0, 1, 1], [0, 0, 1]])
    m = metrics.confusion_matrix(pred, gt, 3)
    assert m.dtype == torch.int64 and torch.equal(m, expected)
    # any shape: a flat or a batched layout gives the same counts
    assert torch.equal(metrics.confusion_matrix(pred.flatten(), gt.flatten(), 3), expected)
    assert torch.equal(metrics.confusion_matrix(pred[None], gt[None], 3), expected)


def test_confusion_matrix_rejects_out_of_range_labels_on_valid_pixels_only():
    pred, gt = hand_case()
    bad = pred.clone()
    bad[1, 1] = 7  # on the 255 pixel: allowed
    assert torch.equal(metrics.confusion_matrix(bad, gt, 3), metrics.confusion_matrix(pred, gt, 3))
    bad[0, 0] = 3  # on a valid pixel: an error
    with pytest.raises(ValueError, match="predictions"):
        metrics.confusion_matrix(bad, gt, 3)
    with pytest.raises(ValueError, match="ground truth"):
        metrics.confusion_matrix(pred, torch.where(gt == 2, 5, gt), 3)


def test_miou_matches_hand_computed_ious():
    pred, gt = hand_case()
    mean, iou = metrics.miou(metrics.confusion_matrix(pred, gt, 3))
    # class 0: tp 1 / (row 2 + col 1 - 1); class 1: 1 / (2 + 2 - 1); class 2: 1 / (1 + 2 - 1)
    assert torch.allclose(iou, torch.tensor([1 / 2, 1 / 3, 1 / 2], dtype=torch.float64))
    assert mean == pytest.approx(4 / 9)


def test_miou_counts_a_class_absent_from_gt_and_pred_as_zero():
    pred, gt = hand_case()
    mean, iou = metrics.miou(metrics.confusion_matrix(pred, gt, 4))
    assert iou[3] == 0 and not torch.isnan(iou).any()
    assert mean == pytest.approx((1 / 2 + 1 / 3 + 1 / 2) / 4)


def test_miou_is_pooled_over_images_not_averaged_per_image():
    pred, gt = hand_case()
    pooled = metrics.confusion_matrix(pred, gt, 3) + metrics.confusion_matrix(gt.clamp(max=2), gt, 3)
    both = metrics.confusion_matrix(torch.stack([pred, gt.clamp(max=2)]), torch.stack([gt, gt]), 3)
    assert torch.equal(pooled, both)
    assert metrics.miou(both)[0] == pytest.approx(metrics.miou(pooled)[0])


def cluster_case():
    gt = torch.tensor([0, 0, 0, 1, 1, 2, 2, 255])
    pred = torch.tensor([2, 2, 1, 0, 0, 1, 1, 0])  # the 255 pixel's cluster does not count
    return pred, gt


def test_hungarian_miou_matches_hand_computed_matching():
    pred, gt = cluster_case()
    mean, iou, mapping = metrics.hungarian_miou(pred, gt, 3)
    # best one-to-one: cluster 2 -> class 0, cluster 0 -> class 1, cluster 1 -> class 2
    assert mapping.tolist() == [1, 2, 0]
    # relabelled prediction [0, 0, 2, 1, 1, 2, 2]: IoUs 2/3, 1, 2/3
    assert torch.allclose(iou, torch.tensor([2 / 3, 1.0, 2 / 3], dtype=torch.float64))
    assert mean == pytest.approx(7 / 9)


def test_hungarian_miou_is_invariant_to_permuting_cluster_ids():
    pred, gt = cluster_case()
    mean, iou, mapping = metrics.hungarian_miou(pred, gt, 3)
    perm = torch.tensor([2, 0, 1])  # cluster k is renamed perm[k]
    mean_p, iou_p, mapping_p = metrics.hungarian_miou(perm[pred], gt, 3)
    assert mean_p == pytest.approx(mean) and torch.allclose(iou_p, iou)
    assert torch.equal(mapping_p[perm], mapping)


def test_hungarian_miou_merges_unmatched_clusters_into_class_0_when_k_exceeds_c():
    pred, gt = cluster_case()
    pred = torch.where(torch.arange(8) == 4, 3, pred)  # a 4th cluster takes one class-1 pixel
    mean, iou, mapping = metrics.hungarian_miou(pred, gt, 3, num_clusters=4)
    assert mapping.tolist() == [1, 2, 0, 0]
    # class 0 gains a false positive: 2 / (3 + 3 - 2); class 1: 1 / 2; class 2: 2 / 3
    assert torch.allclose(iou, torch.tensor([1 / 2, 1 / 2, 2 / 3], dtype=torch.float64))
    with pytest.raises(ValueError, match="K >= C"):
        metrics.hungarian_miou(pred, gt, 3, num_clusters=2)


def test_many_to_one_matching_gives_each_cluster_its_most_precise_class():
    counts = torch.tensor([[5, 4, 0, 1], [0, 1, 3, 0], [0, 0, 1, 2]])  # (C=3, K=4)
    miou_value, iou, mapping = metrics.match_many_to_one(counts)
    assert mapping.tolist() == [0, 0, 1, 2]  # cluster 3: precision 2/3 for class 2 beats 1/3 for class 0
    # relabelled: class 0 gets clusters 0, 1 (tp 9, fp 1), class 1 cluster 2 (tp 3, fp 1), class 2 cluster 3
    expected = torch.tensor([9 / (10 + 10 - 9), 3 / (4 + 4 - 3), 2 / (3 + 3 - 2)], dtype=torch.float64)
    assert torch.allclose(iou, expected) and miou_value == pytest.approx(expected.mean().item())


def test_multi_block_features_slice_one_pass_like_separate_calls():
    backbone = build_vit("vit_tiny", 16).eval()
    x = torch.randn(2, 3, 32, 48)
    feats = metrics.multi_block_features(backbone, x, [1, 3])
    for n in (1, 3):
        assert torch.allclose(feats[n], M.dense_features(backbone, x, n), atol=1e-6)


def test_prediction_pictures_use_the_dataset_colours(tmp_path):
    image = np.full((6, 8, 3), 100, np.uint8)
    gt = np.zeros((6, 8), np.uint8)
    gt[:, 4:] = 15
    pred = np.full((6, 8), 15, np.uint8)
    pred[0, 0] = 255
    path = metrics.save_prediction_pictures(tmp_path / "p.png", [(image, gt, pred), (image, pred, gt)])
    pic = np.array(Image.open(path))
    assert pic.shape == (12, 24, 3)
    colours = data.voc_colormap()
    assert (pic[:6, :8] == 100).all()
    assert (pic[:6, 8:16] == colours[gt]).all() and (pic[:6, 16:] == colours[pred]).all()
    assert tuple(pic[0, 16]) == tuple(colours[255]) and tuple(pic[0, 12]) == (192, 128, 128)  # VOC person


# --------------------------------------------------------------------------------------------------------------
# eval_linear.py and eval_kmeans.py: transforms and k-means pieces
# --------------------------------------------------------------------------------------------------------------
def test_train_transform_crops_and_flips_image_and_mask_together():
    torch.manual_seed(0)
    img = np.zeros((60, 80, 3), np.uint8)
    img[:, :40, 0] = 255  # left half red = class 1, right half blue = class 2, one 255 row
    img[:, 40:, 2] = 255
    mask = np.where(np.arange(80)[None, :] < 40, 1, 2).repeat(60, 0).astype(np.uint8)
    mask[10] = 255
    transform = eval_linear.TrainTransform(img_size=32, mask_size=32)
    for _ in range(10):
        x, m = transform(Image.fromarray(img), mask)
        assert x.shape == (3, 32, 32) and m.shape == (32, 32) and m.dtype == torch.uint8
        assert set(m.unique().tolist()) <= {1, 2, 255}  # nearest: no interpolated labels
        red_minus_blue = x[0] * 0.229 + 0.485 - (x[2] * 0.225 + 0.406)  # unnormalised R - B
        assert (red_minus_blue[m == 1] > 0).float().mean() > 0.9
        assert (red_minus_blue[m == 2] < 0).float().mean() > 0.9


def test_val_transform_resizes_image_and_mask_to_fixed_sizes_with_nearest_masks():
    img = Image.fromarray(np.zeros((30, 50, 3), np.uint8))
    mask = np.random.default_rng(0).choice(np.array([0, 3, 255], np.uint8), size=(30, 50))
    x, m = data.ValTransform(64, 20)(img, mask)
    assert x.shape == (3, 64, 64) and m.shape == (20, 20)
    assert set(m.unique().tolist()) <= {0, 3, 255}


def test_running_moments_match_per_channel_mean_and_population_std_over_all_pixels():
    x = torch.randn(10, 5, 3, 4) * torch.arange(1, 6)[:, None, None] + 3  # (images, channels, h, w)
    moments = eval_kmeans.RunningMoments(5, "cpu")
    for chunk in x.split(3):  # uneven chunks: 3, 3, 3, 1 images
        moments.update(chunk)
    pixels = eval_kmeans.rearrange(x, "b d h w -> (b h w) d")
    assert torch.allclose(moments.mean.float(), pixels.mean(0), atol=1e-5)
    assert torch.allclose(moments.std().float(), pixels.std(0, correction=0), atol=1e-5)


def test_projecting_tokens_then_upsampling_equals_upsampling_then_projecting():
    tokens = torch.randn(3, 6, 4, 4)
    mean, std = torch.randn(6), torch.rand(6) + 0.5
    pixels = eval_kmeans.rearrange(F.interpolate(tokens, size=(10, 10), mode="bilinear", align_corners=False),
                                   "b d h w -> (b h w) d")
    pca = eval_kmeans.fit_pca((pixels - mean) / (std + eval_kmeans.STD_EPS), 2)
    args = argparse.Namespace(mask_size=10, batch_size=2)
    z = eval_kmeans.project(tokens.half(), mean, std, pca, args, "cpu", main=False)
    expected = ((pixels - mean) / (std + eval_kmeans.STD_EPS) - pca[0]) @ pca[1]
    assert z.shape == (300, 2)
    assert torch.allclose(z.float(), expected, atol=2e-2)


def test_fit_kmeans_is_deterministic_per_seed_and_finds_separated_blobs():
    centres = torch.tensor([[0.0, 0.0], [10.0, 0.0], [0.0, 10.0]])
    z = (centres.repeat_interleave(200, 0) + torch.randn(600, 2, generator=torch.Generator().manual_seed(0)))
    args = argparse.Namespace(fit_samples=300, kmeans_iters=50, n_init=1)
    a, b = eval_kmeans.fit_kmeans(z.half(), 3, 0, args), eval_kmeans.fit_kmeans(z.half(), 3, 0, args)
    assert torch.equal(a, b)
    gt = torch.arange(3).repeat_interleave(200)
    counts = eval_kmeans.assign_and_count(z.half(), gt, a, 3, "cpu")
    assert metrics.match_clusters(counts)[0] == pytest.approx(1.0)


def test_kmeans_restarts_keep_the_fit_of_lowest_inertia():
    # --n_init (Leopart's nredo): the first restart is the single fit, so the kept one is never worse, and on
    # 12 close blobs in 2-d some seed's single fit is a poor local optimum that a restart improves
    gen = torch.Generator().manual_seed(0)
    centres = torch.rand(12, 2, generator=gen) * 10
    z = centres.repeat_interleave(50, 0) + 0.6 * torch.randn(600, 2, generator=gen)

    def inertia(c):
        return torch.cdist(z, c).min(1).values.square().sum()

    gains = []
    for seed in range(5):
        one, five = (inertia(eval_kmeans.fit_kmeans(z, 12, seed, argparse.Namespace(
            fit_samples=600, kmeans_iters=100, n_init=n))) for n in (1, 5))
        assert five <= one + 1e-3
        gains.append(one - five)
    assert max(gains) > 1e-2


def test_token_kmeans_and_over_clustering_recover_a_known_partition():
    # 4 images of 4x4 tokens: class 0 (two sub-blobs, top rows / middle rows) and class 1 (bottom row)
    gen = torch.Generator().manual_seed(0)
    labels = torch.tensor([0, 0, 0, 1]).repeat_interleave(4).reshape(4, 4)  # token rows 0-2 class 0, row 3 class 1
    part = torch.tensor([0, 0, 1, 2]).repeat_interleave(4).reshape(4, 4)    # sub-blob of each token
    centres = torch.tensor([[0.0, 0, 0], [0, 6, 0], [9, 0, 9]])
    tokens = torch.stack([(centres[part] + 0.1 * torch.randn(4, 4, 3, generator=gen)).permute(2, 0, 1)
                          for _ in range(4)])  # (N, D, h, w)
    size = 8
    masks = F.interpolate(labels[None, None].float().expand(4, 1, 4, 4), size=(size, size), mode="nearest")
    gt = masks.long().reshape(-1)
    args = argparse.Namespace(mask_size=size, batch_size=2, granularity="tokens", fit_samples=1000, kmeans_iters=50,
                              n_init=1)
    z = eval_kmeans.project(tokens.half(), torch.zeros(3), torch.ones(3), None, args, "cpu", main=False)
    assert z.shape == (4 * 16, 3)  # one point per token, not per pixel
    results = {}
    for k in (2, 3):
        centroids = eval_kmeans.fit_kmeans(z, k, 0, args)
        pred = eval_kmeans.upsample_assignments(eval_kmeans.assign(z, centroids, "cpu"), 4, 4, size)
        counts = metrics.count_pairs(pred, gt, 2, k)
        results[k] = eval_kmeans.match(counts)[0]
        if k == 3:
            hungarian = metrics.match_clusters(counts)[0]
    # K = C = 2: the two far blobs (class 0's sub-blobs are 6 apart, class 1 is ~13 away) split as the classes
    assert results[2] == pytest.approx(1.0)
    assert results[3] == pytest.approx(1.0)  # over-clustering: both sub-blobs of class 0 map to class 0
    assert hungarian == pytest.approx(1.0)   # here an unmatched cluster joins class 0 too (Leopart's rule)


# --------------------------------------------------------------------------------------------------------------
# eval_linear.py and eval_kmeans.py end to end on a tiny synthetic PVOC-layout folder
# --------------------------------------------------------------------------------------------------------------
def _write_tiny_synthetic(root):
    data.write_synthetic(str(root), n_train=8, n_val=4, n_videos=1, size=64, seed=0, progress=False)
    return str(root)


@pytest.fixture(scope="module")
def synthetic_root(tmp_path_factory):
    return _write_tiny_synthetic(tmp_path_factory.mktemp("synthetic"))


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    """A checkpoint written by train.py itself after a few steps (2 epochs of 2 steps on synthetic scenes)."""
    out = tmp_path_factory.mktemp("ckpt")
    train.main(train.get_args_parser().parse_args(TINY + ["--epochs", "2", "--synthetic_images", "8",
                                                          "--output_dir", str(out)]))
    path = str(out / "checkpoint.pth")
    teacher = CrOCModel(build_vit("vit_tiny", 16), CrOCHead(192, out_dim=128, out_dim_c=64))
    assert M.load_pretrained(teacher, path, key="teacher") == {"missing": [], "unexpected": []}
    return path, teacher


COMMON = ["--dataset", "synthetic", "--arch", "vit_tiny", "--img_size", "64", "--batch_size", "4",
          "--num_workers", "0", "--device", "cpu", "--n_last_blocks", "2"]


def run_linear(root, out, *extra):
    args = eval_linear.get_args_parser().parse_args(
        COMMON + ["--data_path", root, "--epochs", "1", "--train_mask_size", "32", "--output_dir", out, *extra])
    return eval_linear.main(args)


def run_kmeans(root, out, *extra):
    args = eval_kmeans.get_args_parser().parse_args(
        COMMON + ["--data_path", root, "--mask_size", "32", "--pca", "8", "--fit_samples", "2000",
                  "--seeds", "0", "1", "--kmeans_iters", "20", "--output_dir", out, *extra])
    return eval_kmeans.main(args)


def test_eval_linear_runs_end_to_end_and_writes_results_and_config(synthetic_root, tmp_path):
    results = run_linear(synthetic_root, str(tmp_path), "--random_init")
    saved = json.load(open(tmp_path / "results.json"))
    config = json.load(open(tmp_path / "config.json"))
    assert saved["miou"] == pytest.approx(results["miou"]) and 0 <= saved["miou"] <= 1
    num_classes = data.build_segmentation_dataset("synthetic", synthetic_root, "val").num_classes
    assert len(saved["per_class_iou"]) == num_classes
    assert saved["miou"] == pytest.approx(np.mean(list(saved["per_class_iou"].values())))
    assert saved["n_val_images"] == 4 and saved["n_train_images"] == 8 and saved["weights"] == "random_init"
    assert config["train_split"] == "train" and config["epochs"] == 1 and config["lr"] == [1e-3]
    assert len(open(tmp_path / "log.txt").readlines()) == 1


def test_eval_linear_with_cached_train_features_runs(synthetic_root, tmp_path):
    results = run_linear(synthetic_root, str(tmp_path), "--random_init", "--cache_train_features")
    assert 0 <= results["miou"] <= 1


def test_eval_kmeans_runs_end_to_end_and_reports_mean_and_std_over_seeds(synthetic_root, tmp_path):
    results = run_kmeans(synthetic_root, str(tmp_path), "--random_init")
    saved = json.load(open(tmp_path / "results.json"))
    assert saved["miou_per_seed"] == pytest.approx(results["miou_per_seed"]) and len(saved["per_seed"]) == 2
    assert saved["miou_mean"] == pytest.approx(np.mean(saved["miou_per_seed"]))
    assert saved["miou_std"] == pytest.approx(np.std(saved["miou_per_seed"]))
    num_classes = data.build_segmentation_dataset("synthetic", synthetic_root, "val").num_classes
    assert saved["num_clusters"] == num_classes and len(saved["per_class_iou_mean"]) == num_classes
    assert sorted(saved["per_seed"][0]["cluster_to_class"]) == list(range(num_classes))  # one-to-one
    assert saved["n_images"] == 4 and saved["n_pixels"] == 4 * 32 * 32 and saved["feature_dim"] == 8
    assert os.path.isfile(tmp_path / "config.json")


def test_kmeans_script_clusters_tokens_and_over_clusters_with_many_to_one_matching(synthetic_root, tmp_path):
    results = run_kmeans(synthetic_root, str(tmp_path), "--random_init", "--granularity", "tokens",
                         "--num_clusters", "20", "--seeds", "0", "--n_pictures", "1")
    assert results["matching"] == "many-to-one" and results["num_clusters"] == 20
    seed = results["per_seed"][0]
    assert len(seed["cluster_to_class"]) == 20 and len(set(seed["cluster_to_class"])) < 20  # many to one
    assert results["n_pixels"] == 4 * 32 * 32  # token assignments upsampled to the 32x32 masks
    assert sum(seed["cluster_sizes"]) == results["n_valid_pixels"]
    assert results["feature_dim"] == 8 and (tmp_path / "predictions_nb2.png").is_file()


def test_several_n_last_blocks_in_one_linear_run_equal_separate_runs(synthetic_root, tmp_path):
    both = run_linear(synthetic_root, str(tmp_path / "both"), "--random_init", "--n_last_blocks", "1", "2",
                      "--n_pictures", "0")
    for n in (1, 2):
        alone = run_linear(synthetic_root, str(tmp_path / f"nb{n}"), "--random_init", "--n_last_blocks", str(n),
                           "--n_pictures", "0")
        assert both["runs"][f"nb{n}_lr1e-3"]["confusion"] == alone["runs"][f"nb{n}_lr1e-3"]["confusion"]
        assert both["runs"][f"nb{n}_lr1e-3"]["miou"] == pytest.approx(alone["miou"], abs=1e-12)


def test_several_n_last_blocks_in_one_kmeans_run_equal_separate_runs(synthetic_root, tmp_path):
    both = run_kmeans(synthetic_root, str(tmp_path / "both"), "--random_init", "--n_last_blocks", "1", "2",
                      "--seeds", "0")
    assert set(both["runs"]) == {"nb1", "nb2"}
    for n in (1, 2):
        alone = run_kmeans(synthetic_root, str(tmp_path / f"nb{n}"), "--random_init", "--n_last_blocks", str(n),
                           "--seeds", "0")
        assert both["runs"][f"nb{n}"]["per_seed"][0]["confusion"] == alone["per_seed"][0]["confusion"]
        assert (tmp_path / "both" / f"predictions_nb{n}.png").is_file()


def test_results_json_names_classes_holds_the_confusion_and_runs_combine_in_one_table(synthetic_root, tmp_path):
    run_linear(synthetic_root, str(tmp_path / "lin"), "--random_init", "--n_pictures", "2")
    run_kmeans(synthetic_root, str(tmp_path / "km"), "--random_init", "--seeds", "0", "--n_pictures", "1")
    saved = json.load(open(tmp_path / "lin" / "results.json"))
    names = data.build_segmentation_dataset("synthetic", synthetic_root, "val").class_names
    assert saved["class_names"] == names and list(saved["per_class_iou"]) == names
    confusion = torch.tensor(saved["confusion"])
    assert confusion.shape == (len(names), len(names)) and int(confusion.sum()) == saved["n_valid_pixels"]
    assert metrics.miou(confusion)[0] == pytest.approx(saved["miou"])
    assert Image.open(tmp_path / "lin" / "predictions.png").size == (3 * 64, 2 * 64)
    assert Image.open(tmp_path / "km" / "predictions_nb2.png").size == (3 * 32, 32)
    table = metrics.combined_table([str(tmp_path / "lin"), str(tmp_path / "km" / "results.json")])
    lines = table.splitlines()
    assert len(lines) == 3 and lines[1].split()[:4] == ["lin", "linear", "synthetic", "nb2_lr1e-3"]
    assert f"{100 * saved['miou']:.2f}" in lines[1] and lines[2].split()[:4] == ["km", "kmeans", "synthetic", "nb2"]


def test_no_scorable_pixel_fails_naming_the_dataset_and_what_was_found(tmp_path):
    base = tmp_path / "VOCdevkit/VOC2012"
    _voc_fixture(base, aug=False)
    for mask in (base / "SegmentationClass").glob("*.png"):
        _write_mask(mask, np.full((10, 20), 50), palette=False)  # 50: outside VOC's 0..20 -> ignore (with the flag)
    args = eval_kmeans.get_args_parser().parse_args(
        ["--dataset", "pvoc", "--data_path", str(tmp_path), "--arch", "vit_tiny", "--random_init", "--img_size",
         "32", "--num_workers", "0", "--device", "cpu", "--n_last_blocks", "1", "--mask_size", "8", "--pca", "0",
         "--output_dir", str(tmp_path / "out"), "--ignore_unknown_labels"])
    with pytest.warns(RuntimeWarning, match="--ignore_unknown_labels"), \
            pytest.raises(ValueError, match=r"pvoc/val: no pixel to score.*0\.\.20.*raw mask values.*: 50"):
        eval_kmeans.main(args)
    with pytest.warns(RuntimeWarning, match="50 \\(200 pixels\\)"):
        val = data.build_segmentation_dataset("pvoc", tmp_path, "val", ignore_unknown_labels=True)
    with pytest.warns(UserWarning, match=r"pvoc/val: 95.0% of the 100 mask pixels"):
        metrics.check_scored_pixels(5, 100, val)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        metrics.check_scored_pixels(50, 100, val)  # half ignored (e.g. COCO-Things' stuff): no warning


def _small_synthetic(root):
    """The synthetic scenes (4 classes) as a PVOC-layout folder: 2 train and 2 val scenes of 32 px, one video."""
    data.write_synthetic(str(root), n_train=2, n_val=2, n_videos=1, n_frames=3, size=32, video_size=(32, 48),
                         progress=False)
    return root


KMEANS_SMALL = ["--dataset", "synthetic", "--arch", "vit_nano", "--patch_size", "8", "--img_size", "32",
                "--mask_size", "8", "--pca", "0", "--seeds", "0", "--num_workers", "0", "--device", "cpu",
                "--n_last_blocks", "1", "--n_pictures", "0", "--random_init"]


def test_mask_values_outside_the_class_range_are_refused_naming_them_unless_the_flag_scores_them_as_ignore(tmp_path):
    root = _small_synthetic(tmp_path / "synth")
    mask = root / "VOCdevkit/VOC2012/SegmentationClass/val_000001.png"
    labels = data.read_mask(mask)
    labels[:8] = 50  # a 4-class dataset: 50 is neither a class nor 255
    data.save_palette_png(labels, mask)
    with pytest.raises(data.InputError,
                       match=r"50 \(256 pixels\).*first in .*val_000001\.png.*--ignore_unknown_labels"):
        data.build_segmentation_dataset("synthetic", root, "val")
    out = tmp_path / "out"
    refused = run([sys.executable, "eval_kmeans.py", *KMEANS_SMALL, "--data_path", root, "--output_dir", out],
                  in_process=True)
    assert refused.returncode == 2 and "50 (256 pixels)" in refused.stderr and not out.exists()

    with pytest.warns(RuntimeWarning, match=r"50 \(256 pixels\).*scored as ignore"):
        val = data.build_segmentation_dataset("synthetic", root, "val", ignore_unknown_labels=True)
    assert (val[1][1] == 255).sum() == 256 and (val[1][1][:8] == 255).all() and (val[0][1] != 255).all()
    args = eval_kmeans.get_args_parser().parse_args(KMEANS_SMALL + ["--data_path", str(root), "--output_dir",
                                                                    str(out), "--ignore_unknown_labels"])
    with pytest.warns(RuntimeWarning, match="scored as ignore"):
        results = eval_kmeans.main(args)
    masks = [m for _, m in data.Transformed(val, data.ValTransform(32, 8))]
    assert results["n_valid_pixels"] == sum(int((m != 255).sum()) for m in masks) == 2 * 8 * 8 - 8 * 2


def test_a_failed_rerun_leaves_the_old_config_json_byte_identical(tmp_path):
    out = tmp_path / "old"
    out.mkdir()
    old = b'{"dataset": "synthetic", "written by": "the run whose results are here"}'
    (out / "config.json").write_bytes(old)
    (out / "results.json").write_text("{}")
    missing = str(tmp_path / "nowhere")
    with pytest.raises(data.MissingInput, match="nowhere"):
        run_linear(missing, str(out), "--random_init")
    with pytest.raises(ValueError, match="nowhere"):  # the (in-memory) dataset is fine, the weights are not
        eval_linear.main(eval_linear.get_args_parser().parse_args(COMMON + ["--weights", missing, "--output_dir",
                                                                            str(out)]))
    with pytest.raises(data.MissingInput, match="nowhere"):
        run_kmeans(missing, str(out), "--random_init")
    with pytest.raises(data.MissingInput, match="nowhere"):
        ed.main(run_args(missing, out))
    assert (out / "config.json").read_bytes() == old and sorted(os.listdir(out)) == ["config.json", "results.json"]


@pytest.mark.parametrize("script,flags,named", [
    (eval_linear, ["--epochs", "0"], "--epochs 0: must be at least 1"),
    (eval_linear, ["--lr", "1e-3", "inf"], r"--lr \[0.001, inf\]: every rate must be finite and > 0"),
    (eval_linear, ["--lr", "nan"], "--lr"), (eval_linear, ["--lr", "0"], "--lr"),
    (eval_linear, ["--batch_size", "0"], "--batch_size 0"), (eval_linear, ["--n_last_blocks", "0"], "--n_last_blocks"),
    (eval_linear, ["--img_size", "-8"], "--img_size -8"), (eval_linear, ["--iters", "0"], "--iters 0"),
    (eval_linear, ["--protocol", "mmseg", "--crop_size", "500"], "--crop_size 500"),
    (eval_kmeans, ["--num_clusters", "0"], "--num_clusters 0"), (eval_kmeans, ["--mask_size", "0"], "--mask_size 0"),
    (eval_kmeans, ["--seeds", "0", "-1"], "--seeds"), (eval_kmeans, ["--fit_samples", "0"], "--fit_samples 0"),
    (eval_kmeans, ["--kmeans_iters", "0"], "--kmeans_iters 0"), (eval_kmeans, ["--pca", "-1"], "--pca -1"),
    (ed, ["--topk", "0"], "--topk 0"), (ed, ["--frames_per_forward", "0"], "--frames_per_forward 0"),
    (ed, ["--n_last_blocks", "0"], "--n_last_blocks 0"), (ed, ["--patch_size", "0"], "--patch_size 0"),
    (ed, ["--short_side", "50"], "--short_side 50"), (ed, ["--n_last_frames", "-1"], "--n_last_frames -1")])
def test_eval_flags_out_of_range_are_refused_at_parse_time_with_their_range(script, flags, named):
    args = script.get_args_parser().parse_args(["--random_init"] + flags)
    with pytest.raises(data.InputError, match=named):
        script.check_args(args)


@pytest.mark.parametrize("cmd,named", [
    (["eval_linear.py", "--dataset", "pvoc", "--data_path", "NOWHERE", "--random_init"], "data root NOWHERE"),
    (["eval_kmeans.py", "--dataset", "pvoc", "--data_path", "NOWHERE", "--random_init"], "data root NOWHERE"),
    (["eval_davis.py", "--data_path", "NOWHERE", "--random_init"], "sequence list not found"),
    (["metrics.py", "table", "NOWHERE"], "NOWHERE does not exist"),
    (["data.py", "prepare_voc", "--voc_root", "NOWHERE", "--sbd_cls", "x", "--trainaug_list", "x"],
     "no PASCAL VOC layout found under NOWHERE")])
def test_each_script_reports_a_users_mistake_in_one_line_with_exit_status_2(tmp_path, cmd, named):
    cmd = [str(tmp_path / "nowhere") if a == "NOWHERE" else a for a in cmd]
    r = run([sys.executable, *cmd, *(["--output_dir", str(tmp_path / "out")] if "eval" in cmd[0] else [])],
            in_process=True)
    named = named.replace("NOWHERE", str(tmp_path / "nowhere"))
    assert r.returncode == 2 and r.stderr.startswith(f"{cmd[0]}: error: ") and named in r.stderr, r.stderr
    assert len(r.stderr.strip().splitlines()) == 1 and not (tmp_path / "out").exists()


def _truncate(path):
    """Cut a file written by a fixture to half its bytes, as an interrupted copy or unpacking leaves it."""
    full = Path(path).read_bytes()
    Path(path).write_bytes(full[:len(full) // 2])
    return str(path)


def test_truncated_masks_and_images_are_named_in_one_line_with_exit_status_2(tmp_path):
    root = _small_synthetic(tmp_path / "synth")
    voc = root / "VOCdevkit/VOC2012"
    mask = _truncate(voc / "SegmentationClass/val_000001.png")
    with pytest.raises(data.InputError, match=f"cannot read mask {mask}: OSError"):
        data.read_mask(mask)
    kmeans = [sys.executable, "eval_kmeans.py", *KMEANS_SMALL, "--data_path", root]
    r = run(kmeans + ["--output_dir", tmp_path / "km"], in_process=True)
    assert r.returncode == 2 and f"mask {mask}: OSError" in r.stderr and len(r.stderr.splitlines()) == 1, r.stderr
    shutil.copy(voc / "SegmentationClass/val_000000.png", mask)  # the mask is whole again: now the image is cut
    image = _truncate(voc / "JPEGImages/val_000001.jpg")  # its header is whole: found when a worker loads it
    r = run(kmeans + ["--output_dir", tmp_path / "km", "--num_workers", "1"], in_process=True)
    assert r.returncode == 2 and "Traceback" not in r.stderr, r.stderr  # the worker's traceback unwrapped
    assert r.stderr.splitlines()[-1].startswith(f"eval_kmeans.py: error: cannot read image {image}: OSError: image "
                                                f"file is truncated")  # after the progress bar of the features
    ann = _truncate(root / "DAVIS/Annotations/480p/synth-000/00001.png")
    r = run([sys.executable, "eval_davis.py", "--data_path", root, "--output_dir", tmp_path / "davis", "--arch",
             "vit_nano", "--patch_size", "8", "--short_side", "32", "--device", "cpu", "--random_init"],
            in_process=True)
    assert r.returncode == 2 and r.stderr.startswith("eval_davis.py: error: cannot ") and f" {ann}: OSError" in r.stderr
    assert len(r.stderr.splitlines()) == 1 and not (tmp_path / "davis").exists()  # found before the model


def test_training_checkpoint_loads_its_teacher_backbone_in_both_scripts(synthetic_root, checkpoint, tmp_path,
                                                                          monkeypatch):
    path, teacher = checkpoint
    args = eval_linear.get_args_parser().parse_args(COMMON + ["--weights", path])
    backbone = M.backbone_from_args(args)
    for k, v in teacher.backbone.state_dict().items():
        assert torch.equal(backbone.state_dict()[k], v), k
    assert run_linear(synthetic_root, str(tmp_path / "lin"), "--weights", path)["weights"] == path
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "home"))
    url = Path(path).as_uri()  # DINO's flag name, a URL, and the patch size from the checkpoint's args
    assert run_kmeans(synthetic_root, str(tmp_path / "km"), "--pretrained_weights", url)["weights"] == url
    assert json.load(open(tmp_path / "km" / "config.json"))["patch_size"] == 16


def test_a_narrow_head_trains_and_its_checkpoint_loads_in_every_eval_script(synthetic_root, tmp_path):
    out = tmp_path / "narrow"
    _train_here(out, ["--epochs", "1", "--head_hidden_dim", "24", "--use_bn_in_head", "true"])
    path = str(out / "checkpoint.pth")
    saved = M.torch_load(path)["teacher"]
    assert saved["head.mlp.0.weight"].shape == (24, 96) and saved["head.mlp.3.weight"].shape == (24, 24)
    teacher = CrOCModel(build_vit("vit_nano", 8), CrOCHead(96, out_dim=64, out_dim_c=64, hidden_dim=24, use_bn=True))
    assert M.load_pretrained(teacher, path, key="teacher") == {"missing": [], "unexpected": []}
    nano = ["--arch", "vit_nano", "--patch_size", "8", "--weights", path]
    lin = eval_linear.get_args_parser().parse_args(COMMON + ["--data_path", synthetic_root, "--epochs", "1",
                                                             "--train_mask_size", "32", "--output_dir",
                                                             str(tmp_path / "lin")] + nano)
    assert np.isfinite(eval_linear.main(lin)["miou"])
    assert np.isfinite(run_kmeans(synthetic_root, str(tmp_path / "km"), *nano)["miou_mean"])
    ed.main(ed.get_args_parser().parse_args(["--data_path", synthetic_root, "--output_dir", str(tmp_path / "davis"),
                                             "--short_side", "48", "--device", "cpu"] + nano))
    assert (tmp_path / "davis" / "scores" / "global_results-val.csv").exists()


def test_scripts_require_exactly_one_of_weights_and_random_init():
    args = eval_linear.get_args_parser().parse_args(COMMON)
    with pytest.raises(ValueError, match="--random_init"):
        M.backbone_from_args(args)


def _torchrun_linear_probe(tmp_path):
    root = _write_tiny_synthetic(tmp_path / "synthetic")  # synthetic_root's data
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2", "eval_linear.py",
           *COMMON, "--data_path", root, "--random_init", "--epochs", "1", "--train_mask_size", "32",
           "--n_last_blocks", "1", "2", "--lr", "1e-3", "1e-4", "--n_pictures", "0"]
    return root, tmp_path, _run(cmd, tmp_path)


@early(_torchrun_linear_probe)
def test_torchrun_linear_probe_shards_val_once_and_trains_every_head(early_run):
    root, tmp_path, proc = early_run
    assert proc.returncode == 0, proc.stderr[-3000:]
    results = json.load(open(tmp_path / "results.json"))
    single = run_linear(root, str(tmp_path / "single"), "--random_init", "--n_pictures", "0")
    assert results["n_valid_pixels"] == single["n_valid_pixels"]  # every val image scored exactly once
    assert set(results["runs"]) == {"nb1_lr1e-3", "nb1_lr1e-4", "nb2_lr1e-3", "nb2_lr1e-4"}


# --------------------------------------------------------------------------------------------------------------
# eval_linear.py on ADE20K as App. C ran it (MMSegmentation's 512x512 40k pipeline)
# --------------------------------------------------------------------------------------------------------------
def test_poly_lr_follows_mmsegs_40k_schedule_down_to_one_percent_of_the_rate():
    lr = [eval_linear.poly_lr(1e-3, it, 40000) for it in (0, 20000, 40000)]
    assert lr[0] == pytest.approx(1e-3) and lr[2] == pytest.approx(1e-5)
    assert lr[1] == pytest.approx((1e-3 - 1e-5) * 0.5 ** 0.9 + 1e-5)
    steps = [eval_linear.poly_lr(8e-5, it, 100) for it in range(101)]
    assert all(a > b for a, b in zip(steps, steps[1:]))  # strictly decreasing for every rate of the sweep


def test_rescale_size_keeps_the_ratio_inside_2048_by_512():
    assert eval_linear.rescale_size(683, 512) == (683, 512)
    assert eval_linear.rescale_size(300, 200) == (768, 512)     # short side up to 512
    assert eval_linear.rescale_size(3000, 500) == (2048, 341)   # long side capped at 2048
    assert eval_linear.rescale_size(400, 800, scale=(1024, 256)) == (256, 512)  # ratio 0.5 of the config's scale


def test_mmseg_train_transform_crops_pads_with_ignore_and_keeps_image_and_mask_aligned():
    torch.manual_seed(0)
    img = np.zeros((40, 60, 3), np.uint8)
    img[:, :30, 0] = 255  # left red = class 1, right blue = class 2
    img[:, 30:, 2] = 255
    mask = np.where(np.arange(60)[None, :] < 30, 1, 2).repeat(40, 0).astype(np.uint8)
    transform = eval_linear.MMSegTrainTransform(crop_size=48, scale=(64, 16), ratio_range=(0.5, 2.0))
    padded = 0
    for _ in range(10):
        x, m = transform(Image.fromarray(img), mask)
        assert x.shape == (3, 48, 48) and m.shape == (48, 48) and m.dtype == torch.uint8
        assert set(m.unique().tolist()) <= {1, 2, 255}  # nearest only
        padded += int((m == 255).any())
        assert (x[:, m == 255] == 0).all()  # padding: 0 in normalised space, ignore in the mask
        rgb = x * torch.tensor(data.IMAGENET_STD).view(3, 1, 1) + torch.tensor(data.IMAGENET_MEAN).view(3, 1, 1)
        # the photometric distortion can shift hues, but the red/blue halves stay apart and on their labels
        red, blue = rgb[0] - rgb[2], rgb[2] - rgb[0]
        assert (red[m == 1] > blue[m == 1]).float().mean() > 0.9 or (m == 1).sum() == 0
    assert padded > 0  # the 0.5 ratio gives images smaller than the crop


def test_cat_max_ratio_crop_prefers_crops_no_class_dominates():
    mask = np.zeros((10, 100), np.uint8)
    mask[:, 90:] = 1  # class 0 dominates every crop except those reaching the right end
    rng = np.random.default_rng(0)
    tops_lefts = [eval_linear.cat_max_ratio_crop(mask, 10, rng, cat_max_ratio=0.75, tries=1000) for _ in range(20)]
    for top, left in tops_lefts:
        _, counts = np.unique(mask[top:top + 10, left:left + 10], return_counts=True)
        assert len(counts) > 1 and counts.max() / counts.sum() < 0.75


def test_slide_windows_cover_the_image_on_mmsegs_grid():
    windows = eval_linear.slide_windows(512, 683, 512, 341)
    assert windows == [(0, 512, 0, 512), (0, 512, 171, 683)]
    windows = eval_linear.slide_windows(900, 520, 512, 341)
    assert [w[:2] for w in windows] == [(0, 512), (0, 512), (341, 853), (341, 853), (388, 900), (388, 900)]
    cover = np.zeros((900, 520), int)
    for y1, y2, x1, x2 in windows:
        assert y2 - y1 == 512 and x2 - x1 == 512
        cover[y1:y2, x1:x2] += 1
    assert cover.min() >= 1
    assert eval_linear.slide_windows(300, 200, 512, 341) == [(0, 300, 0, 200)]  # smaller than the crop


def test_slide_logits_average_overlapping_windows_at_the_image_size():
    backbone = build_vit("vit_tiny", 16).eval()
    head = torch.nn.Conv2d(192, 3, 1)
    torch.nn.init.zeros_(head.weight)
    head.bias.data = torch.tensor([1.0, -2.0, 0.5])
    logits = eval_linear.slide_logits(backbone, {"nb1_lr1e-3": head}, torch.randn(3, 50, 70), 32, 16, 192)
    out = logits["nb1_lr1e-3"]
    assert out.shape == (3, 50, 70)
    assert torch.allclose(out, head.bias.view(3, 1, 1).expand(3, 50, 70))  # the mean of equal windows


def _ade_fixture(root, sizes=((56, 40), (34, 50))):
    base = root / "ADEChallengeData2016"
    rng = np.random.default_rng(0)
    for sub in ("training", "validation"):
        for i, (w, h) in enumerate(sizes):
            name = f"ADE_{sub}_{i:08d}"
            _write_image(base / "images" / sub / f"{name}.jpg", (w, h), color=(40 * i, 90, 160))
            _write_mask(base / "annotations" / sub / f"{name}.png", rng.integers(0, 4, (h, w)), palette=False)
    return base


def test_ade20k_protocol_sweeps_every_lr_from_one_pass_and_scores_at_the_original_size(tmp_path):
    _ade_fixture(tmp_path)
    args = eval_linear.get_args_parser().parse_args(
        ["--dataset", "ade20k", "--data_path", str(tmp_path), "--arch", "vit_tiny", "--random_init",
         "--batch_size", "2", "--num_workers", "0", "--device", "cpu", "--n_last_blocks", "1", "--iters", "3",
         "--crop_size", "32", "--slide_stride", "16", "--lr", "1e-3", "1e-4", "--n_pictures", "2",
         "--output_dir", str(tmp_path / "out")])
    results = eval_linear.main(args)
    assert args.protocol == "mmseg" and results["protocol"] == "mmseg" and results["eval_size"] == "original"
    assert set(results["runs"]) == {"nb1_lr1e-3", "nb1_lr1e-4"}
    assert results["best_run"] == max(results["runs"], key=lambda r: results["runs"][r]["miou"])
    # scored at the original size: every pixel of both original masks, labels 1..3 scored, 0 ignored
    masks = [np.array(Image.open(p)) for p in sorted((tmp_path / "ADEChallengeData2016/annotations/validation")
                                                      .glob("*.png"))]
    assert results["n_valid_pixels"] == sum(int((m > 0).sum()) for m in masks)
    assert results["n_valid_pixels"] + results["n_ignored_pixels"] == 56 * 40 + 34 * 50
    for run in results["runs"].values():
        assert int(np.sum(run["confusion"])) == results["n_valid_pixels"] and len(run["confusion"]) == 150
    log = [json.loads(line) for line in open(tmp_path / "out" / "log.txt")]
    assert log[-1]["iter"] == 3 and set(log[-1]["train_loss"]) == set(results["runs"])
    picture = Image.open(tmp_path / "out" / "predictions.png")
    assert picture.size == (3 * 56, 40 + 50)  # image | gt | prediction per row, at each original size


# --------------------------------------------------------------------------------------------------------------
# eval_linear.py: checkpoints, resume, stop signals
# --------------------------------------------------------------------------------------------------------------
def _linear_here(flags, out, monkeypatch=None, stop_at=None, sig=signal.SIGTERM):
    """eval_linear.main in this process. stop_at=k: the signal sig to this process at the k-th stop check (one
    after each step), as a scheduler, Ctrl-C or a closed terminal would send it."""
    args = eval_linear.get_args_parser().parse_args(flags + ["--output_dir", str(out)])
    handlers = {s: signal.getsignal(s) for s in data.StopFlag.SIGNALS}
    should_stop = data.StopFlag.should_stop
    if stop_at is not None:
        checks = [0]

        def signalled(self):
            checks[0] += 1
            if checks[0] == stop_at:
                os.kill(os.getpid(), sig)
            return should_stop(self)
        monkeypatch.setattr(data.StopFlag, "should_stop", signalled)
    try:
        return eval_linear.main(args)
    finally:
        for s, handler in handlers.items():
            signal.signal(s, handler)
        if stop_at is not None:
            monkeypatch.setattr(data.StopFlag, "should_stop", should_stop)


def _linear_resume_flags(case, synthetic_root, tmp_path):
    """4 steps of 2 per epoch: croc (8 images, batch 4, 2 epochs), with the feature cache, mmseg (2 images, batch
    1, --iters 4, two learning rates on the poly schedule, a checkpoint every 2 steps too)."""
    if case == "mmseg":
        _ade_fixture(tmp_path)
        return ["--dataset", "ade20k", "--data_path", str(tmp_path), "--arch", "vit_tiny", "--random_init",
                "--batch_size", "1", "--num_workers", "0", "--device", "cpu", "--n_last_blocks", "1", "--iters", "4",
                "--crop_size", "32", "--slide_stride", "16", "--lr", "1e-3", "1e-4", "--n_pictures", "0",
                "--checkpoint_every", "2"]
    flags = COMMON + ["--data_path", synthetic_root, "--random_init", "--epochs", "2", "--train_mask_size", "32",
                      "--n_pictures", "0"]
    return flags + (["--cache_train_features"] if case == "cache" else [])


@pytest.mark.parametrize("case,sig", [("croc", "SIGTERM"), ("cache", "SIGINT"), ("mmseg", "SIGHUP")])
def test_linear_probe_stopped_twice_by_a_signal_and_resumed_ends_as_an_uninterrupted_run(
        synthetic_root, tmp_path, monkeypatch, capsys, case, sig):
    flags = _linear_resume_flags(case, synthetic_root, tmp_path)
    whole = _linear_here(flags, tmp_path / "whole")
    cut = tmp_path / "cut"
    # stopped after step 1 (mid-epoch), then, resumed, after step 3 (its 2nd check: mid-epoch again)
    assert _linear_here(flags, cut, monkeypatch, stop_at=1, sig=getattr(signal, sig)) is None
    assert f"signal received: saved {cut / 'linear_checkpoint.pth'} at step 1" in capsys.readouterr().out
    assert M.torch_load(str(cut / "linear_checkpoint.pth"))["step"] == 1 and not (cut / "results.json").exists()
    assert _linear_here(flags, cut, monkeypatch, stop_at=2, sig=getattr(signal, sig)) is None
    assert "resumed from" in capsys.readouterr().out
    assert M.torch_load(str(cut / "linear_checkpoint.pth"))["step"] == 3
    resumed = _linear_here(flags, cut)
    assert resumed == whole  # every mIoU, IoU and confusion matrix
    assert (cut / "results.json").read_bytes() == (tmp_path / "whole" / "results.json").read_bytes()
    assert (cut / "log.txt").read_bytes() == (tmp_path / "whole" / "log.txt").read_bytes()  # its losses too
    a, b = (torch.load(tmp_path / run / "linear_heads.pth", weights_only=True) for run in ("whole", "cut"))
    assert all(torch.equal(a[n][k], b[n][k]) for n in a for k in a[n])  # the heads, bit for bit
    a, b = (M.torch_load(str(tmp_path / run / "linear_checkpoint.pth")) for run in ("whole", "cut"))
    assert a["step"] == b["step"] == 4
    for sa, sb in zip(a["optimizer"]["state"].values(), b["optimizer"]["state"].values()):
        assert all(torch.equal(sa[k], sb[k]) for k in sa)  # Adam's moments and step counts
    assert not [f for f in os.listdir(cut) if ".tmp" in f]


def test_linear_probe_resume_refuses_a_flag_that_changes_the_numbers_and_keeps_what_was_written(
        synthetic_root, tmp_path, capsys):
    flags = COMMON + ["--data_path", synthetic_root, "--random_init", "--epochs", "1", "--train_mask_size", "32",
                      "--n_pictures", "0"]
    first = _linear_here(flags, tmp_path)
    names = ("results.json", "config.json", "log.txt", "linear_checkpoint.pth", "linear_heads.pth")
    written = {n: (tmp_path / n).read_bytes() for n in names}
    with pytest.raises(data.InputError) as e:
        _linear_here(flags + ["--epochs", "2", "--lr", "1e-4", "--train_mask_size", "16"], tmp_path)
    assert "--epochs 1 -> 2; --lr [0.001] -> [0.0001]; --train_mask_size 32 -> 16" in str(e.value)
    assert all((tmp_path / n).read_bytes() == b for n, b in written.items())
    capsys.readouterr()
    # the same command, loaded by another number of workers: resumed after its last step, evaluated again
    assert _linear_here(flags + ["--num_workers", "1"], tmp_path) == first
    assert f"resumed from {tmp_path / 'linear_checkpoint.pth'} at step 2" in capsys.readouterr().out
    assert all((tmp_path / n).read_bytes() == written[n] for n in ("results.json", "log.txt", "linear_checkpoint.pth",
                                                                   "linear_heads.pth"))


def test_cached_batches_draw_a_new_order_each_epoch_and_skip_the_samples_seen():
    feats, masks = torch.arange(10.0)[:, None], torch.arange(10)[:, None]
    batches = eval_linear.CachedBatches(feats, masks, 3, [0, 1])
    orders = []
    for epoch in (0, 1, 0):
        batches.set_epoch(epoch)
        orders.append(torch.cat([f for f, _ in batches]).flatten().tolist())
    assert sorted(orders[0]) == list(range(10)) and orders[0] != orders[1] and orders[0] == orders[2]
    batches.set_epoch(1, skip=6)
    assert len(batches) == 2 and torch.cat([f for f, _ in batches]).flatten().tolist() == orders[1][6:]


def test_a_signal_during_the_linear_probe_evaluation_lets_it_write_its_results(synthetic_root, tmp_path, monkeypatch,
                                                                              capsys):
    """The heads are saved when the evaluation starts; a stop signal to the process and its DataLoader worker (as
    to a job's process group) lets the evaluation run to its end."""
    predict, sent = eval_linear.predict, []

    def signalled(*a, **k):
        if not sent:  # at the first val batch
            sent.extend(worker.pid for worker in multiprocessing.active_children())
            for pid in sent + [os.getpid()]:
                os.kill(pid, signal.SIGTERM)
        return predict(*a, **k)
    monkeypatch.setattr(eval_linear, "predict", signalled)
    flags = COMMON + ["--data_path", synthetic_root, "--random_init", "--epochs", "1", "--train_mask_size", "32",
                      "--n_pictures", "0", "--batch_size", "1", "--num_workers", "1"]  # 4 val batches
    results = _linear_here(flags, tmp_path)
    assert len(sent) == 1 and results["n_val_images"] == 4  # a worker was signalled too
    assert json.loads((tmp_path / "results.json").read_text()) == results
    assert "signal received during the evaluation" in capsys.readouterr().out


def _torchrun_ranks(pid):
    """{rank: pid} of the processes that torchrun `pid` started (each the leader of a process group)."""
    ranks = {}
    for child in filter(str.isdigit, os.listdir("/proc")):
        try:
            with open(f"/proc/{child}/stat") as f:
                if int(f.read().rsplit(")", 1)[1].split()[1]) != pid:
                    continue
            with open(f"/proc/{child}/environ", "rb") as f:
                env = dict(e.split(b"=", 1) for e in f.read().split(b"\0") if b"=" in e)
            ranks[int(env[b"RANK"])] = int(child)
        except (OSError, KeyError, ValueError):
            pass
    return ranks


def _signal_to_one_rank_of_a_linear_probe(tmp_path):
    """torchrun with 2 ranks, each with a DataLoader worker; once the first checkpoint is written, SIGTERM to rank
    1's process group (rank 1 and its worker), as torchrun forwards a signal -> (folder, torchrun's exit code,
    its output, the processes still naming the folder 15 s after it ended)."""
    root, out = _write_tiny_synthetic(tmp_path / "synthetic"), tmp_path / "run"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2", "eval_linear.py",
           *COMMON, "--data_path", root, "--random_init", "--epochs", "100000", "--train_mask_size", "32",
           "--num_workers", "1", "--checkpoint_every", "1", "--output_dir", str(out)]  # epochs of 1 step
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1")
    proc = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            start_new_session=True)
    try:
        deadline = time.time() + 180
        while not (out / "linear_checkpoint.pth").exists() and time.time() < deadline and proc.poll() is None:
            time.sleep(0.1)
        ranks = _torchrun_ranks(proc.pid)
        os.killpg(ranks[1], signal.SIGTERM)
        text = proc.communicate(timeout=120)[0]
    finally:
        if proc.poll() is None:  # a failure: the ranks too, which torchrun starts in sessions of their own
            for rank in _torchrun_ranks(proc.pid).values():
                os.killpg(rank, signal.SIGKILL)
            os.killpg(proc.pid, signal.SIGKILL)
    deadline = time.time() + 15
    while _processes_mentioning(str(out)) and time.time() < deadline:
        time.sleep(0.5)
    return out, proc.returncode, text, _processes_mentioning(str(out))


@early(_signal_to_one_rank_of_a_linear_probe)
def test_a_signal_to_one_rank_of_a_torchrun_linear_probe_stops_every_rank_saved_with_exit_status_0(early_run):
    out, code, text, left = early_run
    assert code == 0, text[-4000:]  # torchrun saw no signal: its status is its ranks'
    assert "signal received: saved" in text and "Traceback" not in text, text[-4000:]
    ckpt = M.torch_load(str(out / "linear_checkpoint.pth"))
    assert 1 <= ckpt["step"] < 100000 and ckpt["world_size"] == 2
    assert [r["epoch"] for r in _log(out)] == list(range(1, ckpt["step"] + 1))  # log.txt as far as the checkpoint
    assert not [f for f in os.listdir(out) if ".tmp" in f] and not (out / "results.json").exists()
    assert left == []


# --------------------------------------------------------------------------------------------------------------
# eval_davis.py: J and F (davis2017-evaluation metrics.py)
# --------------------------------------------------------------------------------------------------------------
def square(h, w, top, left, size):
    m = np.zeros((h, w), dtype=bool)
    m[top:top + size, left:left + size] = True
    return m


def slow_f_measure(pred, gt, bound_th=0.008):
    """Independent F: per-pixel loops for the boundary, Euclidean distances instead of a dilation."""
    def boundary(seg):
        h, w = seg.shape
        at = lambda i, j: bool(seg[i, j]) if i < h and j < w else False  # zeros shifted in
        b = np.zeros_like(seg, dtype=bool)
        for i in range(h):
            for j in range(w):
                if i == h - 1 and j == w - 1:
                    continue
                if i == h - 1:
                    b[i, j] = at(i, j) != at(i, j + 1)
                elif j == w - 1:
                    b[i, j] = at(i, j) != at(i + 1, j)
                else:
                    b[i, j] = any(at(i, j) != at(i + di, j + dj) for di, dj in ((0, 1), (1, 0), (1, 1)))
        return b

    r = math.ceil(bound_th * math.hypot(*pred.shape))
    bp, bg = np.argwhere(boundary(pred)), np.argwhere(boundary(gt))
    if len(bp) == 0 or len(bg) == 0:
        return 1.0 if len(bp) == len(bg) else 0.0
    d2 = ((bp[:, None, :] - bg[None, :, :]) ** 2).sum(-1)  # squared distances, pred x gt boundary pixels
    precision = (d2.min(axis=1) <= r * r).mean()
    recall = (d2.min(axis=0) <= r * r).mean()
    return 0.0 if precision + recall == 0 else 2 * precision * recall / (precision + recall)


def test_j_and_f_are_one_on_two_empty_masks():
    empty = np.zeros((2, 30, 40), dtype=bool)
    assert ed.region_similarity(empty, empty).tolist() == [1.0, 1.0]
    assert ed.contour_accuracy(empty, empty).tolist() == [1.0, 1.0]


def test_j_and_f_are_zero_when_one_mask_is_empty():
    empty = np.zeros((1, 30, 40), dtype=bool)
    full = square(30, 40, 5, 5, 10)[None]
    for pred, gt in ((empty, full), (full, empty)):
        assert ed.region_similarity(pred, gt).tolist() == [0.0]
        assert ed.contour_accuracy(pred, gt).tolist() == [0.0]


def test_j_and_f_are_one_on_identical_squares():
    m = square(60, 80, 10, 20, 25)[None]
    assert ed.region_similarity(m, m).tolist() == [1.0]
    assert ed.contour_accuracy(m, m).tolist() == [1.0]


def test_one_pixel_shift_keeps_f_at_one_and_j_at_hand_value():
    gt = square(100, 100, 30, 20, 40)[None]
    pred = square(100, 100, 30, 21, 40)[None]
    assert ed.region_similarity(pred, gt)[0] == pytest.approx(40 * 39 / (40 * 41))
    assert ed.contour_accuracy(pred, gt)[0] == 1.0  # radius ceil(0.008 * 141.4) = 2 > 1


def test_twenty_pixel_shift_matches_hand_computed_j_and_f():
    # 100x100 frame: radius ceil(1.13) = 2. Each boundary is the 41x41 box perimeter (160 px); with a 20 px shift
    # 23 px on the top row, 23 on the bottom row and 4 on the near side are within 2 px of the other boundary.
    gt = square(100, 100, 30, 20, 40)[None]
    pred = square(100, 100, 30, 40, 40)[None]
    assert ed.region_similarity(pred, gt)[0] == pytest.approx(800 / 2400)
    assert ed.contour_accuracy(pred, gt)[0] == pytest.approx(50 / 160)
    assert ed.contour_accuracy(pred, gt)[0] == pytest.approx(slow_f_measure(pred[0], gt[0]))


def test_f_matches_an_independent_loop_implementation_on_random_blobs():
    rng = np.random.default_rng(0)
    for _ in range(3):
        pred = rng.random((24, 33)) > 0.6
        gt = np.roll(pred, (2, -3), axis=(0, 1)) | (rng.random((24, 33)) > 0.9)
        for bound_th in (0.008, 0.05, 2):
            expected = slow_f_measure(pred, gt, bound_th if bound_th < 1 else 2 / math.hypot(24, 33))
            assert ed.contour_accuracy(pred[None], gt[None], bound_th)[0] == pytest.approx(expected)


def test_boundary_is_absent_along_the_image_border():
    top_rows = np.zeros((20, 30), dtype=bool)
    top_rows[:10] = True  # touches top, left and right borders
    expected = np.zeros_like(top_rows)
    expected[9] = True  # only the inner edge, on the last row of the mask
    assert (ed.seg2bmap(top_rows) == expected).all()
    left_cols = np.zeros((20, 30), dtype=bool)
    left_cols[:, :5] = True
    expected = np.zeros_like(left_cols)
    expected[:, 4] = True
    assert (ed.seg2bmap(left_cols) == expected).all()
    assert not ed.seg2bmap(np.ones((20, 30), dtype=bool)).any()
    assert ed.contour_accuracy(top_rows[None], top_rows[None]).tolist() == [1.0]


def test_disk_is_the_skimage_disk():
    d = ed.disk(8)
    assert d.shape == (17, 17) and d[8].all() and d[:, 8].all() and not d[0, 0]
    assert d.sum() == sum(1 for x in range(-8, 9) for y in range(-8, 9) if x * x + y * y <= 64)
    assert ed.boundary_radius(480, 854) == 8 and ed.boundary_radius(480, 1152) == 10


def test_decay_uses_the_official_bins_with_shared_edges():
    mean, recall, decay = ed.per_object_statistics(np.arange(10) / 10)
    # ids = round(linspace(1, 10, 5) + 1e-10) - 1 = [0, 2, 5, 7, 9]: bins [0:3] and [7:10]
    assert (mean, recall) == (pytest.approx(0.45), pytest.approx(0.4))
    assert decay == pytest.approx(np.mean([0, .1, .2]) - np.mean([.7, .8, .9]))
    # N = 7: the 1e-10 makes round(2.5) = 3, so bin 0 is [0:3] (not [0:2] as banker's rounding would give)
    assert ed.per_object_statistics(np.arange(7.0))[2] == pytest.approx(1.0 - 5.5)
    # N = 3: round(2.5 + 1e-10) = 3, so bin 3 is [2:3] only
    assert ed.per_object_statistics(np.array([1.0, 0.5, 0.0]))[2] == pytest.approx(0.75)


def test_sequence_scores_skip_first_and_last_frames_and_pad_missing_objects():
    gt = np.zeros((5, 20, 20), dtype=np.uint8)
    gt[:, 2:8, 2:8] = 1
    gt[:, 12:18, 12:18] = 2
    res = np.where(gt == 1, 1, 0).astype(np.uint8)  # object 2 never predicted
    res[0] = 0
    res[-1] = 0  # wrong first and last frames are not scored
    j, f = ed.evaluate_sequence(gt, res)
    assert j.shape == (2, 3) and (j[0] == 1).all() and (j[1] == 0).all() and (f[1] == 0).all()
    with pytest.raises(ValueError, match="id 3"):
        ed.evaluate_sequence(gt, np.where(gt == 2, 3, gt).astype(np.uint8), name="seq")


def test_global_results_average_over_objects_not_sequences(tmp_path):
    per_object = [("a_1", np.ones(4), np.ones(4)), ("b_1", np.zeros(4), np.ones(4)), ("b_2", np.zeros(4), np.zeros(4))]
    glob, rows = ed.summarize(per_object)
    assert glob["J-Mean"] == pytest.approx(1 / 3) and glob["F-Mean"] == pytest.approx(2 / 3)
    assert glob["J&F-Mean"] == pytest.approx(0.5)
    g, s = ed.write_results_csv(tmp_path, "val", glob, rows)
    assert g.read_text() == ("J&F-Mean,J-Mean,J-Recall,J-Decay,F-Mean,F-Recall,F-Decay\n"
                             "0.500,0.333,0.333,0.000,0.667,0.667,0.000\n")
    assert s.read_text().splitlines()[:2] == ["Sequence,J-Mean,F-Mean", "a_1,1.000,1.000"]


# --------------------------------------------------------------------------------------------------------------
# eval_davis.py: label propagation (DINO eval_video_segmentation.py)
# --------------------------------------------------------------------------------------------------------------
def test_propagating_a_static_video_reproduces_the_first_frame():
    torch.manual_seed(0)
    feat = torch.randn(64, 6, 8)
    first = F.one_hot(torch.randint(0, 3, (6, 8)), 3).permute(2, 0, 1).float()
    soft = ed.propagate(feat.expand(10, -1, -1, -1), first)
    assert soft.shape == (10, 3, 6, 8) and torch.equal(soft[0], first)
    assert torch.equal(soft.argmax(1), first.argmax(0).expand(10, -1, -1))
    assert torch.allclose(soft.sum(1), torch.ones(10, 6, 8))
    expected = ed.labels_to_mask(first, 16, (128, 96))  # what frame 0's one-hot map gives through the output path
    assert expected.shape == (96, 128)
    # the soft maps differ from one-hot by < 0.5%: only near-ties of the bilinear upsampling may flip (< 0.1%)
    assert all((ed.labels_to_mask(s, 16, (128, 96)) != expected).mean() < 1e-3 for s in soft[1:])


def test_object_moving_by_whole_patches_is_followed_with_position_free_features():
    # Features say only "object" or "background" (one-hot identity), never where: appearance is the only cue.
    T, h, w = 6, 6, 10
    obj = torch.zeros(T, h, w, dtype=torch.long)
    for t in range(T):
        obj[t, 2:4, 1 + t:3 + t] = 1  # a 2x2-patch object moving one patch right per frame
    feats = F.one_hot(obj, 2).permute(0, 3, 1, 2).float()  # (T, 2, h, w)
    first = F.one_hot(obj[0], 2).permute(2, 0, 1).float()
    soft = ed.propagate(feats, first, n_last_frames=2, size_mask_neighborhood=3, topk=5)
    assert torch.equal(soft.argmax(1), obj)


def test_topk_cut_keeps_ties_at_the_kth_value():
    # identical features: every source ties, so every source is kept and each target gets the mean label
    feats = torch.ones(2, 4, 3, 5)
    first = torch.zeros(2, 3, 5)
    first[0, :, :2] = 1
    first[1, :, 2:] = 1
    soft = ed.propagate(feats, first, size_mask_neighborhood=0, topk=1)
    assert torch.allclose(soft[1], first.mean(dim=(1, 2), keepdim=True).expand(2, 3, 5))


def test_topk_is_joint_over_all_context_frames():
    # target matches context frame 1 (label 1) better than frame 0 (label 0) at every patch: with top-1 over both
    # frames jointly, only frame 1 contributes (a per-frame top-1 would mix both labels).
    tar = torch.tensor([1.0, 0.0]).view(2, 1, 1).expand(2, 2, 2)
    ctx = torch.stack([torch.tensor([0.8, 0.6]).view(2, 1, 1).expand(2, 2, 2), tar])
    labels = torch.stack([torch.tensor([1.0, 0.0]).view(2, 1, 1).expand(2, 2, 2),
                          torch.tensor([0.0, 1.0]).view(2, 1, 1).expand(2, 2, 2)])
    out = ed.label_propagation(tar, ctx, labels, mask=ed.neighbourhood_mask(2, 2, 0), topk=1)
    assert torch.allclose(out[1], torch.ones(2, 2))


def test_neighbourhood_mask_is_a_chebyshev_window_on_the_patch_grid():
    h, w, r = 5, 7, 2
    mask = ed.neighbourhood_mask(h, w, r).view(h, w, h, w)
    loops = torch.zeros(h, w, h, w, dtype=torch.bool)
    for i in range(h):
        for j in range(w):
            for p in range(max(i - r, 0), min(i + r + 1, h)):
                for q in range(max(j - r, 0), min(j + r + 1, w)):
                    loops[i, j, p, q] = True
    assert torch.equal(mask, loops)


def test_norm_mask_rescales_each_positive_channel_to_unit_range():
    m = torch.tensor([[[0.2, 0.6]], [[0.0, 0.0]], [[-1.0, -0.5]]])
    out = ed.norm_mask(m.clone())
    assert torch.allclose(out[0], torch.tensor([[0.0, 1.0]]))
    assert torch.equal(out[1], m[1]) and torch.equal(out[2], m[2])


def test_working_size_floors_the_long_side_to_a_multiple_of_64():
    assert ed.working_size(854, 480) == (480, 832)
    assert ed.working_size(910, 480) == (480, 896)
    assert ed.working_size(1152, 480) == (480, 1152)
    assert ed.working_size(480, 854) == (832, 480)
    assert ed.working_size(500, 500) == (480, 448)  # square: one rule (landscape) for frames and masks


# --------------------------------------------------------------------------------------------------------------
# eval_davis.py end to end
# --------------------------------------------------------------------------------------------------------------
def write_tiny_davis(root, n_frames=4, size=(48, 96), n_seqs=2):
    """DAVIS-2017 layout with squares moving across a textured background; seq i has i + 1 objects."""
    h, w = size
    rng = np.random.default_rng(0)
    palette = data.VOC_PALETTE
    names = [f"seq{i}" for i in range(n_seqs)]
    for i, name in enumerate(names):
        (root / "JPEGImages" / "480p" / name).mkdir(parents=True)
        (root / "Annotations" / "480p" / name).mkdir(parents=True)
        bg = rng.integers(0, 80, (h, w, 3))
        for t in range(n_frames):
            img, ann = bg.copy(), np.zeros((h, w), dtype=np.uint8)
            for k in range(i + 1):
                top, left = 8 + 16 * k, 10 + 5 * t
                ann[top:top + 14, left:left + 20] = k + 1
                img[top:top + 14, left:left + 20] = (230, 40 + 150 * k, 60)
            Image.fromarray(img.astype(np.uint8)).save(root / "JPEGImages" / "480p" / name / f"{t:05d}.jpg")
            data.save_palette_png(ann, root / "Annotations" / "480p" / name / f"{t:05d}.png", palette)
    (root / "ImageSets" / "2017").mkdir(parents=True)
    (root / "ImageSets" / "2017" / "val.txt").write_text("\n".join(names) + "\n")
    return names


def run_args(data_path, out_dir, *extra):
    return ed.get_args_parser().parse_args(
        ["--data_path", str(data_path), "--output_dir", str(out_dir), "--random_init", "--arch", "vit_tiny",
         "--patch_size", "16", "--short_side", "48", "--device", "cpu", *extra])


def test_script_writes_palette_pngs_at_original_size_and_both_csv_files(tmp_path):
    names = write_tiny_davis(tmp_path / "DAVIS")
    out = tmp_path / "out"
    results = ed.main(run_args(tmp_path, out, "--frames_per_forward", "3"))  # finds DAVIS/ under data_path
    for name in names:
        for t in range(4):
            img = Image.open(out / name / f"{t:05d}.png")
            assert img.mode == "P" and img.size == (96, 48)
    first = np.array(Image.open(out / names[1] / "00000.png"))
    assert (first == np.array(Image.open(tmp_path / "DAVIS" / "Annotations" / "480p" / names[1] / "00000.png"))).all()
    with open(out / ed.SCORES_DIR / "global_results-val.csv") as fh:
        rows = list(csv.reader(fh))
    assert rows[0] == ed.GLOBAL_COLUMNS and len(rows) == 2
    with open(out / ed.SCORES_DIR / "per-sequence_results-val.csv") as fh:
        rows = list(csv.reader(fh))
    assert [r[0] for r in rows[1:]] == ["seq0_1", "seq1_1", "seq1_2"]
    assert 0.0 <= results["J&F-Mean"] <= 1.0 and (out / "config.json").is_file()


def test_script_with_data_py_synthetic_videos(tmp_path):
    import data

    data.write_synthetic(tmp_path, n_train=1, n_val=1, n_videos=2, n_frames=4, progress=False)
    index = ed.load_davis_index(tmp_path, "val")
    w, h = index[0].size
    short = (min(w, h) // 16) * 16
    out = tmp_path / "out"
    results = ed.main(run_args(tmp_path, out, "--short_side", str(short), "--seqs", index[0].name))
    assert Image.open(out / index[0].name / index[0].annotations[-1].name).size == (w, h)
    assert 0.0 <= results["J&F-Mean"] <= 1.0


def test_davis_results_folder_holds_no_csv_the_official_tool_would_echo(tmp_path):
    write_tiny_davis(tmp_path / "DAVIS", n_seqs=1)
    out = tmp_path / "out"
    out.mkdir()
    (out / "global_results-val.csv").write_text("stale\n")  # as left by an earlier official run
    (out / "per-sequence_results-val.csv").write_text("stale\n")
    ed.main(run_args(tmp_path, out))
    assert ed.official_csvs(out) == [] and not list(out.glob("*.csv"))
    assert sorted(p.name for p in (out / ed.SCORES_DIR).glob("*.csv")) == ["global_results-val.csv",
                                                                        "per-sequence_results-val.csv"]
    assert (out / "seq0" / "00003.png").is_file()
    table = metrics.combined_table([str(out)]).splitlines()  # results.json: beside the PNGs, ignored by the tool
    assert table[1].split()[:3] == ["out", "davis", "davis2017"]


def break_first_annotation(root):
    (root / "Annotations/480p/seq0/00000.png").unlink()
    return root / "Annotations/480p/seq0/00000.png"


def break_count(root):
    (root / "Annotations/480p/seq1/00003.png").unlink()
    return root / "Annotations/480p/seq1"


def break_size(root):
    path = root / "Annotations/480p/seq1/00002.png"
    data.save_palette_png(np.zeros((40, 96), dtype=np.uint8), path, data.VOC_PALETTE)
    return path


def break_mode(root):
    path = root / "Annotations/480p/seq0/00001.png"
    Image.new("RGB", (96, 48)).save(path)
    return path


def break_set_file(root):
    (root / "ImageSets/2017/val.txt").unlink()
    return root / "ImageSets/2017/val.txt"


def break_sequence_folder(root):
    path = root / "JPEGImages/480p/seq1"
    for f in path.iterdir():
        f.unlink()
    path.rmdir()
    return path


@pytest.mark.parametrize("breaker", [break_first_annotation, break_count, break_size, break_mode, break_set_file,
                                     break_sequence_folder])
def test_bad_input_raises_value_error_naming_the_file(tmp_path, breaker):
    write_tiny_davis(tmp_path)
    path = breaker(tmp_path)
    with pytest.raises(ValueError, match=str(path)):
        ed.main(run_args(tmp_path, tmp_path / "out"))  # raised before the model is built
    assert not (tmp_path / "out").exists()


def test_void_in_the_first_annotation_is_background():
    ann = np.zeros((32, 64), dtype=np.uint8)
    ann[:16, :16] = 255
    ann[16:, 32:] = 1
    labels = ed.first_frame_labels(ann, (32, 64), 16)
    assert labels.shape == (2, 2, 4) and labels[0, 0, 0] == 1 and labels[1, 1, 2] == 1


# ==============================================================================================================
# 6. visualize.py and train.py --visualize_every
# ==============================================================================================================
VIS_TINY = TINY + ["--synthetic_images", "8", "--epochs", "1"]


def _vis_problems(seed=0, n_problems=5, n=40, d=8):
    gen = torch.Generator().manual_seed(seed)
    return (torch.randn(n_problems, n, d, generator=gen), 64 * torch.rand(n_problems, n, 2, generator=gen),
            torch.randn(n_problems, d, generator=gen))


# --------------------------------------------------------------------------------------------------------------
# clustering.cluster(return_steps=True): every merge step's labels, for the pictures
# --------------------------------------------------------------------------------------------------------------
def test_cluster_return_steps_leaves_the_result_unchanged_and_is_empty_by_default():
    tokens, positions, cls = _vis_problems()
    plain = cluster(tokens, positions, cls, k_start=7, k_max=5, generator=torch.Generator().manual_seed(1))
    steps = cluster(tokens, positions, cls, k_start=7, k_max=5, generator=torch.Generator().manual_seed(1),
                    return_steps=True)
    for name in ("assignment", "valid", "k", "d_c"):
        assert torch.equal(getattr(plain, name), getattr(steps, name)), name
    assert plain.steps.shape == (5, 0, 40) and plain.steps.dtype == torch.long
    assert steps.steps.shape == (5, 6, 40) and steps.steps.dtype == torch.long


def test_cluster_steps_name_clusters_by_seed_and_match_the_selected_assignment():
    tokens, positions, cls = _vis_problems(seed=3)
    k_start = 8
    res = cluster(tokens, positions, cls, k_start=k_start, k_max=6, generator=torch.Generator().manual_seed(2),
                  return_steps=True)
    steps = res.steps  # (P, k_start - 1, 2N)
    assert steps.min() >= 0 and steps.max() < k_start
    for p in range(tokens.shape[0]):
        for s in range(k_start - 1):  # at step K, at most K names are in use
            assert len(set(steps[p, s].tolist())) <= k_start - s
        # the selected step, pruned (Eq. 16), is exactly the result's assignment, up to the column order
        labels = steps[p, k_start - res.k[p]]
        kept = torch.tensor(visualize.kept_names(labels.view(2, -1).numpy(), k_start))
        assigned = res.assignment[p].sum(dim=1) > 0
        assert torch.equal(assigned, kept[labels])
        assert int(kept.sum()) == int(res.valid[p].sum())
        column = res.assignment[p].argmax(dim=1)
        a, b = labels[assigned], column[assigned]
        assert torch.equal(a[:, None] == a[None, :], b[:, None] == b[None, :])


def test_cluster_steps_keep_a_merged_clusters_name_through_the_merges():
    """Four groups of tokens, seeded one each in order; groups 2 and 3 are the most alike, then 0 and 1: the merges
    go (2, 3) then (0, 1), and each merged cluster keeps its first seed's name, so a colour follows its cluster."""
    e = torch.eye(4)
    directions = torch.stack([e[0], torch.nn.functional.normalize(e[1] + 0.3145 * e[0], dim=0),  # cos 0.3
                              e[2], torch.nn.functional.normalize(e[2] + 0.75 * e[3], dim=0)])  # cos 0.8
    group = (torch.arange(32) % 16) // 4  # 4 tokens of each group in each view
    tokens = directions[group] + 0.01 * torch.randn(32, 4, generator=torch.Generator().manual_seed(0))
    positions = 64 * torch.rand(1, 32, 2, generator=torch.Generator().manual_seed(1))
    res = cluster(tokens[None], positions, k_start=4, lambda_pos=0.0, uniform_marginals=True,
                  seeds=torch.tensor([[0, 4, 8, 12]]), return_steps=True)
    names = torch.tensor([[0, 1, 2, 3], [0, 1, 2, 2], [0, 0, 2, 2]])  # (step, group): K = 4, 3, 2
    assert torch.equal(res.steps[0], names[:, group])


# --------------------------------------------------------------------------------------------------------------
# visualize.py
# --------------------------------------------------------------------------------------------------------------
def _vis_args(extra=()):
    args = train.get_args_parser().parse_args(VIS_TINY + list(extra))
    args.k_max = args.k_max or args.k_start
    return args


def test_render_clusters_writes_a_png_of_the_layout_size(tmp_path):
    args = _vis_args()
    torch.manual_seed(0)
    backbone = build_vit("vit_tiny", 16).eval()
    dataset = data.SyntheticPretrain(3, 64, 0, data.TwoViews(64, 16))
    views, positions, originals = visualize.fixed_batch(dataset, 2, seed=0)
    assert views.shape == (2, 2, 3, 64, 64) and positions.shape == (2, 2, 16, 2) and len(originals) == 2
    tile, path = 64, tmp_path / "c.png"
    fig, c = visualize.render_clusters(backbone, views, positions, args, str(path), originals, tile=tile)
    B, H, steps = 2, 3, args.k_start - 1  # vit_tiny: 3 heads
    V = visualize
    width = 2 * V.MARGIN + 4 * tile + 3 * V.GAP + V.SECTION + steps * (tile // 2) + (steps - 1) * V.GAP
    height = 2 * V.MARGIN + V.TITLE + B * (V.CAPTION + tile + H * (V.GAP + V.CAPTION + tile)) + (B - 1) * V.SECTION
    with Image.open(path) as im:
        assert im.format == "PNG" and im.mode == "RGB" and im.size == (width, height)
    assert V.figure_size(B, H, steps, tile) == (width, height)
    assert c["labels"].shape == (B, H, steps, 2, 4, 4) and c["attention"].shape == (B, H, 2, 4, 4)
    assert ((c["k"] >= 2) & (c["k"] <= args.k_start)).all()
    assert np.array(fig).std() > 10  # not a blank canvas


def test_render_clusters_with_final_tokens_draws_one_row():
    args = _vis_args(["--which_features", "last"])
    views, positions, _ = visualize.fixed_batch(data.SyntheticPretrain(1, 64, 0, data.TwoViews(64, 16)), 1)
    fig, c = visualize.render_clusters(build_vit("vit_tiny", 16), views, positions, args, tile=64)
    assert c["labels"].shape[1] == 1 and c["attention"].shape[1] == 1  # attention averaged over heads
    assert fig.size == visualize.figure_size(1, 1, args.k_start - 1, 64)


def _cli(tmp_path, name, seed):
    out = tmp_path / name
    parser = visualize.get_args_parser()
    visualize.main(parser.parse_args(["--random_init", "--arch", "vit_tiny", "--patch_size", "16", "--img_size",
                                      "64", "--synthetic_size", "64", "--synthetic_index", "2", "--k_start", "5",
                                      "--tile", "64", "--seed", str(seed), "--output", str(out)]))
    return out.read_bytes()


def test_visualize_cli_is_deterministic_for_the_same_seed(tmp_path):
    first, again, other = _cli(tmp_path, "a.png", 0), _cli(tmp_path, "b.png", 0), _cli(tmp_path, "c.png", 1)
    assert first == again
    assert first != other


def test_visualize_cli_reads_its_settings_from_a_training_checkpoint(tmp_path, capsys):
    args = train.get_args_parser().parse_args(VIS_TINY + ["--lambda_pos", "2.5", "--which_features", "k"])
    model = build_vit("vit_tiny", 16)
    torch.save({"teacher": {"backbone." + k: v for k, v in model.state_dict().items()}, "args": vars(args)},
               tmp_path / "checkpoint.pth")
    out = tmp_path / "c.png"
    visualize.main(visualize.get_args_parser().parse_args(["--weights", str(tmp_path / "checkpoint.pth"),
                                                           "--tile", "32", "--output", str(out)]))
    printed = capsys.readouterr().out
    assert "all" in printed and "keys matched" in printed
    assert "lambda_pos: 2.5" in printed and "which_features: k" in printed and "k_start: 6" in printed
    with Image.open(out) as im:
        assert im.size == visualize.figure_size(1, 3, 5, 32)


def test_curves_draw_a_real_training_log_and_name_a_broken_line(checkpoint, tmp_path):
    """`visualize.py --log` draws train.py's own log.txt (the checkpoint fixture's run); a broken line is named."""
    log = os.path.join(os.path.dirname(checkpoint[0]), "log.txt")
    records = visualize.read_log(log)
    assert len(records) == 2 and {"loss", "teacher_entropy", "mean_k", "kept_centroids"} <= set(records[0])
    out = tmp_path / "curves.png"
    visualize.main(visualize.get_args_parser().parse_args(["--log", log, "--output", str(out)]))
    image = np.asarray(Image.open(out).convert("RGB"))
    assert image.shape[0] > 400 and image.shape[1] > 400
    # every panel with a logged key drew a coloured curve, not only the grey frames and text
    assert (np.abs(image.astype(int) - np.array(visualize.PALETTE[0])).sum(-1) < 10).sum() > 50
    broken = tmp_path / "log.txt"
    broken.write_text(open(log).read() + "{not json\n")
    with pytest.raises(ValueError, match="line 3"):
        visualize.read_log(str(broken))


def test_visualize_user_errors_read_as_one_line_with_exit_2_naming_the_file_or_flag(tmp_path):
    """A truncated --image (Pillow's own message does not name it), a missing file, a flag out of its range."""
    image = tmp_path / "photo.png"
    Image.fromarray(np.random.default_rng(0).integers(0, 255, (64, 64, 3), dtype=np.uint8)).save(image)
    image.write_bytes(image.read_bytes()[:image.stat().st_size // 2])  # cut short, as by an interrupted copy
    output = ["--output", str(tmp_path / "c.png")]
    model = ["--random_init", "--arch", "vit_tiny", "--img_size", "64"] + output
    cases = [(model + ["--image", str(image)], f"--image {image}: cannot read it as an image"),
             (model + ["--image", str(tmp_path / "none.jpg")], f"--image {tmp_path / 'none.jpg'}: no such image file"),
             (["--weights", str(tmp_path / "none.pth")] + output, "--weights"),
             (["--log", str(tmp_path / "log.txt")] + output, "no such train.py log file"),
             (model + ["--tile", "33"], "--tile 33: must be an even number"),
             (model + ["--k_start", "33"], "--k_start 33: must lie in [2, 32]"),
             (model + ["--img_size", "60"], "--img_size 60: must be a positive multiple of --patch_size 16")]
    for argv, named in cases:
        r = run([sys.executable, "visualize.py"] + argv, in_process=True)
        assert r.returncode == 2 and named in r.stderr, (argv, r.stderr[-3000:])
        assert r.stderr.strip().splitlines() == [r.stderr.strip()] and "Traceback" not in r.stderr, r.stderr
    assert not (tmp_path / "c.png").exists()


def test_visualize_defaults_without_a_checkpoint_are_the_training_defaults():
    """visualize.py does not import train.py: its fallbacks (the paper's views, clustering.cluster's defaults) must
    stay equal to train.py's."""
    parser = train.get_args_parser()
    for name in visualize.FROM_TRAINING:
        want = parser.get_default(name)
        assert visualize.default_setting(name) == (tuple(want) if isinstance(want, list) else want), name


def test_crop_box_recovers_the_crop_and_the_flip_from_patch_positions():
    box = (10, 20, 48, 64)  # top, left, height, width
    for flip in (False, True):
        pos = data.patch_positions(box, flip, 64, 16).numpy()
        left, top, right, bottom = visualize.crop_box(pos, 16, 64)
        np.testing.assert_allclose([left, top, right, bottom], [20, 10, 84, 58], atol=1e-4)
        assert visualize.is_flipped(pos, 16, 64) == flip


def test_fixed_batch_is_fixed_and_leaves_the_global_rng_alone():
    dataset = data.SyntheticPretrain(4, 64, 0, data.TwoViews(64, 16))
    torch.manual_seed(123)
    state = torch.get_rng_state()
    a = visualize.fixed_batch(dataset, 4, seed=5)
    assert torch.equal(torch.get_rng_state(), state)
    b = visualize.fixed_batch(dataset, 4, seed=5)
    assert torch.equal(a[0], b[0]) and torch.equal(a[1], b[1])


# --------------------------------------------------------------------------------------------------------------
# train.py --visualize_every
# --------------------------------------------------------------------------------------------------------------
def _run_script_here(name, arguments, flag, stop=None):
    """train.run_script with the script's process replaced by run(in_process=True): the same command line through
    the script's own __main__, its random streams kept apart from training's (train.py's own launch of a process is
    run by --eval_every in the torchrun tests and repro.sh)."""
    proc = run([sys.executable, name, *arguments], in_process=True)
    if proc.returncode != 0:
        raise RuntimeError(f"{flag}: {name} failed (exit {proc.returncode}):\n{(proc.stdout + proc.stderr)[-2000:]}")
    return True


def _vis_train(out, extra=(), monkeypatch=None):
    """train.main in this process (seconds saved on imports), with the signal handlers it installs restored;
    with monkeypatch, the scripts train.py launches run in this process too."""
    args = train.get_args_parser().parse_args(VIS_TINY + ["--output_dir", str(out)] + list(extra))
    handlers = {sig: signal.getsignal(sig) for sig in (signal.SIGTERM, signal.SIGINT)}
    if monkeypatch is not None:
        monkeypatch.setattr(train, "run_script", _run_script_here)
    try:
        train.main(args)
    finally:
        for sig, handler in handlers.items():
            signal.signal(sig, handler)
    with open(os.path.join(out, "log.txt")) as f:
        return args, [json.loads(line) for line in f]


def test_train_visualize_every_writes_pictures_and_leaves_training_unchanged(tmp_path, monkeypatch):
    args, with_pictures = _vis_train(tmp_path / "vis", ["--visualize_every", "1"], monkeypatch)
    names = sorted(f for f in os.listdir(tmp_path / "vis") if f.endswith(".png"))
    assert names == ["clusters_epoch0000.png", "clusters_epoch0001.png"]
    with Image.open(tmp_path / "vis" / names[-1]) as im:
        assert im.size == visualize.figure_size(4, 3, args.k_start - 1, 128)  # 4 images, vit_tiny's 3 heads
    _, without = _vis_train(tmp_path / "plain")
    keys = ("loss", "loss_glob", "loss_dense", "mean_k", "kept_centroids")
    assert [{k: e[k] for k in keys} for e in with_pictures] == [{k: e[k] for k in keys} for e in without]


# ==============================================================================================================
# 7. bench.py and repro.sh
# ==============================================================================================================
def _bench_quick(tmp_path):
    out = tmp_path / "bench.json"
    return out, run([sys.executable, "bench.py", "--quick", "--json", str(out)], timeout=300)


@early(_bench_quick)
def test_bench_quick_runs_in_seconds_and_prints_every_section(early_run):
    out, proc = early_run
    assert proc.returncode == 0, proc.stderr[-3000:]
    for expected in ("machine:", "1. Training step", "ViT-Ti/16 64", "vit_nano/8 32", "CrOC/DINO", "goal: CrOC/DINO",
                     "2. Clusterer alone", "top-level aten ops", "host syncs", "official ms", "speed-up",
                     "FLOPs:", "3. Where the CrOC step's extra time goes", "whole step",
                     "4. The clusterer torch.compile'd", "--compile is off", "5. GPU throughput"):
        assert expected in proc.stdout, expected
    res = json.loads(out.read_text())
    assert [r["model"] for r in res["steps"]] == ["ViT-Ti/16 64", "vit_nano/8 32"]  # the paper's, the recipe's
    paper, recipe = res["steps"]
    assert not paper["use_bn_in_head"] and paper["head_hidden_dim"] == 2048
    assert (recipe["use_bn_in_head"], recipe["head_hidden_dim"], recipe["out_dim"], recipe["out_dim_c"]) == (
        True, 512, 256, 256)  # repro.sh's head
    for row in res["steps"]:
        assert row["dino_ms"] > 0 and row["croc_ms"] > 0 and math.isfinite(row["ratio"])
        assert row["dino_mem_mib"] > 0 and row["croc_mem_mib"] > 0
        assert 0 < row["clustering_share"] < 1
        assert row["dino_gflops"] < row["croc_gflops"]  # the centroid heads add arithmetic
        parts = {p["part"]: p for p in row["breakdown"]["parts"]}
        assert list(parts) == ["teacher forward", "clustering", "teacher centroid head", "student forward", "loss",
                               "backward", "AdamW", "teacher EMA"]
        assert parts["clustering"]["dino_ms"] == 0 < parts["clustering"]["croc_ms"]
    assert [r["batch"] for r in res["clusterer"]] == [1, 2]
    assert res["clusterer"][1]["share_of_step"] is not None  # B = 2 matches the quick paper row's batch
    for row in res["clusterer"]:  # the official algorithm ran on the same inputs and was counted
        assert row["official_ms"] > 0 and row["official_top_level_aten_ops"] > row["top_level_aten_ops"] > 0
    assert res["machine"]["torch"] == torch.__version__ and res["machine"]["cpu"]


def test_bench_compile_times_the_clusterer_traced_whole_against_eager_and_the_official():
    """bench.py --compile's rows, traced with the eager backend (seconds; the benchmark compiles with inductor):
    one graph with the eager result, timed beside eager and the official algorithm on the same inputs."""
    args = bench.resolve_args(bench.get_args_parser().parse_args(["--quick", "--device", "cpu", "--k_start", "4",
                                                                   "--compile"]))
    assert args.compile and not bench.resolve_args(bench.get_args_parser().parse_args(["--quick"])).compile
    torch._dynamo.reset()
    try:
        rows = bench.compiled_clusterer(args, args.cluster_shape, [1], backend="eager")
    finally:
        torch._dynamo.reset()
    (row,) = rows
    assert "error" not in row, row
    assert row["same_k_and_kept"] and row["max_q_star_difference"] < 1e-5 and row["host_syncs"] == 0
    assert min(row["compile_s"], row["eager_ms"], row["compiled_ms"], row["official_ms"]) > 0
    text = "\n".join(bench.compiled_clusterer_lines({"compiled_clusterer": rows}))
    assert "compile s" in text and "vs official" in text and "True" in text


def test_the_training_step_has_one_host_sync_and_the_gpu_check_expects_it_there():
    """model.train_step synchronises once (the kept centroids' nonzero), the clusterer never; the GPU check's
    sync part accepts that one line only."""
    source = inspect.getsource(M.train_step)
    assert source.count("nonzero(") == 1
    for forbidden in (".item(", ".tolist(", ".cpu(", "bool(", "[valid]", "[keep]"):
        assert forbidden not in source, forbidden
    path, line = bench.step_sync_site().rsplit(":", 1)
    assert path == "model.py" and "nonzero(" in (ROOT / path).read_text().splitlines()[int(line) - 1]


def test_bench_op_counter_counts_the_clusterer_and_no_host_syncs_on_cpu():
    device = torch.device("cpu")
    tokens, positions, cls, _ = bench.cluster_inputs(1, "vit_tiny", 8, 32, device, seed=0)  # P = 3, 2N = 32, d = 64

    def call():
        clustering.cluster(tokens, positions, cls, k_start=4, generator=torch.Generator().manual_seed(0))
    counts = bench.count_ops(call, device)
    assert 0 < counts["top_level_view_ops"] < counts["top_level_aten_ops"] <= counts["all_aten_ops"]
    assert bench.count_syncs(call, device) == 0


def test_bench_differences_prints_shares_k_and_kept_centroids_in_range(capsys):
    """bench.py --differences on tiny inputs, in seconds: every row's shares lie in [0, 1], the selected K in
    [2, K_max], the kept centroids per image in [0, heads x K_max], for both clusterers."""
    args = bench.get_args_parser().parse_args(["--differences", "--quick", "--device", "cpu"])
    rows = bench.differences(args)
    out = capsys.readouterr().out
    assert "selected K: share" in out and "kept per image" in out and "moved" in out
    assert [(r["tokens_of"], r["k_start"], r["k_max"]) for r in rows] == [
        ("initial ViT", 12, 12), ("initial ViT", 5, 4), ("Gaussian", 12, 12), ("Gaussian", 5, 4)]
    heads = 3  # vit_tiny
    for r in rows:
        assert r["images"] == 2 and r["problems"] == 2 * heads and r["tokens"] == 32
        assert 0 <= r["moved_tokens"] <= 1
        assert abs(sum(r["k_share"].values()) - 1) < 1e-6 and all(2 <= k <= r["k_max"] for k in r["k_share"])
        for mean_k in (r["mean_k"], r["official_mean_k"]):
            assert 2 <= mean_k <= r["k_max"]
        assert 0 <= r["kept_min"] <= r["kept_per_image"] <= r["kept_max"] <= heads * r["k_max"]
        assert 0 <= r["official_kept_per_image"] <= heads * r["k_max"]


def test_official_hard_rule_normalises_each_views_columns_before_the_argmax():
    """A token whose row argmax is a column heavy in its view moves to a light one once columns are normalised."""
    plan = torch.tensor([[[0.5, 0.3, 0.0], [0.4, 0.1, 0.0], [0.2, 0.1, 0.0], [0.1, 0.3, 0.0]]])  # (1, 2N = 4, 3)
    k = torch.tensor([2])  # the third column is padding
    paper = clustering.hard_assignment(plan, k).argmax(-1)
    assert paper.tolist() == [[0, 0, 0, 1]]
    # view 1 columns sum to 0.9 and 0.4, view 2's to 0.3 and 0.4: token 0 moves to column 1 (0.75 > 0.56)
    assert bench.official_hard_labels(plan, k).tolist() == [[1, 0, 0, 1]]


def test_repro_script_is_valid_bash_and_its_training_flags_parse():
    """repro.sh (README's synthetic reproduction) must not drift from train.py's flags."""
    path = os.path.join(os.path.dirname(os.path.abspath(__file__)), "repro.sh")
    assert subprocess.run(["bash", "-n", path]).returncode == 0
    text = open(path).read()
    common = text.split('COMMON="', 1)[1].split('"', 1)[0]
    for name, value in (("$SEED", "0"), ("$EPOCHS", "100"), ("$IMAGES", "640"), ("$BATCH", "32"),
                        ("$HEAD", "--use_bn_in_head true --head_hidden_dim 512")):
        common = common.replace(name, value)
    args = train.get_args_parser().parse_args(common.split() + ["--alpha", "1"])
    assert args.out_dim == args.out_dim_c == 256 and args.teacher_temp == 0.02 and args.norm_last_layer is False
    assert args.lr == 0.002 and args.momentum_teacher == 0.996 and list(args.global_crops_scale) == [0.5, 1.0]
    assert args.use_bn_in_head is True and args.head_hidden_dim == 512


def _repro_quick(tmp_path, grey):
    out = tmp_path / "repro"
    env = {"QUICK": "1", "PYTHON": sys.executable, "GREY": str(int(grey))}
    if grey:  # the recipe's other switches too: no BatchNorm head, another width
        env.update(BN="0", HEAD_HIDDEN="64")
    return out, run(["bash", "repro.sh", str(out)], env, timeout=900)


@early(_repro_quick)
@pytest.mark.parametrize("grey", [False, True])
def test_repro_quick_mode_runs_every_step_of_the_recipe_and_prints_the_table(early_run, grey):
    """QUICK=1 bash repro.sh: data, both pretrainings with --eval_every, the curves, and the three evaluations of
    one model on tiny data, so that the recipe cannot rot (its numbers mean nothing): the default recipe (the
    BatchNorm head, 512 wide), and GREY=1 BN=0 HEAD_HIDDEN=64: the grey world, trained and evaluated on grey
    scenes, without the BatchNorm head and with a narrow one (one run tests all three)."""
    out, proc = early_run
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert "| croc |" in proc.stdout
    for name in ("dino", "croc"):
        assert (out / name / "curves.png").is_file()
        assert "eval_kmeans_miou" in json.loads((out / name / "log.txt").read_text().splitlines()[-1])
        config = json.loads((out / name / "config.json").read_text())
        assert config["synthetic_grey"] is grey and (config["eval_data_path"] == str(out / "data")) is grey
        assert config["use_bn_in_head"] is not grey and config["epochs"] == 1
        assert config["head_hidden_dim"] == (64 if grey else 512)
    assert json.loads((out / "data/VOCdevkit/VOC2012/synthetic.json").read_text())["grey"] is grey
    # the table over several runs (one per seed): mean +- std, and CrOC's K statistics from its log
    table = run(["bash", "repro.sh", "--table", str(out), str(out)], {"PYTHON": sys.executable}, timeout=120)
    assert table.returncode == 0, table.stderr[-3000:]
    croc_mean = next(line for line in table.stdout.splitlines() if line.startswith("| croc (2) |")).split(" | ")
    last = json.loads((out / "croc" / "log.txt").read_text().splitlines()[-1])
    assert croc_mean[4] == f"{last['mean_k']:.2f} +- 0.00"  # the same run twice: std 0


def test_repro_table_prints_each_seeds_gaps_and_counts_the_seeds_where_each_is_positive(tmp_path):
    """repro.sh --table OUT... : besides the means, CrOC - DINO and DINO - random per folder (one per seed), their
    mean +- std, and in how many folders each gap is > 0, from results files in the layout the scripts write."""
    scores = {"s0": {"random": (16.0, 22.0, 0.300), "dino": (29.0, 25.0, 0.310), "croc": (80.0, 28.0, 0.360)},
              "s1": {"random": (17.0, 23.0, 0.305), "dino": (28.0, 26.5, 0.320), "croc": (75.0, 26.0, 0.340)}}
    for seed, runs in scores.items():
        for name, (lin, km, jf) in runs.items():
            run_dir = tmp_path / seed / name
            for sub in ("linear", "kmeans", "davis/scores"):
                (run_dir / sub).mkdir(parents=True)
            (run_dir / "linear/results.json").write_text(json.dumps({"miou": lin / 100}))
            (run_dir / "kmeans/results.json").write_text(json.dumps({"miou_mean": km / 100, "miou_std": 0.01}))
            (run_dir / "davis/scores/global_results-val.csv").write_text(
                f"J&F-Mean,J-Mean,F-Mean\n{jf},{jf},{jf}\n")
    proc = run(["bash", "repro.sh", "--table", str(tmp_path / "s0"), str(tmp_path / "s1")],
               {"PYTHON": sys.executable}, timeout=60)
    assert proc.returncode == 0, proc.stderr[-3000:]
    lines = proc.stdout.splitlines()
    assert f"| {tmp_path / 's0'} | +51.00 | +3.00 | +0.050 |" in lines  # CrOC - DINO, seed folder s0
    assert f"| {tmp_path / 's1'} | +47.00 | -0.50 | +0.020 |" in lines
    assert "| mean +- std | +49.00 +- 2.83 | +1.25 +- 2.47 | +0.035 +- 0.021 |" in lines
    assert "| croc > dino in | 2 of 2 | 1 of 2 | 2 of 2 |" in lines
    assert "| dino > random in | 2 of 2 | 2 of 2 | 2 of 2 |" in lines


def test_repro_dino_0_runs_the_croc_pipeline_alone(tmp_path):
    """DINO=0 bash repro.sh: the CrOC pipeline alone (the lambda_pos ablation beside a finished OUT of the same seed).
    Seconds, not a whole QUICK run: a CrOC flag that train.py refuses (--lambda_pos -1) ends it at its start, and
    what the script left shows which pipelines ran. The success path is the QUICK test's pipeline."""
    out = tmp_path / "repro"
    proc = run(["bash", "repro.sh", str(out)],
               {"QUICK": "1", "PYTHON": sys.executable, "DINO": "0", "LAMBDA_POS": "-1"}, timeout=300)
    assert proc.returncode == 1, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert "the CrOC pipeline failed" in proc.stderr and "DINO pipeline" not in proc.stderr
    assert "--lambda_pos" in (out / "croc_lambda_pos-1.log").read_text()  # CrOC ran, with the ablation's flag
    assert (out / "data").is_dir() and not list(out.glob("dino*")) and not list(out.glob("random*"))
    # the K ablations: the run is named after each variable, and train.py gets each flag (--k_max 1 < 2: refused)
    proc = run(["bash", "repro.sh", str(out)],
               {"QUICK": "1", "PYTHON": sys.executable, "DINO": "0", "K_START": "8", "K_MAX": "1"}, timeout=300)
    assert proc.returncode == 1 and "the CrOC pipeline failed" in proc.stderr
    log = (out / "croc_k_start8_k_max1.log").read_text()
    assert "--k_max" in log and "[2, --k_start 8]" in log
    bad = run(["bash", "repro.sh", str(out / "bad")], {"PYTHON": sys.executable, "DINO": "no"}, timeout=60)
    assert bad.returncode == 2 and "DINO must be 0 or 1, not 'no'" in bad.stderr
    assert not (out / "bad").exists()


# ==============================================================================================================
# 8. Checkpoint loading: model.load_pretrained, load_backbone, torch_load
# ==============================================================================================================
def _official_croc_checkpoint(path, arch="vit_tiny", patch=16, new_weight_norm_api=False):
    """A checkpoint in the official CrOC layout: DDP-prefixed student, `backbone.`/`head.` prefixes, old
    weight-norm keys, an argparse.Namespace under `args`, plus optimizer and loss states."""
    torch.manual_seed(1)
    student = M.CrOCModel(M.build_vit(arch, patch), M.CrOCHead(192, 64, 32))
    teacher = M.CrOCModel(M.build_vit(arch, patch), M.CrOCHead(192, 64, 32))
    def fmt(sd, prefix):
        out = {}
        for k, v in sd.items():
            if new_weight_norm_api:
                k = k.replace(".weight_g", ".parametrizations.weight.original0")
                k = k.replace(".weight_v", ".parametrizations.weight.original1")
            out[prefix + k] = v
        return out
    opt = torch.optim.AdamW(student.parameters())
    torch.save({"student": fmt(student.state_dict(), "module."), "teacher": fmt(teacher.state_dict(), ""),
                "optimizer": opt.state_dict(), "epoch": 7, "croc_loss": {"center": torch.zeros(1, 64)},
                "args": argparse.Namespace(arch=arch, patch_size=patch, lr=5e-4, global_crops_scale=(0.25, 1.0))},
               path)
    return student, teacher


@pytest.mark.parametrize("new_api", [False, True])
def test_load_pretrained_reads_official_croc_checkpoint_and_reproduces_outputs(tmp_path, new_api):
    path = tmp_path / "croc.pth"
    student, teacher = _official_croc_checkpoint(path, new_weight_norm_api=new_api)
    x = torch.randn(2, 3, 32, 32)
    for key, src in (("teacher", teacher), ("student", student)):
        vit = M.vit_tiny(16)
        res = M.load_pretrained(vit, str(path), key=key)
        assert res == {"missing": [], "unexpected": []}
        src.eval(), vit.eval()
        torch.testing.assert_close(vit(x), src.backbone(x))
        full = M.CrOCModel(M.vit_tiny(16), M.CrOCHead(192, 64, 32)).eval()
        assert M.load_pretrained(full, str(path), key=key) == {"missing": [], "unexpected": []}
        torch.testing.assert_close(full.head(full.backbone(x), centroids=True),
                                   src.head(src.backbone(x), centroids=True))


def test_load_pretrained_reads_bare_backbone_weights(tmp_path):
    src = M.vit_tiny(8).eval()
    torch.save(src.state_dict(), tmp_path / "dino_deitsmall8.pth")
    vit = M.vit_tiny(8).eval()
    assert M.load_pretrained(vit, str(tmp_path / "dino_deitsmall8.pth")) == {"missing": [], "unexpected": []}
    x = torch.randn(1, 3, 16, 24)
    torch.testing.assert_close(vit(x), src(x))
    full = M.CrOCModel(M.vit_tiny(8), M.CrOCHead(192, 64, 32))
    res = M.load_pretrained(full, str(tmp_path / "dino_deitsmall8.pth"))
    assert res["unexpected"] == [] and all(k.startswith("head.") for k in res["missing"])


def test_load_pretrained_shape_mismatch_names_key_and_shapes(tmp_path):
    torch.save(M.vit_tiny(16).state_dict(), tmp_path / "w.pth")
    with pytest.raises(ValueError, match=r"pos_embed: checkpoint \(1, 197, 192\), model \(1, 785, 192\)"):
        M.load_pretrained(M.vit_tiny(8), str(tmp_path / "w.pth"))


def test_load_pretrained_names_missing_file_and_missing_key(tmp_path):
    with pytest.raises(FileNotFoundError, match="nope.pth"):
        M.load_pretrained(M.vit_tiny(16), str(tmp_path / "nope.pth"))
    _official_croc_checkpoint(tmp_path / "c.pth")
    with pytest.raises(data.InputError, match=r"c.pth has no state dict under key 'ema'.*\['student', 'teacher'"):
        M.load_pretrained(M.vit_tiny(16), str(tmp_path / "c.pth"), key="ema")


class _Evil:
    def __reduce__(self):
        return (print, ("this would have run arbitrary code",))


def test_load_pretrained_refuses_checkpoints_that_execute_code(tmp_path):
    torch.save({"teacher": M.vit_tiny(16).state_dict(), "payload": _Evil()}, tmp_path / "evil.pth")
    with pytest.raises(data.InputError, match="evil.pth with weights_only=True"):
        M.load_pretrained(M.vit_tiny(16), str(tmp_path / "evil.pth"))


def test_load_backbone_is_frozen_and_in_eval_mode(tmp_path):
    torch.save(M.vit_tiny(16).state_dict(), tmp_path / "w.pth")
    vit = M.load_backbone("vit_tiny", 16, str(tmp_path / "w.pth"))
    assert not vit.training and not any(p.requires_grad for p in vit.parameters())
    with pytest.raises(ValueError, match="--arch"):
        M.load_backbone("vit_huge", 16)


def test_torch_load_says_what_went_wrong_and_mentions_untrusted_pickles_only_when_refusing_one(tmp_path):
    torch.save({"w": torch.ones(1000)}, tmp_path / "good.pth")
    whole = (tmp_path / "good.pth").read_bytes()
    (tmp_path / "empty.pth").write_bytes(b"")
    (tmp_path / "text.pth").write_text("hello")
    (tmp_path / "cut.pth").write_bytes(whole[: len(whole) // 2])
    torch.save({"payload": _Evil()}, tmp_path / "evil.pth")
    for name, what in [("empty", "empty"), ("text", "not a PyTorch checkpoint"), ("cut", "truncated"),
                       ("evil", "untrusted pickles are not executed")]:
        with pytest.raises(data.InputError, match=what) as e:
            M.torch_load(str(tmp_path / f"{name}.pth"))
        assert ("untrusted" in str(e.value)) == (name == "evil"), str(e.value)
    assert torch.equal(M.torch_load(str(tmp_path / "good.pth"))["w"], torch.ones(1000))


# --------------------------------------------------------------------------------------------------------------
# Every layout, the architecture read from the checkpoint, URLs, torch.hub (hubconf.py)
# --------------------------------------------------------------------------------------------------------------
def _nano(seed=0):
    torch.manual_seed(seed)
    return build_vit("vit_nano", 8).eval()


def _transformers_names(sd, depth=4):
    """timm's names -> Hugging Face transformers' ViTModel names (facebook/dino-vits16), q, k and v apart."""
    out = {"embeddings.cls_token": sd["cls_token"], "embeddings.position_embeddings": sd["pos_embed"],
           "layernorm.weight": sd["norm.weight"], "layernorm.bias": sd["norm.bias"],
           "pooler.dense.weight": torch.zeros(96, 96), "pooler.dense.bias": torch.zeros(96)}
    for wb in ("weight", "bias"):
        out[f"embeddings.patch_embeddings.projection.{wb}"] = sd[f"patch_embed.proj.{wb}"]
        for i in range(depth):
            b, layer = f"blocks.{i}.", f"encoder.layer.{i}."
            q, k, v = sd[f"{b}attn.qkv.{wb}"].chunk(3)
            out.update({f"{layer}attention.attention.query.{wb}": q, f"{layer}attention.attention.key.{wb}": k,
                        f"{layer}attention.attention.value.{wb}": v,
                        f"{layer}attention.output.dense.{wb}": sd[f"{b}attn.proj.{wb}"],
                        f"{layer}intermediate.dense.{wb}": sd[f"{b}mlp.fc1.{wb}"],
                        f"{layer}output.dense.{wb}": sd[f"{b}mlp.fc2.{wb}"],
                        f"{layer}layernorm_before.{wb}": sd[f"{b}norm1.{wb}"],
                        f"{layer}layernorm_after.{wb}": sd[f"{b}norm2.{wb}"]})
    return out


def _layout(name, sd):
    """sd (a vit_nano/8's) in the layout of a released or trained checkpoint."""
    head = {"head.mlp.0.weight": torch.zeros(8, 96), "head.last_layer.weight_g": torch.ones(4, 1)}
    return {
        "bare": sd,  # DINO's backbone-only releases
        "timm": {**sd, "head.weight": torch.zeros(1000, 96), "head.bias": torch.zeros(1000)},  # a classifier
        "transformers": _transformers_names(sd),
        "dino": {"student": {f"module.backbone.{k}": v + 1 for k, v in sd.items()},  # DINO's main_dino.py
                 "teacher": {f"backbone.{k}": v for k, v in {**sd, **head}.items()}, "epoch": 100,
                 "args": argparse.Namespace(arch="vit_nano", patch_size=8, lr=5e-4), "dino_loss": {}},
        "ours": {"teacher": {**{f"backbone.{k}": v for k, v in sd.items()}, **head},  # train.py's: args a dict
                 "args": {"arch": "vit_nano", "patch_size": 8}, "epoch": 3},
        "lightning": {"state_dict": {**{f"model.{k}": v for k, v in sd.items()},  # Leopart's
                                     "finetune_head.weight": torch.zeros(21, 96, 1, 1)},
                      "epoch": 3, "global_step": 30, "pytorch-lightning_version": "1.4.0", "optimizer_states": []},
    }[name]


@pytest.mark.parametrize("layout", ["bare", "timm", "transformers", "dino", "ours", "lightning"])
def test_load_backbone_reads_every_layout_at_the_architecture_it_holds(tmp_path, layout):
    src = _nano()
    torch.save(_layout(layout, src.state_dict()), tmp_path / "w.pth")
    vit = M.load_backbone(weights=str(tmp_path / "w.pth"))  # no arch given: the checkpoint's
    assert (vit.embed_dim, len(vit.blocks), vit.patch_size) == (96, 4, 8)
    x = torch.randn(2, 3, 16, 24)
    torch.testing.assert_close(vit.forward_features(x).patch, src.forward_features(x).patch)


def test_lightning_checkpoint_key_picks_one_of_its_backbones_and_two_without_a_key_are_refused(tmp_path):
    a, b = _nano(0).state_dict(), _nano(1).state_dict()
    torch.save({"state_dict": {**{f"model.{k}": v for k, v in a.items()}, **{f"teacher.{k}": v for k, v in b.items()}}},
               tmp_path / "l.ckpt")
    for key, want in (("teacher", b), ("model", a)):
        vit = M.load_backbone(weights=str(tmp_path / "l.ckpt"), checkpoint_key=key)
        assert torch.equal(vit.state_dict()["blocks.0.attn.qkv.weight"], want["blocks.0.attn.qkv.weight"])
    with pytest.raises(data.InputError, match=r"l.ckpt holds several backbones .*'model.', 'teacher.'"):
        M.load_backbone(weights=str(tmp_path / "l.ckpt"), checkpoint_key="ema")


def test_load_backbone_refuses_a_checkpoint_missing_backbone_keys_naming_them(tmp_path):
    sd = _nano().state_dict()
    del sd["blocks.3.mlp.fc2.weight"]
    torch.save(sd, tmp_path / "w.pth")
    with pytest.raises(data.InputError, match=r"w.pth \[teacher\]: 1 of the .* e.g. \['blocks.3.mlp.fc2.weight'\]"):
        M.load_backbone(weights=str(tmp_path / "w.pth"))


def _write_safetensors(path, sd):
    """The safetensors format by hand (its specification): an 8-byte little-endian header length, a JSON header of
    dtype, shape and byte offsets, then the raw little-endian data."""
    header, blobs, offset = {}, [], 0
    for k, v in sd.items():
        raw = v.contiguous().numpy().astype("<f4").tobytes()
        header[k] = {"dtype": "F32", "shape": list(v.shape), "data_offsets": [offset, offset + len(raw)]}
        blobs.append(raw)
        offset += len(raw)
    text = json.dumps(header).encode()
    Path(path).write_bytes(len(text).to_bytes(8, "little") + text + b"".join(blobs))


def test_safetensors_without_the_package_is_an_error_naming_it(tmp_path, monkeypatch):
    _write_safetensors(tmp_path / "model.safetensors", _nano().state_dict())
    shutil.copy(tmp_path / "model.safetensors", tmp_path / "weights.bin")  # told apart by content, not by name
    monkeypatch.setitem(sys.modules, "safetensors", None)  # as if it were not installed: importing it fails
    monkeypatch.setitem(sys.modules, "safetensors.torch", None)
    for name in ("model.safetensors", "weights.bin"):
        with pytest.raises(data.InputError, match=rf"{name} is a safetensors file: .*pip install safetensors"):
            M.load_backbone(weights=str(tmp_path / name))


@pytest.mark.parametrize("names", ["timm", "transformers"])
def test_safetensors_weights_load_when_the_package_is_installed(tmp_path, names):
    pytest.importorskip("safetensors")  # not a dependency of croc
    src = _nano()
    sd = src.state_dict() if names == "timm" else _transformers_names(src.state_dict())
    _write_safetensors(tmp_path / "model.safetensors", sd)
    vit = M.load_backbone(weights=str(tmp_path / "model.safetensors"))
    x = torch.randn(1, 3, 16, 16)
    torch.testing.assert_close(vit(x), src(x))


def test_weights_flag_takes_urls_and_dinos_name_and_reads_arch_and_patch_from_the_checkpoint(tmp_path, monkeypatch):
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "home"))
    torch.save(_nano().state_dict(), tmp_path / "bare.pth")  # the shapes say vit_nano/8
    _official_croc_checkpoint(tmp_path / "croc.pth")  # its args say vit_tiny/16
    parse = eval_kmeans.get_args_parser().parse_args
    args = M.resolve_backbone_args(parse(["--weights", str(tmp_path / "bare.pth")]))
    assert (args.arch, args.patch_size) == ("vit_nano", 8)
    url = (tmp_path / "croc.pth").as_uri()
    args = M.resolve_backbone_args(parse(["--pretrained_weights", url]))  # DINO's flag, a file:// URL
    assert args.weights == url and (args.arch, args.patch_size) == ("vit_tiny", 16)
    assert (tmp_path / "home" / "hub" / "checkpoints" / "croc.pth").is_file()  # downloaded into torch.hub's cache
    assert M.backbone_from_args(args).embed_dim == 192
    with pytest.raises(data.InputError, match=r"--patch_size 8 contradicts .*croc.pth, a vit_tiny/16 checkpoint .*"
                                              r"pass --patch_size 16"):
        M.resolve_backbone_args(parse(["--weights", str(tmp_path / "croc.pth"), "--patch_size", "8"]))
    with pytest.raises(data.InputError, match="--arch vit_small contradicts"):
        M.backbone_from_args(parse(["--weights", str(tmp_path / "bare.pth"), "--arch", "vit_small"]))
    args = M.resolve_backbone_args(parse(["--random_init"]))
    assert (args.arch, args.patch_size) == ("vit_small", 16)  # the paper's, without a checkpoint
    with pytest.raises(data.MissingInput, match="could not download file:///nowhere/w.pth"):
        M.resolve_backbone_args(parse(["--weights", "file:///nowhere/w.pth"]))
    with pytest.raises(data.MissingInput, match="checkpoint not found: nope.pth"):
        M.resolve_backbone_args(parse(["--weights", "nope.pth"]))
    stored = {"args": argparse.Namespace(arch="deit_small", patch_size=8)}  # DINO's other name of ViT-S
    assert M.checkpoint_arch(stored, {}, "w.pth") == ("vit_small", 8)


def test_hub_entry_points_download_the_release_once_and_return_its_teacher_backbone(tmp_path, monkeypatch):
    import hubconf
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "home"))
    release = tmp_path / "31383"  # an official CrOC checkpoint, served by a file:// URL that names no file type
    _, teacher = _official_croc_checkpoint(release)
    monkeypatch.setitem(M.RELEASES, "croc_vits16_coco",
                        M.RELEASES["croc_vits16_coco"]._replace(url=release.as_uri(), arch="vit_tiny"))
    vit = torch.hub.load(str(ROOT), "croc_vits16_coco", source="local")
    assert (tmp_path / "home" / "hub" / "checkpoints" / "croc_vits16_coco.pth").is_file()
    for k, v in teacher.backbone.state_dict().items():
        assert torch.equal(vit.state_dict()[k], v), k
    assert not vit.training and not any(p.requires_grad for p in vit.parameters())
    x = torch.randn(2, 3, 32, 48)
    maps = vit.dense_features(x, n_last_blocks=2)  # the evaluations' features, as a method
    assert maps.shape == (2, 384, 2, 3)
    torch.testing.assert_close(maps, M.dense_features(vit, x, 2))
    release.unlink()  # the second load reads the cache
    assert torch.equal(hubconf.croc_vits16_coco().pos_embed, vit.pos_embed)
    entries = {n for n in dir(hubconf) if callable(getattr(hubconf, n)) and not n.startswith("_")}  # torch.hub.list's
    assert entries == set(M.RELEASES) | {"vit"}


def test_hub_weights_load_any_checkpoint_and_an_entry_refuses_one_of_another_architecture(tmp_path, monkeypatch):
    import hubconf
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "home"))
    src = _nano()
    torch.save(src.state_dict(), tmp_path / "nano.pth")
    vit = hubconf.vit(weights=(tmp_path / "nano.pth").as_uri())  # built at the checkpoint's arch
    x = torch.randn(1, 3, 16, 16)
    torch.testing.assert_close(vit(x), src(x))
    with pytest.raises(data.InputError, match=r"--arch vit_small contradicts .*nano.pth, a vit_nano/8 checkpoint"):
        hubconf.croc_vits16_coco(weights=str(tmp_path / "nano.pth"))
    random_vits8 = hubconf.dino_vits8(pretrained=False)  # no download
    assert (random_vits8.embed_dim, random_vits8.patch_size) == (384, 8)
    archs = {name: (r.arch, r.patch_size) for name, r in M.RELEASES.items()}
    assert archs == {"croc_vits16_coco": ("vit_small", 16), "croc_vits16_cocoplus": ("vit_small", 16),
                     "croc_vits16_in1k": ("vit_small", 16), "dino_vits16": ("vit_small", 16),
                     "dino_vits8": ("vit_small", 8), "dino_vitb16": ("vit_base", 16)}


# ==============================================================================================================
# 9. Data plumbing (data.py): synthetic scenes and videos, image folders, segmentation datasets
# ==============================================================================================================
def _write_image(path, size_wh, color=(120, 60, 30)):
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", size_wh, color).save(path)


def _write_mask(path, array, palette=True):
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    im = Image.fromarray(np.asarray(array, dtype=np.uint8))
    if palette:
        im = im.convert("P")
        im.putpalette(data.VOC_PALETTE)
    im.save(path)


# --------------------------------------------------------------------------------------------------------------
# synthetic scenes and videos
# --------------------------------------------------------------------------------------------------------------
def test_synthetic_scenes_are_deterministic_per_seed_and_index():
    a, b = data.SyntheticScenes(10, 64, seed=3), data.SyntheticScenes(10, 64, seed=3)
    img_a, lab_a = a[4]
    img_b, lab_b = b[4]
    assert np.array_equal(np.asarray(img_a), np.asarray(img_b)) and np.array_equal(lab_a, lab_b)
    assert not np.array_equal(np.asarray(a[5][0]), np.asarray(img_a))
    assert not np.array_equal(np.asarray(data.SyntheticScenes(10, 64, seed=4)[4][0]), np.asarray(img_a))


def test_synthetic_scenes_label_every_pixel_and_every_class_occurs():
    scenes = data.SyntheticScenes(40, 64, seed=0)
    seen = set()
    for i in range(len(scenes)):
        img, labels = scenes[i]
        assert img.mode == "RGB" and img.size == (64, 64)
        assert labels.dtype == np.uint8 and labels.shape == (64, 64)
        assert labels.max() < scenes.num_classes  # no ignore pixels
        seen |= set(np.unique(labels).tolist())
    assert seen == set(range(scenes.num_classes))
    assert len(scenes.class_names) == scenes.num_classes


def test_synthetic_colours_of_a_class_vary_across_instances():
    scenes = data.SyntheticScenes(60, 64, seed=0)
    means = {c: [] for c in range(scenes.num_classes)}
    for i in range(len(scenes)):
        img, labels = scenes[i]
        arr = np.asarray(img, dtype=np.float64)
        for c in np.unique(labels):
            if (labels == c).sum() > 50:
                means[c].append(arr[labels == c].mean(0))
    for c, m in means.items():
        assert len(m) >= 3, scenes.class_names[c]
        assert np.std(np.stack(m), axis=0).max() > 20, scenes.class_names[c]  # colour does not identify a class


def test_synthetic_grey_flag_paints_the_pretraining_scenes_grey():
    args = train.get_args_parser().parse_args(["--synthetic_images", "2", "--synthetic_size", "32", "--img_size", "32",
                                               "--patch_size", "8", "--synthetic_grey", "true"])
    grey = data.pretraining_dataset(args).scenes[1][0]
    args.synthetic_grey = False
    colour = data.pretraining_dataset(args).scenes[1][0]
    assert np.array_equal(np.asarray(grey), np.asarray(data.SyntheticScenes(2, 32, 0, grey=True)[1][0]))
    assert not np.array_equal(np.asarray(grey), np.asarray(colour))
    del args.synthetic_grey  # the args of a checkpoint written before the flag: colour
    assert np.array_equal(np.asarray(data.pretraining_dataset(args).scenes[1][0]), np.asarray(colour))


def test_grey_synthetic_data_keeps_the_geometry_and_paints_two_greys():
    dark, light = synthetic.GREY_PALETTE

    def two_greys(img):  # 99% of the values within 10 of one of the two greys (noise sigma 3 per channel)
        arr = np.asarray(img, dtype=np.float64)
        return np.quantile(np.minimum(np.abs(arr - dark), np.abs(arr - light)), 0.99) <= 10

    colour, grey = data.SyntheticScenes(6, 64, seed=2), data.SyntheticScenes(6, 64, seed=2, grey=True)
    for i in range(len(grey)):
        (img_c, lab_c), (img_g, lab_g) = colour[i], grey[i]
        assert np.array_equal(lab_c, lab_g)  # the same scene, only repainted
        arr = np.asarray(img_g, dtype=np.float64)
        assert np.abs(arr - arr.mean(-1, keepdims=True)).max() <= 20  # grey
        assert two_greys(img_g) and not np.array_equal(np.asarray(img_c), arr)
        for c in np.unique(lab_g):  # a texture changes the grey inside every region
            assert arr[lab_g == c].std() > 50
    vc, vg = data.SyntheticVideos(2, 3, (48, 64), seed=1), data.SyntheticVideos(2, 3, (48, 64), seed=1, grey=True)
    for v in range(2):
        (_, masks_c), (frames_g, masks_g) = vc.video(v), vg.video(v)
        assert all(np.array_equal(a, b) for a, b in zip(masks_c, masks_g))
        assert two_greys(frames_g[0])


def test_synthetic_pretrain_returns_views_positions_and_no_skips():
    ds = data.SyntheticPretrain(4, 64, 0, data.TwoViews(64, 16))
    views, positions, skipped = ds[1]
    assert views.shape == (2, 3, 64, 64) and positions.shape == (2, 16, 2) and skipped == 0


def test_synthetic_pretrain_generates_each_scene_once_and_serves_the_same_pixels():
    ds, scenes = data.SyntheticPretrain(3, 32, 5), data.SyntheticScenes(3, 32, 5)
    for _ in range(2):  # generated, then from the kept pixels
        for i in range(3):
            img, skipped = ds[i]
            assert np.array_equal(np.asarray(img), np.asarray(scenes[i][0])) and skipped == 0
    assert sorted(ds._pixels) == [0, 1, 2]
    with pytest.raises(IndexError, match="out of range"):
        ds[3]
    assert 3 not in ds._pixels


def test_synthetic_videos_are_deterministic_move_and_show_every_object_in_frame_0():
    videos = data.SyntheticVideos(4, 6, (48, 64), seed=1)
    for v in range(len(videos)):
        frames, masks = videos.video(v)
        assert len(frames) == len(masks) == 6
        assert frames[0].size == (64, 48) and masks[0].shape == (48, 64) and masks[0].dtype == np.uint8
        n = int(masks[0].max())
        assert 1 <= n <= 3
        assert set(np.unique(masks[0]).tolist()) == set(range(n + 1))  # every object visible in frame 0
        assert all(m.max() <= n for m in masks)
        assert not np.array_equal(masks[0], masks[-1])  # things move / scale
    f1, m1 = videos.video(2)
    f2, m2 = data.SyntheticVideos(4, 6, (48, 64), seed=1).video(2)
    assert all(np.array_equal(np.asarray(a), np.asarray(b)) for a, b in zip(f1, f2))
    assert all(np.array_equal(a, b) for a, b in zip(m1, m2))


# --------------------------------------------------------------------------------------------------------------
# pretraining image folders
# --------------------------------------------------------------------------------------------------------------
def test_pretrain_images_reads_grayscale_palette_rgba_cmyk_and_16bit_as_rgb(tmp_path):
    root = tmp_path / "imgs"
    (root / "sub" / "deeper").mkdir(parents=True)
    Image.new("L", (8, 6), 100).save(root / "a_gray.png")
    pal = Image.new("P", (8, 6), 3)
    pal.putpalette(data.VOC_PALETTE)
    pal.save(root / "b_palette.png")
    Image.new("RGBA", (8, 6), (10, 20, 30, 255)).save(root / "c_rgba.png")
    Image.new("CMYK", (8, 6), (0, 0, 0, 0)).save(root / "sub" / "d_cmyk.JPG")  # upper-case extension
    Image.fromarray(np.full((6, 8), 32896, dtype=np.uint16)).save(root / "sub" / "deeper" / "e_16bit.png")
    Image.new("LA", (8, 6), (50, 255)).save(root / "f_la.png")
    (root / "notes.txt").write_text("not an image")
    ds = data.PretrainImages([root])
    assert len(ds) == 6
    out = {Path(p).name: ds[i] for i, p in enumerate(ds.files)}
    for name, (img, skipped) in out.items():
        assert img.mode == "RGB" and img.size == (8, 6) and skipped == 0, name
    px = {name: np.asarray(img)[0, 0].tolist() for name, (img, _) in out.items()}
    assert px["a_gray.png"] == [100, 100, 100]
    assert px["b_palette.png"] == data.voc_colormap()[3].tolist()
    assert px["c_rgba.png"] == [10, 20, 30]
    assert px["d_cmyk.JPG"][0] > 240  # CMYK (0,0,0,0) is white
    assert px["e_16bit.png"] == [128, 128, 128]  # 32896 / 257 = 128, not clipped to 255
    assert px["f_la.png"] == [50, 50, 50]


def test_pretrain_images_skips_a_truncated_file_with_one_warning_naming_it_and_counts_it(tmp_path):
    root = tmp_path / "imgs"
    root.mkdir()
    rng = np.random.default_rng(0)
    Image.fromarray(rng.integers(0, 255, (64, 64, 3), dtype=np.uint8)).save(root / "b_good.jpg", quality=95)
    full = (root / "b_good.jpg").read_bytes()
    (root / "a_truncated.jpg").write_bytes(full[: len(full) // 2])
    (root / "c_garbage.png").write_bytes(b"definitely not a png")
    ds = data.PretrainImages(str(root), transform=data.TwoViews(32, 16))
    with pytest.warns(RuntimeWarning, match="a_truncated.jpg"):
        views, positions, skipped = ds[0]
    assert skipped == 1 and views.shape == (2, 3, 32, 32) and positions.shape == (2, 4, 2)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no second warning for a file already reported
        assert ds[0][2] == 1
    with pytest.warns(RuntimeWarning, match="c_garbage.png"):
        assert ds[2][2] == 2  # garbage, then (wrapping around) the truncated file, then the good one


@pytest.mark.parametrize("case", ["missing", "empty", "no_images"])
def test_pretrain_images_missing_or_empty_folder_raises_value_error_naming_it(tmp_path, case):
    root = tmp_path / "data"
    if case != "missing":
        root.mkdir()
    if case == "no_images":
        (root / "readme.txt").write_text("x")
    with pytest.raises(ValueError, match=str(root)):
        data.PretrainImages([root], transform=None)


def test_pretrain_images_joins_several_roots(tmp_path):
    for r, n in (("r1", 2), ("r2", 3)):
        for i in range(n):
            _write_image(tmp_path / r / f"{i}.png", (4, 4))
    ds = data.PretrainImages([tmp_path / "r1", tmp_path / "r2"])
    assert len(ds) == 5 and ds.files == sorted(ds.files[:2]) + sorted(ds.files[2:])


def test_symlink_loops_in_the_image_folder_read_each_image_once(tmp_path):
    root = tmp_path / "images"
    (root / "a" / "b").mkdir(parents=True)
    for path in (root / "0.png", root / "a" / "1.png", root / "a" / "b" / "2.png"):
        Image.new("RGB", (8, 8)).save(path)
    os.symlink(".", root / "loop")  # one loop: the old walk read every image 41 times
    os.symlink("../..", root / "a" / "b" / "up")  # a second loop: the old walk never ended
    outside = tmp_path / "outside"
    outside.mkdir()
    Image.new("RGB", (8, 8)).save(outside / "3.png")
    os.symlink(outside, root / "linked")  # a linked folder elsewhere is still read

    def hung(signum, frame):
        raise TimeoutError("list_images walked a symlink loop for 20 s")
    previous = signal.signal(signal.SIGALRM, hung)
    signal.alarm(20)
    try:
        files = data.list_images(root)
    finally:
        signal.alarm(0)
        signal.signal(signal.SIGALRM, previous)
    assert sorted(os.path.basename(f) for f in files) == ["0.png", "1.png", "2.png", "3.png"]


# --------------------------------------------------------------------------------------------------------------
# write_synthetic and the CLI
# --------------------------------------------------------------------------------------------------------------
def test_write_synthetic_writes_pvoc_and_davis_layouts(tmp_path):
    paths = data.write_synthetic(tmp_path, n_train=3, n_val=2, n_videos=2, n_frames=4, size=48,
                                 video_size=(40, 56), seed=0, progress=False)
    voc = Path(paths["pvoc"])
    assert voc == tmp_path / "VOCdevkit" / "VOC2012"
    train = (voc / "ImageSets/Segmentation/train.txt").read_text().split()
    val = (voc / "ImageSets/Segmentation/val.txt").read_text().split()
    assert len(train) == 3 and len(val) == 2 and not set(train) & set(val)
    for i in train + val:
        img, mask = Image.open(voc / "JPEGImages" / f"{i}.jpg"), Image.open(voc / "SegmentationClass" / f"{i}.png")
        assert img.mode == "RGB" and mask.mode == "P" and img.size == mask.size == (48, 48)
    # lossless masks: the files hold exactly the in-memory labels
    assert np.array_equal(np.array(Image.open(voc / "SegmentationClass" / f"{val[1]}.png")),
                          data.SyntheticScenes(2, 48, 0, data.VAL_FIRST_INDEX)[1][1])
    davis = Path(paths["davis"])
    seqs = (davis / "ImageSets/2017/val.txt").read_text().split()
    assert len(seqs) == 2
    for seq in seqs:
        frames = sorted((davis / "JPEGImages/480p" / seq).glob("*.jpg"))
        annos = sorted((davis / "Annotations/480p" / seq).glob("*.png"))
        assert [f.name for f in frames] == [f"{t:05d}.jpg" for t in range(4)]
        assert [a.stem for a in annos] == [f.stem for f in frames]
        for f, a in zip(frames, annos):
            m = Image.open(a)
            assert m.mode == "P" and m.size == Image.open(f).size == (56, 40)
        assert np.array(Image.open(annos[0])).max() >= 1


def test_synthetic_folder_and_in_memory_datasets_agree(tmp_path):
    data.write_synthetic(tmp_path, n_train=2, n_val=3, n_videos=1, n_frames=2, size=32, progress=False)
    on_disk = data.build_segmentation_dataset("synthetic", tmp_path, "val")
    in_memory = data.build_segmentation_dataset("synthetic", None, "val", n_images=3, size=32)
    assert len(on_disk) == len(in_memory) == 3
    assert on_disk.num_classes == in_memory.num_classes == data.SyntheticScenes.num_classes
    assert on_disk.class_names == data.SYNTHETIC_CLASSES
    for i in range(3):
        img, mask = on_disk[i]
        assert img.mode == "RGB" and np.array_equal(mask, in_memory[i][1])
    train = data.build_segmentation_dataset("synthetic", None, "train", n_images=3, size=32)
    assert not np.array_equal(np.asarray(train[0][0]), np.asarray(in_memory[0][0]))  # disjoint splits


def test_cli_write_synthetic(tmp_path):
    out = tmp_path / "synth"
    proc = run([sys.executable, "data.py", "--write-synthetic", str(out), "--n-train", "2", "--n-val", "1",
                "--n-videos", "1", "--n-frames", "3", "--size", "32", "--video-size", "32", "48"], in_process=True)
    assert proc.returncode == 0, proc.stderr
    assert len(list((out / "VOCdevkit/VOC2012/JPEGImages").glob("*.jpg"))) == 3
    assert len(list((out / "DAVIS/Annotations/480p").glob("*/*.png"))) == 3
    assert not json.loads((out / "VOCdevkit/VOC2012/synthetic.json").read_text())["grey"]
    proc = run([sys.executable, "data.py", "--write-synthetic", str(tmp_path / "grey"), "--n-train", "2", "--n-val",
                "1", "--n-videos", "1", "--n-frames", "3", "--size", "32", "--video-size", "32", "48", "--grey"],
               in_process=True)
    assert proc.returncode == 0, proc.stderr
    assert json.loads((tmp_path / "grey/VOCdevkit/VOC2012/synthetic.json").read_text())["grey"]
    frame = np.asarray(Image.open(tmp_path / "grey/DAVIS/JPEGImages/480p/synth-000/00000.jpg"), dtype=np.float64)
    assert np.abs(frame - frame.mean(-1, keepdims=True)).max() <= 20  # JPEG of a grey frame


# --------------------------------------------------------------------------------------------------------------
# segmentation datasets, prepare_coco and prepare_voc
# --------------------------------------------------------------------------------------------------------------
def _voc_fixture(base, leopart=False, aug=True):
    images, sets = ("images", "sets") if leopart else ("JPEGImages", "ImageSets/Segmentation")
    for split, ids in (("train", ["t1", "t2"]), ("val", ["v1"])):
        (base / sets).mkdir(parents=True, exist_ok=True)
        (base / sets / f"{split}.txt").write_text("\n".join(ids) + "\n")
        for i in ids:
            _write_image(base / images / f"{i}.jpg", (20, 10))
            _write_mask(base / "SegmentationClass" / f"{i}.png", np.full((10, 20), 15))  # person, palette
            if aug:
                m = np.full((10, 20), 3)
                m[0, 0] = 255
                _write_mask(base / "SegmentationClassAug" / f"{i}.png", m, palette=False)  # bird, grayscale


@pytest.mark.parametrize("layout,given", [("standard", "VOCdevkit/VOC2012"), ("standard", "VOCdevkit"),
                                          ("standard", "."), ("leopart", "VOCSegmentation"), ("leopart", ".")])
def test_pvoc_loader_reads_both_layouts_from_any_root_level(tmp_path, layout, given):
    base = tmp_path / ("VOCdevkit/VOC2012" if layout == "standard" else "VOCSegmentation")
    _voc_fixture(base, leopart=layout == "leopart")
    train = data.build_segmentation_dataset("pvoc", tmp_path / given, "train")
    val = data.build_segmentation_dataset("pvoc", tmp_path / given, "val")
    assert len(train) == 2 and len(val) == 1 and train.num_classes == 21 and train.class_names[15] == "person"
    img, mask = train[0]
    assert img.mode == "RGB" and img.size == (20, 10) and mask.dtype == np.uint8 and mask.shape == (10, 20)
    assert mask[0, 0] == 255 and (mask[mask != 255] == 3).all()  # train masks from SegmentationClassAug
    assert (val[0][1] == 15).all()                                # val masks from SegmentationClass


def test_pvoc_train_falls_back_to_segmentation_class_without_aug(tmp_path):
    _voc_fixture(tmp_path / "VOCdevkit/VOC2012", aug=False)
    assert (data.build_segmentation_dataset("pvoc", tmp_path, "train")[0][1] == 15).all()


def test_coco_tables_hold_the_spec_ids():
    things = [i for ids in data.COCO_THINGS_IDS.values() for i in ids]
    stuff = [i for ids in data.COCO_STUFF_IDS.values() for i in ids]
    assert len(things) == len(set(things)) == 80 and sorted(stuff) == list(range(92, 183))
    assert data.COCO_THINGS_CLASSES[9] == "person" and data.COCO_STUFF_CLASSES[5] == "ground"
    lut_t, lut_s = data.COCO_THINGS_LUT, data.COCO_STUFF_LUT
    assert lut_t.dtype == np.uint8 and lut_t.shape == lut_s.shape == (256,)
    assert lut_t[1] == 9 and lut_t[3] == 11 and lut_t[0] == 255 and lut_t[92] == 255 and lut_t[200] == 255
    assert lut_t[12] == 255  # unused COCO id
    assert lut_s[149] == 5 and lut_s[157] == 8 and lut_s[0] == 255 and lut_s[183] == 255 and lut_s[1] == 255
    assert set(np.unique(lut_t).tolist()) == set(range(12)) | {255}
    assert set(np.unique(lut_s).tolist()) == set(range(15)) | {255}


def _coco_fixture(tmp_path, kind, leopart=True):
    image_dir = tmp_path / ("coco/images/val2017" if leopart else "val2017")
    if kind == "things":
        mask_dir = tmp_path / "annotations/panoptic_annotations/semantic_segmentation_val2017"
        values = [1, 3, 0, 92, 200]   # person, car, unlabeled, stuff, stuff
    else:
        mask_dir = tmp_path / ("annotations/annotations/stuff_annotations/stuff_val2017_pixelmaps" if leopart
                               else "annotations/stuff_val2017_pixelmaps")
        values = [149, 157, 183, 0, 96]  # road, sky-other, other, unlabeled, building-other
    for name in ("000000000002", "000000000001"):
        _write_image(image_dir / f"{name}.jpg", (5, 3))
        _write_mask(mask_dir / f"{name}.png", np.tile(np.array(values, dtype=np.uint8), (3, 1)), palette=False)
    return image_dir, mask_dir


@pytest.mark.parametrize("leopart", [True, False])
def test_coco_things_loader_maps_panoptic_ids_to_supercategories(tmp_path, leopart):
    _coco_fixture(tmp_path, "things", leopart)
    ds = data.build_segmentation_dataset("coco_things", tmp_path, "val")
    assert len(ds) == 2 and ds.num_classes == 12 and Path(ds.samples[0][0]).name == "000000000001.jpg"
    assert ds[0][1][0].tolist() == [9, 11, 255, 255, 255]


@pytest.mark.parametrize("leopart", [True, False])
def test_coco_stuff_loader_maps_stuff_ids_to_supercategories(tmp_path, leopart):
    _coco_fixture(tmp_path, "stuff", leopart)
    ds = data.build_segmentation_dataset("coco_stuff", tmp_path, "val")
    assert len(ds) == 2 and ds.num_classes == 15
    assert ds[1][1][0].tolist() == [5, 8, 255, 255, 0]


def test_ade20k_loader_shifts_labels_and_ignores_zero(tmp_path):
    base = tmp_path / "ADEChallengeData2016"
    for sub in ("training", "validation"):
        _write_image(base / "images" / sub / f"ADE_{sub}_00000001.jpg", (4, 2))
        _write_mask(base / "annotations" / sub / f"ADE_{sub}_00000001.png", [[0, 1, 150, 13], [2, 2, 2, 2]],
                    palette=False)
    ds = data.build_segmentation_dataset("ade20k", tmp_path, "val")
    assert len(ds) == 1 and ds.num_classes == 150 and ds.class_names[12] == "person"
    assert ds[0][1].tolist() == [[255, 0, 149, 12], [1, 1, 1, 1]]
    assert len(data.build_segmentation_dataset("ade20k", base, "train")) == 1


def test_segmentation_loader_missing_folder_raises_value_error_naming_it(tmp_path):
    with pytest.raises(ValueError, match="nowhere"):
        data.build_segmentation_dataset("pvoc", tmp_path / "nowhere", "val")
    with pytest.raises(ValueError, match="VOCSegmentation"):  # root exists, no layout: lists where it looked
        data.build_segmentation_dataset("pvoc", tmp_path, "val")
    with pytest.raises(ValueError, match="semantic_segmentation_val2017"):
        _write_image(tmp_path / "coco/images/val2017/1.jpg", (4, 4))
        data.build_segmentation_dataset("coco_things", tmp_path, "val")
    with pytest.raises(ValueError, match="trainaug.txt"):
        _voc_fixture(tmp_path / "VOCdevkit/VOC2012")
        data.build_segmentation_dataset("pvoc", tmp_path, "trainaug")
    with pytest.raises(ValueError, match="SegmentationClassAug"):
        _voc_fixture(tmp_path / "plain/VOCdevkit/VOC2012", aug=False)
        (tmp_path / "plain/VOCdevkit/VOC2012/ImageSets/Segmentation/trainaug.txt").write_text("t1\n")
        data.build_segmentation_dataset("pvoc", tmp_path / "plain", "trainaug")


def test_segmentation_loader_split_naming_an_absent_image_raises_value_error_naming_it(tmp_path):
    base = tmp_path / "VOCdevkit/VOC2012"
    _voc_fixture(base)
    (base / "JPEGImages" / "v1.jpg").unlink()
    with pytest.raises(ValueError, match="v1.jpg"):
        data.build_segmentation_dataset("pvoc", tmp_path, "val")
    (base / "SegmentationClassAug" / "t2.png").unlink()
    with pytest.raises(ValueError, match="t2.png"):
        data.build_segmentation_dataset("pvoc", tmp_path, "train")


def test_segmentation_loader_mask_size_mismatch_raises_value_error_naming_it(tmp_path):
    base = tmp_path / "VOCdevkit/VOC2012"
    _voc_fixture(base)
    _write_mask(base / "SegmentationClass" / "v1.png", np.zeros((11, 20)))
    with pytest.raises(ValueError, match="v1.png"):
        data.build_segmentation_dataset("pvoc", tmp_path, "val")


def test_segmentation_loader_rejects_rgb_masks_with_a_clear_error(tmp_path):
    base = tmp_path / "VOCdevkit/VOC2012"
    _voc_fixture(base)
    Image.new("RGB", (20, 10), (128, 0, 0)).save(base / "SegmentationClass" / "v1.png")
    with pytest.raises(ValueError, match="v1.png.*single-channel"):
        data.build_segmentation_dataset("pvoc", tmp_path, "val")
    with pytest.raises(ValueError, match="single-channel"):
        data.read_mask(base / "SegmentationClass" / "v1.png")


def test_build_segmentation_dataset_rejects_unknown_names_and_missing_root():
    with pytest.raises(ValueError, match="unknown dataset"):
        data.build_segmentation_dataset("cityscapes", None, "val")
    with pytest.raises(ValueError, match="root"):
        data.build_segmentation_dataset("pvoc", None, "val")


@pytest.mark.parametrize("kind", ["things", "stuff", "ade20k"])
def test_coco_and_ade20k_layouts_refuse_unmatched_images_and_masks_naming_the_first_few(tmp_path, kind):
    if kind == "ade20k":
        image_dir, mask_dir = tmp_path / "ADEChallengeData2016/images/validation", \
            tmp_path / "ADEChallengeData2016/annotations/validation"
        for i in (1, 2):
            _write_image(image_dir / f"ADE_val_{i:08d}.jpg", (4, 2))
            _write_mask(mask_dir / f"ADE_val_{i:08d}.png", np.ones((2, 4)), palette=False)
        name, first = "ade20k", "ADE_val_00000003.jpg"
    else:
        image_dir, mask_dir = _coco_fixture(tmp_path, kind)
        name, first = f"coco_{kind}", "000000000003.jpg"
    assert len(data.build_segmentation_dataset(name, tmp_path, "val")) == 2
    stem = first[:-4]
    for k in range(4):  # 4 images, 2 masks: a partly unpacked mask folder
        _write_image(image_dir / f"{stem[:-1]}{3 + k}.jpg", (5, 3))
    with pytest.raises(data.MissingInput, match=rf"{name}/val: images of {image_dir} without a mask in {mask_dir}: "
                                                rf"4 \({first}, .*, .* and 1 more\)"):
        data.build_segmentation_dataset(name, tmp_path, "val")
    for k in range(4):
        (image_dir / f"{stem[:-1]}{3 + k}.jpg").unlink()
    (image_dir / f"{stem[:-1]}1.jpg").unlink()  # and a mask without its image
    with pytest.raises(data.MissingInput, match=rf"masks of {mask_dir} without an image in {image_dir}: 1 "
                                                rf"\({stem[:-1]}1.png\)"):
        data.build_segmentation_dataset(name, tmp_path, "val")


def test_pvoc_and_synthetic_layouts_name_the_first_few_listed_files_that_are_missing(tmp_path):
    base = tmp_path / "VOCdevkit/VOC2012"
    _voc_fixture(base)
    (base / "ImageSets/Segmentation/val.txt").write_text("v1\nv2\nv3\nv4\nv5\n")
    with pytest.raises(data.MissingInput, match=r"pvoc/val: images that do not exist: 4 \(.*v2.jpg, .*v3.jpg, "
                                                r".*v4.jpg and 1 more\); masks that do not exist: 4 .* \(listed in "):
        data.build_segmentation_dataset("pvoc", tmp_path, "val")
    root = _small_synthetic(tmp_path / "synth")
    (root / "VOCdevkit/VOC2012/SegmentationClass/train_000001.png").unlink()
    with pytest.raises(data.MissingInput, match=r"synthetic/train: masks that do not exist: 1 \(.*train_000001.png\)"):
        data.build_segmentation_dataset("synthetic", root, "train")


def _panoptic_fixture(root):
    """Two COCO val images with a panoptic PNG + JSON (segment ids in RGB) and a stuff pixel map each."""
    rng = np.random.default_rng(0)
    annotations, images = [], []
    (root / "panoptic_val2017").mkdir(parents=True)
    (root / "stuff_val2017_pixelmaps").mkdir()
    for i, (w, h) in enumerate([(6, 4), (5, 3)]):
        name = f"{i + 1:012d}"
        _write_image(root / "coco/images/val2017" / f"{name}.jpg", (w, h))
        seg_ids = np.array([0, 300, 70000 + i, 2])[rng.integers(0, 4, (h, w))]  # 0: unlabeled
        rgb = np.stack([seg_ids % 256, seg_ids // 256 % 256, seg_ids // 65536], -1).astype(np.uint8)
        Image.fromarray(rgb).save(root / "panoptic_val2017" / f"{name}.png")
        annotations.append({"file_name": f"{name}.png", "image_id": i + 1, "segments_info": [
            {"id": 300, "category_id": 1}, {"id": 70000 + i, "category_id": 18}, {"id": 2, "category_id": 184}]})
        images.append({"id": i + 1, "file_name": f"{name}.jpg", "width": w, "height": h})
        _write_mask(root / "stuff_val2017_pixelmaps" / f"{name}.png",
                    np.array([0, 96, 157, 183])[rng.integers(0, 4, (h, w))], palette=False)
    (root / "panoptic_val2017.json").write_text(json.dumps({"images": images, "annotations": annotations}))
    return annotations


def test_prepare_coco_converts_panoptic_png_and_json_and_stuff_maps_and_checks_them(tmp_path):
    _panoptic_fixture(tmp_path)
    report = data.prepare_coco(tmp_path, "val", tmp_path / "panoptic_val2017.json", tmp_path / "panoptic_val2017",
                               tmp_path / "stuff_val2017_pixelmaps", progress=False)
    things = data.build_segmentation_dataset("coco_things", tmp_path, "val")
    stuff = data.build_segmentation_dataset("coco_stuff", tmp_path, "val")
    assert len(things) == len(stuff) == 2
    rgb = np.array(Image.open(tmp_path / "panoptic_val2017" / "000000000002.png")).astype(np.int64)
    seg_ids = rgb[..., 0] + 256 * rgb[..., 1] + 65536 * rgb[..., 2]
    expected = np.select([seg_ids == 300, seg_ids == 70001, seg_ids == 2], [9, 1, 255], 255)  # person, animal
    assert (things[1][1] == expected).all()
    raw = np.array(Image.open(tmp_path / "stuff_val2017_pixelmaps" / "000000000002.png"))
    assert (stuff[1][1] == np.select([raw == 96, raw == 157], [0, 8], 255)).all()  # building, sky
    assert "coco_things/val: 2 images, 2 masks" in report and "official split has 5000 images" in report
    assert "person" in report and "ignore (255)" in report


def test_prepare_coco_names_a_truncated_panoptic_json_or_png_and_a_missing_panoptic_dir(tmp_path):
    _panoptic_fixture(tmp_path)
    panoptic = [sys.executable, "data.py", "prepare_coco", "--root", tmp_path, "--panoptic_json",
                tmp_path / "panoptic_val2017.json"]
    r = run(panoptic, in_process=True)  # no --panoptic_dir
    assert r.returncode == 2 and "--panoptic_json needs --panoptic_dir" in r.stderr and "Traceback" not in r.stderr
    assert r.stderr.startswith("data.py: error: ") and len(r.stderr.splitlines()) == 1
    png = _truncate(tmp_path / "panoptic_val2017" / "000000000002.png")
    with pytest.raises(data.InputError, match=f"cannot read panoptic PNG {png}"):
        data.prepare_coco(tmp_path, "val", tmp_path / "panoptic_val2017.json", tmp_path / "panoptic_val2017",
                          progress=False)
    meta = _truncate(tmp_path / "panoptic_val2017.json")
    r = run(panoptic + ["--panoptic_dir", tmp_path / "panoptic_val2017"], in_process=True)
    assert r.returncode == 2 and f"--panoptic_json {meta} is not readable JSON" in r.stderr, r.stderr
    assert len(r.stderr.splitlines()) == 1


def test_prepare_voc_builds_trainaug_from_sbd_mat_files_on_the_command_line(tmp_path):
    from scipy.io import savemat
    base = tmp_path / "VOCdevkit/VOC2012"
    _voc_fixture(base, aug=False)  # t1, t2 (train) and v1 (val), VOC masks = 15 (person)
    _write_image(base / "JPEGImages" / "s1.jpg", (20, 10))
    sbd = tmp_path / "benchmark_RELEASE/dataset/cls"
    sbd.mkdir(parents=True)
    labels = np.zeros((10, 20), np.uint8)
    labels[2:6, 3:9] = 12  # dog
    savemat(sbd / "s1.mat", {"GTcls": {"Segmentation": labels, "Boundaries": np.zeros(1), "CategoriesPresent": 12}})
    (tmp_path / "trainaug.txt").write_text("t1\ns1\n")
    out = run([sys.executable, "data.py", "prepare_voc", "--voc_root", str(tmp_path / "VOCdevkit"),
               "--sbd_cls", str(sbd), "--trainaug_list", str(tmp_path / "trainaug.txt")], in_process=True)
    assert out.returncode == 0, out.stderr
    trainaug = data.build_segmentation_dataset("pvoc", tmp_path, "trainaug")
    assert [Path(m).name for _, m in trainaug.samples] == ["t1.png", "s1.png"]
    assert (trainaug[0][1] == 15).all() and (trainaug[1][1] == labels).all()  # VOC's own PNG first, else SBD
    assert "pvoc/trainaug: 2 images, 2 masks" in out.stdout and "official split has 10582" in out.stdout
    assert "pvoc/val: 1 images" in out.stdout


# ==============================================================================================================
# 10. The repository: hub-and-spoke imports, one source of the pretraining defaults
# ==============================================================================================================
def test_scripts_import_only_hubs():
    """Hub and spokes (DINO's scripts import only vision_transformer.py and utils.py): a script imports hubs, never
    another script, and the hubs import no script and form no cycle."""
    import ast
    scripts = {"train", "eval_linear", "eval_kmeans", "eval_davis", "visualize", "bench"}
    hubs = {Path(p).stem for p in os.listdir(ROOT) if p.endswith(".py")} - scripts - {"test_croc"}
    assert {"model", "clustering", "data", "metrics"} <= hubs
    local = scripts | hubs
    graph = {}
    for name in sorted(local):
        tree = ast.parse(Path(ROOT, f"{name}.py").read_text())
        imported = {a.name.split(".")[0] for n in ast.walk(tree) if isinstance(n, ast.Import) for a in n.names}
        imported |= {n.module.split(".")[0] for n in ast.walk(tree) if isinstance(n, ast.ImportFrom) and n.module}
        graph[name] = imported & local - {name}
        assert not graph[name] & scripts, (name, graph[name] & scripts)
    done = set()

    def visit(name, path):
        assert name not in path, f"import cycle: {' -> '.join(path + [name])}"
        if name not in done:
            for other in graph[name]:
                visit(other, path + [name])
            done.add(name)
    for name in graph:
        visit(name, [])


def test_pretrain_config_is_the_source_of_the_training_defaults():
    """bench.py and the tests run the step with model.PretrainConfig, train.py from its parser: every setting of
    the config is a flag of train.py whose default is the config's value."""
    parser = train.get_args_parser()
    flags = {action.dest for action in parser._actions}
    for field in dataclasses.fields(M.PretrainConfig):
        assert field.name in flags, field.name
        assert parser.get_default(field.name) == getattr(M.PretrainConfig(), field.name), field.name



def test_readme_names_only_code_that_exists():
    """Every `module.name` the README cites (the paper -> code table, the API examples) is in that module."""
    import importlib
    import re
    text = (ROOT / "README.md").read_text()
    modules = "model|clustering|data|metrics|synthetic|train|eval_linear|eval_kmeans|eval_davis|visualize|bench"
    cited = set(re.findall(rf"`((?:{modules})\.[A-Za-z_][\w.]*)`", text)) - {f"{m}.py" for m in modules.split("|")}
    assert len(cited) > 30, cited  # the table is there
    for name in sorted(cited):
        module, *attributes = name.split(".")
        obj = importlib.import_module(module)
        for attribute in attributes:
            assert hasattr(obj, attribute), f"README cites {name}: {module} has no {attribute}"
            obj = getattr(obj, attribute)

# ==============================================================================================================
# 11. Training reliability (train.py): DDP, checkpoints, resume, signals, bad input
# ==============================================================================================================
# 3 steps of 4 images per epoch at 32 px with the 4-block ViT: a whole in-process run takes about a second
STEP_TINY = TINY + ["--arch", "vit_nano", "--patch_size", "8", "--img_size", "32", "--out_dim", "64", "--k_start", "4",
                    "--synthetic_images", "12", "--synthetic_size", "32"]  # 16 tokens per view, fewer scenes


def _run(cmd, out, env_extra=None, **kw):
    return run(cmd + ["--output_dir", str(out)], env_extra, **kw)


def _log(out):
    with open(os.path.join(out, "log.txt")) as f:
        return [json.loads(line) for line in f]


def test_plain_dino_baseline_trains_without_clustering(tmp_path):
    r = _run([sys.executable, "train.py"] + STEP_TINY + ["--epochs", "1", "--alpha", "0"], tmp_path, in_process=True)
    assert r.returncode == 0, r.stderr[-3000:]
    (e,) = _log(tmp_path)
    assert e["loss_dense"] == 0.0 and "mean_k" not in e


def _sigterm_python_train(tmp_path):
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1")
    cmd = [sys.executable, "train.py"] + STEP_TINY + ["--epochs", "1000", "--output_dir", str(tmp_path)]
    proc = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        deadline = time.time() + 120
        while not (tmp_path / "log.txt").exists() and time.time() < deadline:  # wait for the first epoch
            time.sleep(0.2)
        proc.send_signal(signal.SIGTERM)
        return tmp_path, proc, proc.communicate(timeout=120)[0]
    finally:
        if proc.poll() is None:
            proc.kill()


@early(_sigterm_python_train)
def test_sigterm_during_training_leaves_a_loadable_checkpoint(early_run):
    tmp_path, proc, out = early_run
    assert proc.returncode == 0, out[-3000:]
    assert "signal received" in out
    ckpt = M.torch_load(str(tmp_path / "checkpoint.pth"))
    assert 1 <= ckpt["epoch"] < 1000
    assert not [f for f in os.listdir(tmp_path) if ".tmp" in f]  # no half-written file left behind


def test_image_folder_with_a_corrupt_file_trains_and_logs_the_skip(tmp_path):
    root = tmp_path / "images" / "sub"
    root.mkdir(parents=True)
    rng = np.random.default_rng(0)
    for i in range(7):
        Image.fromarray(rng.integers(0, 255, (80, 96, 3), dtype=np.uint8)).save(root / f"{i}.jpg")
    (root / "broken.jpg").write_bytes(b"\xff\xd8\xff\xe0 not a jpeg")
    r = _run([sys.executable, "train.py"] + STEP_TINY + ["--epochs", "1", "--data_path", str(tmp_path / "images")],
             tmp_path / "out", in_process=True)
    assert r.returncode == 0, r.stderr[-3000:]
    assert "broken.jpg" in r.stderr + r.stdout
    (e,) = _log(tmp_path / "out")
    assert e["skipped_files"] >= 1


def test_empty_image_folder_fails_with_a_clear_message(tmp_path):
    (tmp_path / "empty").mkdir()
    r = _run([sys.executable, "train.py"] + STEP_TINY + ["--data_path", str(tmp_path / "empty")], tmp_path / "out",
             in_process=True)
    assert r.returncode == 2 and "Traceback" not in r.stderr, r.stderr[-3000:]  # a user's mistake: one line
    assert str(tmp_path / "empty") in r.stderr.strip().splitlines()[-1]


# --------------------------------------------------------------------------------------------------------------
# stops, resumes and bad input as a cluster user meets them
# --------------------------------------------------------------------------------------------------------------
def _train_here(out, extra=(), sigterm_at=None, monkeypatch=None):
    """train.main in this process. sigterm_at=k: SIGTERM to this process at the k-th stop check (one per step,
    plus one after each epoch but the last), as a scheduler would send it."""
    args = train.get_args_parser().parse_args(STEP_TINY + ["--output_dir", str(out)] + list(extra))
    handlers = {sig: signal.getsignal(sig) for sig in train.StopFlag.SIGNALS}
    if sigterm_at is not None:
        checks, should_stop = [0], train.StopFlag.should_stop

        def signalled(self):
            checks[0] += 1
            if checks[0] == sigterm_at:
                os.kill(os.getpid(), signal.SIGTERM)
            return should_stop(self)
        monkeypatch.setattr(train.StopFlag, "should_stop", signalled)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # tiny matrices: threads only contend
    try:
        train.main(args)
    finally:
        torch.set_num_threads(threads)
        for sig, handler in handlers.items():
            signal.signal(sig, handler)
        if sigterm_at is not None:
            monkeypatch.setattr(train.StopFlag, "should_stop", should_stop)


@pytest.mark.parametrize("alpha", ["0", "1"])
def test_a_batchnorm_head_trains_and_saves_the_statistics(tmp_path, alpha):
    """DINO (--alpha 0) and CrOC (--alpha 1, the centroids' BN over the kept ones) with --use_bn_in_head."""
    out = tmp_path / "bn"
    _train_here(out, ["--epochs", "1", "--alpha", alpha, "--use_bn_in_head", "true"])
    log = _log(out)[-1]
    assert np.isfinite(log["loss"]) and (alpha == "0" or log["loss_dense"] > 0)
    teacher = M.torch_load(str(out / "checkpoint.pth"))["teacher"]
    assert teacher["head.mlp.1.num_batches_tracked"] > 0  # the teacher's BN ran on batch statistics


def test_resume_mid_epoch_gives_the_weights_of_an_uninterrupted_run_without_reloading_seen_batches(
        tmp_path, monkeypatch, capsys):
    loads, getitem = [0], data.SyntheticPretrain.__getitem__

    def counted(self, index):
        loads[0] += 1
        return getitem(self, index)
    monkeypatch.setattr(data.SyntheticPretrain, "__getitem__", counted)
    _train_here(tmp_path / "whole", ["--epochs", "2"])
    whole_loads, loads[0] = loads[0], 0
    # stop after step 2 of epoch 0, then after step 1 of epoch 1 (check 3 = step 3, 4 = epoch end, 5 = step 1)
    _train_here(tmp_path / "cut", ["--epochs", "2"], sigterm_at=2, monkeypatch=monkeypatch)
    assert "saved" in capsys.readouterr().out
    assert M.torch_load(str(tmp_path / "cut" / "checkpoint.pth"))["partial_epoch"]["steps"] == 2
    _train_here(tmp_path / "cut", ["--epochs", "2"], sigterm_at=3, monkeypatch=monkeypatch)
    assert "at epoch 0, step 2 of 3" in capsys.readouterr().out
    assert M.torch_load(str(tmp_path / "cut" / "checkpoint.pth"))["partial_epoch"]["steps"] == 1
    _train_here(tmp_path / "cut", ["--epochs", "2"])
    assert loads[0] == whole_loads == 2 * 12  # the skipped batches were never loaded
    a, b = (M.torch_load(str(tmp_path / run / "checkpoint.pth")) for run in ("whole", "cut"))
    for key in ("student", "teacher", "loss"):
        for name, tensor in a[key].items():
            assert torch.equal(tensor, b[key][name]), (key, name)  # fp32, bit for bit
    for sa, sb in zip(a["optimizer"]["state"].values(), b["optimizer"]["state"].values()):
        assert all(torch.equal(sa[k], sb[k]) for k in sa)
    la, lb = _log(tmp_path / "whole"), _log(tmp_path / "cut")
    assert [e["epoch"] for e in lb] == [0, 1]
    for ea, eb in zip(la, lb):
        assert ea["lr"] == eb["lr"] and ea["momentum"] == eb["momentum"]
        assert ea["loss"] == pytest.approx(eb["loss"], rel=1e-6)  # the epoch's mean over both parts


def test_augmentation_is_seeded_per_sample_and_leaves_the_global_rng_alone():
    samples = data.SeededSamples(data.SyntheticPretrain(4, 32, 0, data.TwoViews(32, 8)), seed=3)
    state = torch.get_rng_state()
    v1, p1, _ = samples[(1, 2)]
    assert torch.equal(torch.get_rng_state(), state)
    # the CPU generator alone is seeded: the views are those torch.manual_seed's full seeding draws
    sample_seed = np.random.SeedSequence([3, 1, 2]).generate_state(2, np.uint32)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(int(sample_seed[0]) << 32 | int(sample_seed[1]))
        v0, p0, _ = samples.dataset[2]
    assert torch.equal(v0, v1) and torch.equal(p0, p1)
    samples[(1, 3)]
    v2, p2, _ = samples[(1, 2)]
    assert torch.equal(v1, v2) and torch.equal(p1, p2)
    assert not torch.equal(v1, samples[(2, 2)][0])  # another epoch, other views


def test_epoch_sampler_skips_the_first_batches_of_the_same_order():
    sampler = data.EpochSampler(range(20), num_replicas=2, rank=1, seed=0)
    sampler.set_epoch(3)
    whole = list(sampler)
    sampler.set_epoch(3, skip=4)
    assert list(sampler) == whole[4:] and len(sampler) == len(whole) - 4
    assert {e for e, _ in whole} == {3}


def test_resume_refuses_state_changing_flags_naming_them_and_warns_about_the_others(tmp_path, capsys):
    out = tmp_path / "run"
    _train_here(out, ["--epochs", "1"])
    config = (out / "config.json").read_bytes()
    with pytest.raises(ValueError) as e:
        _train_here(out, ["--epochs", "2", "--out_dim", "32", "--norm_last_layer", "true", "--arch", "vit_small",
                          "--head_hidden_dim", "64"])
    assert all(f in str(e.value) for f in ("--out_dim 64 -> 32", "--norm_last_layer False -> True",
                                           "--arch vit_nano -> vit_small", "--head_hidden_dim 2048 -> 64"))
    assert "--epochs" not in str(e.value)
    assert (out / "config.json").read_bytes() == config  # the run's config is not overwritten by a refused one
    capsys.readouterr()
    _train_here(out, ["--epochs", "2", "--lr", "2e-3", "--batch_size_per_gpu", "3", "--num_workers", "1"])
    err = capsys.readouterr().err
    assert "--lr 0.001 -> 0.002" in err and "--batch_size_per_gpu 4 -> 3" in err and "--epochs 1 -> 2" in err
    assert "num_workers" not in err  # how the data is loaded does not change the run
    assert [e["epoch"] for e in _log(out)] == [0, 1]
    assert json.loads((out / "config.json").read_text())["lr"] == 2e-3


def test_init_weights_start_both_backbones_from_a_checkpoint_and_the_heads_fresh_on_a_new_run_only(
        tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "home"))
    torch.manual_seed(5)  # a CrOC checkpoint of STEP_TINY's shapes, heads too: a head loaded by mistake would match
    release = CrOCModel(build_vit("vit_nano", 8), CrOCHead(96, out_dim=64, out_dim_c=64))
    with torch.no_grad():
        for p in release.head.parameters():
            p.add_(1)  # trained: unlike the fresh init anywhere (its zero biases, unit norms)
    torch.save({"teacher": release.state_dict(), "student": CrOCModel(build_vit("vit_nano", 8), CrOCHead(
        96, out_dim=64, out_dim_c=64)).state_dict(), "args": argparse.Namespace(arch="vit_nano", patch_size=8)},
               tmp_path / "release.pth")
    first = []  # the networks as the first step gets them
    train_one_epoch = train.train_one_epoch

    def recording(student, teacher, *args, **kw):
        if not first:
            first.append((copy.deepcopy(student.state_dict()), copy.deepcopy(teacher.state_dict())))
        return train_one_epoch(student, teacher, *args, **kw)
    monkeypatch.setattr(train, "train_one_epoch", recording)
    out = tmp_path / "run"
    _train_here(out, ["--epochs", "1", "--init_weights", (tmp_path / "release.pth").as_uri()])
    (student, teacher), backbone, head = first[0], release.backbone.state_dict(), release.head.state_dict()
    for k, v in backbone.items():
        assert torch.equal(student[f"backbone.{k}"], v) and torch.equal(teacher[f"backbone.{k}"], v), k
    for k, v in head.items():  # fresh, and the teacher's equal to the student's
        assert torch.equal(teacher[f"head.{k}"], student[f"head.{k}"]) and not torch.equal(student[f"head.{k}"], v), k
    capsys.readouterr()
    torch.save(_nano(3).state_dict(), tmp_path / "other.pth")
    _train_here(out, ["--epochs", "2", "--init_weights", str(tmp_path / "other.pth")])  # a resume: not loaded
    assert "--init_weights " + str(tmp_path / "other.pth") + ": not loaded" in capsys.readouterr().out
    resumed = M.torch_load(str(out / "checkpoint.pth"))["teacher"]
    assert not torch.equal(resumed["backbone.pos_embed"], _nano(3).pos_embed)
    with pytest.raises(data.InputError, match=r"--patch_size 8 contradicts .*, a vit_tiny/16 checkpoint"):
        _official_croc_checkpoint(tmp_path / "tiny.pth")
        _train_here(tmp_path / "bad", ["--arch", "vit_tiny", "--init_weights", str(tmp_path / "tiny.pth")])


def test_restart_removes_temporary_files_and_restores_a_lost_log_line_and_numbered_checkpoint(tmp_path, capsys):
    out = tmp_path / "run"
    _train_here(out, ["--epochs", "2", "--saveckp_freq", "2"])
    lines = (out / "log.txt").read_text().splitlines()
    # a kill mid-write leaves temporary files; one between the checkpoint and the rest loses these two
    (out / "checkpoint.pth.tmp4242").write_bytes(b"\0" * 1000)
    (out / "checkpoint0002.pth.tmp4243").write_bytes(b"\0" * 1000)
    (out / "checkpoint0002.pth").unlink()
    (out / "log.txt").write_text(lines[0] + "\n" + lines[1][:20])  # epoch 1's line torn mid-write
    capsys.readouterr()
    _train_here(out, ["--epochs", "3", "--saveckp_freq", "2"])
    assert "restored the line of epoch 1" in capsys.readouterr().out
    assert not [f for f in os.listdir(out) if ".tmp" in f]
    assert M.torch_load(str(out / "checkpoint0002.pth"))["epoch"] == 2
    log = (out / "log.txt").read_text().splitlines()
    assert log[:2] == lines and [json.loads(line)["epoch"] for line in log] == [0, 1, 2]


# Every numeric flag of train.py with values outside its range (a float flag also takes nan and inf); the last
# "--" item of each is the flag refused. A test checks that no numeric flag is left out.
BAD_TRAINING_FLAGS = [
    ["--patch_size", "0"], ["--patch_size", "-8"], ["--out_dim", "0"], ["--out_dim", "1"], ["--out_dim_c", "1"],
    ["--head_hidden_dim", "0"], ["--momentum_teacher", "1"], ["--momentum_teacher", "-0.1"],
    ["--momentum_teacher", "nan"], ["--drop_path_rate", "1.5"], ["--drop_path_rate", "1"],
    ["--drop_path_rate", "-0.1"], ["--alpha", "-1"], ["--alpha", "inf"], ["--k_start", "1"], ["--k_start", "33"],
    ["--k_max", "1"], ["--k_max", "5"], ["--lambda_pos", "-1"], ["--lambda_pos", "nan"], ["--sinkhorn_lambda", "0"],
    ["--sinkhorn_lambda", "1e6"], ["--sinkhorn_iterations", "0"], ["--marginal_temp", "0"],
    ["--marginal_temp", "inf"], ["--warmup_teacher_temp", "0"], ["--teacher_temp", "-0.07"],
    ["--teacher_temp", "inf"], ["--warmup_teacher_temp_epochs", "-1"], ["--student_temp", "0"],
    ["--student_temp", "nan"], ["--center_momentum", "1"], ["--center_momentum", "-0.5"],
    ["--batch_size_per_gpu", "0"], ["--epochs", "0"], ["--epochs", "-1"], ["--lr", "inf"], ["--lr", "nan"],
    ["--lr", "-0.001"], ["--min_lr", "inf"], ["--min_lr", "-1"], ["--warmup_epochs", "-1"],
    ["--epochs", "5", "--warmup_epochs", "10"], ["--weight_decay", "inf"], ["--weight_decay", "-0.04"],
    ["--weight_decay_end", "nan"], ["--clip_grad", "-1"], ["--clip_grad", "inf"], ["--freeze_last_layer", "-1"],
    ["--img_size", "0"], ["--img_size", "-8"], ["--img_size", "36"], ["--global_crops_scale", "0.8", "0.4"],
    ["--global_crops_scale", "0", "1"], ["--global_crops_scale", "0.5", "1.5"], ["--synthetic_images", "0"],
    ["--synthetic_images", "3"], ["--synthetic_size", "0"], ["--num_workers", "-1"], ["--saveckp_freq", "-1"],
    ["--seed", "-1"], ["--seed", str(2 ** 31)], ["--log_freq", "0"], ["--dist_timeout", "0"],
    ["--dist_timeout", "inf"], ["--visualize_every", "-1"], ["--eval_every", "-1"],
    # the paths and strings checked before any work
    ["--data_path", "no/such/folder"], ["--eval_every", "1", "--eval_args", "0 '1"]]


def test_every_numeric_training_flag_is_refused_outside_its_range_before_any_work_naming_it(tmp_path):
    """One line naming the flag, its value and its range, as data.InputError (exit 2 on the command line), before
    the output folder exists; e.g. --out_dim 1 trained with a loss of 0, --lr inf ran."""
    parser = train.get_args_parser()
    numeric = {a.dest for a in parser._actions if a.type in (int, float)}
    refused = {next(f for f in reversed(flags) if f.startswith("--"))[2:] for flags in BAD_TRAINING_FLAGS}
    assert numeric <= refused, numeric - refused
    for flags in BAD_TRAINING_FLAGS:
        flag = next(f for f in reversed(flags) if f.startswith("--"))
        args = parser.parse_args(STEP_TINY + ["--output_dir", str(tmp_path / "out")] + flags)
        with pytest.raises(data.InputError) as e:
            train.main(args)
        message, raw = str(e.value), flags[flags.index(flag) + 1]
        assert message.startswith(f"{flag} ") and "\n" not in message, (flags, message)
        assert str(getattr(args, flag[2:])) in message or raw in message, (flags, message)  # the value refused
        assert not (tmp_path / "out").exists()
    train.check_args(parser.parse_args(STEP_TINY))  # the tiny configuration itself passes


def test_bad_argument_on_the_command_line_exits_2_with_one_line_and_no_traceback(tmp_path):
    r = _run([sys.executable, "train.py", "--out_dim", "0"], tmp_path / "out")  # a process of its own
    assert r.returncode == 2, r.stderr[-3000:]
    assert r.stderr.strip().splitlines() == [r.stderr.strip()] and "--out_dim 0: must be at least 2" in r.stderr
    assert not (tmp_path / "out").exists()


def _hold_lock(folder, holder="pid 4242 on elsewhere"):
    """Lock folder/.lock as a running train.py does (another open file: refused even to this process)."""
    fd = os.open(folder / ".lock", os.O_RDWR | os.O_CREAT)
    fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    os.write(fd, f"{holder}\n".encode())
    return fd


def _listing(folder):
    return {p.name: (p.stat().st_size, p.stat().st_mtime_ns, p.read_bytes()) for p in sorted(folder.iterdir())}


def test_a_second_run_in_a_locked_output_folder_exits_at_once_naming_the_holder_and_changes_nothing(tmp_path):
    """Two copies of one command in one folder: the second exits 2 at once naming the folder and the first one's
    pid, and leaves the folder as it was, the first one's in-flight temporary checkpoint too."""
    out = tmp_path / "run"
    out.mkdir()
    (out / "log.txt").write_text('{"epoch": 0}\n')
    (out / "checkpoint.pth.tmp4242").write_bytes(b"\0" * 100)  # the first copy's save in progress
    fd = _hold_lock(out)
    try:
        before = _listing(out)
        r = _run([sys.executable, "train.py"] + STEP_TINY + ["--epochs", "1"], out, in_process=True)
        assert r.returncode == 2, r.stderr[-3000:]
        assert r.stderr.strip().splitlines() == [r.stderr.strip()] and "Traceback" not in r.stderr
        assert f"--output_dir {out} is in use by another run (pid 4242 on elsewhere" in r.stderr
        assert _listing(out) == before and r.stdout == ""  # not even the config printed
    finally:
        os.close(fd)
    r = _run([sys.executable, "train.py"] + STEP_TINY + ["--epochs", "1"], out, in_process=True)  # released
    assert r.returncode == 0, r.stderr[-3000:]
    assert (out / ".lock").read_text() == f"pid {os.getpid()} on {socket.gethostname()}\n"
    assert not (out / "checkpoint.pth.tmp4242").exists()  # the stale file is removed once the folder is ours


@pytest.mark.parametrize("name", ["checkpoint.pth", "log.txt"])
def test_a_checkpoint_or_log_path_the_run_cannot_write_fails_before_the_first_step_naming_it(tmp_path, name):
    out = tmp_path / "run"
    (out / name).mkdir(parents=True)  # e.g. a folder where the run writes its file
    r = _run([sys.executable, "train.py"] + STEP_TINY + ["--epochs", "1"], out, in_process=True)
    assert r.returncode == 2 and "Traceback" not in r.stderr, r.stderr[-3000:]
    assert f"{out / name} is not a regular file" in r.stderr
    assert sorted(os.listdir(out)) == sorted([".lock", name])  # no config, no epoch trained


def test_a_non_finite_loss_says_whether_a_checkpoint_holds_the_last_good_state(tmp_path):
    args = argparse.Namespace(output_dir=str(tmp_path))
    train.raise_if_nonfinite(torch.tensor(False), 0, 3, args)  # finite: nothing
    with pytest.raises(FloatingPointError) as e:  # a fresh run's first epoch
        train.raise_if_nonfinite(torch.tensor(True), 0, 3, args)
    assert "no checkpoint has been saved yet" in str(e.value) and "last good state" not in str(e.value)
    (tmp_path / "checkpoint.pth").write_bytes(b"saved")
    with pytest.raises(FloatingPointError) as e:
        train.raise_if_nonfinite(torch.tensor(True), 2, 0, args)
    assert f"{tmp_path / 'checkpoint.pth'} holds the last good state" in str(e.value)


# --------------------------------------------------------------------------------------------------------------
# torchrun: ranks on one node and on two nodes, resume, signals to the process group
# --------------------------------------------------------------------------------------------------------------
def _free_port():
    import socket
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _readme_slurm_torchrun():
    """The torchrun line of the README's SLURM batch script, which srun starts on every node."""
    import re
    blocks = re.findall(r"```bash\n(.*?)```", (ROOT / "README.md").read_text(), re.S)
    (script,) = [b for b in blocks if "#SBATCH" in b]
    (line,) = [line for line in script.replace("\\\n", " ").splitlines() if line.startswith("srun ")]
    assert line.startswith("srun torchrun "), line
    return line[len("srun "):]


def _two_nodes(flags, out):
    """The README's SLURM job, both "machines" on this one: its torchrun line run twice, as srun runs it once per
    node, with SLURM's variables of 2 nodes of one process; c10d rendezvous -> (their exit codes, their output)."""
    port = _free_port()
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1", SLURM_JOB_NUM_NODES="2",
               SLURM_GPUS_ON_NODE="1", SLURM_JOB_ID=f"croc{port}", HEAD_NODE="127.0.0.1", MASTER_PORT=str(port),
               PATH=os.pathsep.join([str(Path(sys.executable).parent), os.environ.get("PATH", "")]))  # its torchrun
    procs = [subprocess.Popen(["bash", "-c", _readme_slurm_torchrun(), "croc.sbatch"] + flags
                              + ["--output_dir", str(out)],  # "$@": the flags of `sbatch croc.sbatch ...`
                              cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
             for _ in (0, 1)]
    try:
        texts = [p.communicate(timeout=300)[0] for p in procs]
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
    return [p.returncode for p in procs], "\n".join(texts)


def _torchrun_then_two_nodes(tmp_path):
    torchrun = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", "train.py"]
    out, first = tmp_path / "run", tmp_path / "first"
    r = _run(torchrun + STEP_TINY + ["--epochs", "2"], out)
    if r.returncode != 0:
        return out, first, r, None
    first.mkdir()
    for name in ("log.txt", "checkpoint.pth"):  # as the first launch left them: the second one writes over them
        shutil.copy(out / name, first / name)
    # the same flags with more epochs, on two nodes (the README's SLURM script), resume at epoch 2 and run only the
    # rest; --eval_every runs rank 0's k-means evaluation (eval_kmeans.py) while the other rank waits, and logs a
    # finite mIoU
    eval_args = "--img_size 64 --n_last_blocks 1 --seeds 0 --n_pictures 0 --batch_size 8"
    return out, first, r, _two_nodes(STEP_TINY + ["--epochs", "3", "--eval_every", "3", "--eval_args", eval_args], out)


@early(_torchrun_then_two_nodes)
def test_torchrun_two_processes_train_and_two_c10d_nodes_resume_keeping_teachers_identical(early_run):
    """Two ranks on one node (--standalone) train 2 epochs; the same run continued by two torchrun nodes (c10d
    rendezvous, the torchrun line of the README's SLURM script) resumes at epoch 2 with --eval_every. Both keep the
    ranks' teachers identical; one run checks both launches (each costs seconds of process starts)."""
    out, first, r, nodes = early_run
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    log = _log(first)
    assert [e["epoch"] for e in log] == [0, 1]
    for e in log:
        assert np.isfinite(e["loss"]) and e["loss_dense"] > 0 and e["mean_k"] >= 2
        assert e["teacher_sync_error"] == 0.0  # both ranks hold the same teacher, bit for bit
        for key in ("lr", "wd", "momentum", "images_per_s", "kept_centroids", "share_images_no_centroid",
                    "skipped_files"):
            assert key in e
    ckpt = M.torch_load(str(first / "checkpoint.pth"))
    assert ckpt["epoch"] == 2 and {"student", "teacher", "optimizer", "scaler", "loss", "args"} <= set(ckpt)
    vit = M.build_vit("vit_nano", 8)  # STEP_TINY's backbone
    assert M.load_pretrained(vit, str(first / "checkpoint.pth")) == {"missing": [], "unexpected": []}
    codes, text = nodes
    assert codes == [0, 0], text[-6000:]
    assert "resumed from" in text and "at epoch 2" in text
    log = _log(out)
    assert [e["epoch"] for e in log] == [0, 1, 2]
    assert "eval_kmeans_miou" not in log[1] and 0 < log[2]["eval_kmeans_miou"] <= 100
    assert all(e["teacher_sync_error"] == 0.0 for e in log)  # both nodes hold the same teacher, bit for bit
    assert len(M.torch_load(str(out / "checkpoint.pth"))["rng"]) == 2  # the ranks' random streams continue
    assert (out / "eval" / "epoch0003" / "results.json").is_file()
    assert not (out / "eval" / "epoch0003" / "teacher.pth").exists()  # the weights file is removed after use


def _torchrun_bn_head(tmp_path):
    torchrun = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", "train.py"]
    out = tmp_path / "bn"
    return out, _run(torchrun + STEP_TINY + ["--epochs", "1", "--alpha", "1", "--use_bn_in_head", "true"], out)


@early(_torchrun_bn_head)
def test_torchrun_two_processes_train_croc_with_the_batchnorm_head(early_run):
    """BN=1's CrOC on two ranks: the head's BatchNorms sum their statistics over the ranks inside DDP's forward
    (images and kept centroids), and the ranks' teachers stay identical."""
    out, r = early_run
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    log = _log(out)[-1]
    assert np.isfinite(log["loss"]) and log["loss_dense"] > 0 and log["teacher_sync_error"] == 0.0
    teacher = M.torch_load(str(out / "checkpoint.pth"))["teacher"]
    assert teacher["head.mlp.1.num_batches_tracked"] > 0


def _torchrun_into_a_locked_folder(tmp_path):
    """Two ranks started in a folder that another run holds -> (the run, the folder's listing before, after)."""
    torchrun = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", "train.py"]
    out = tmp_path / "run"
    out.mkdir()
    fd = _hold_lock(out)
    try:
        before = _listing(out)
        return _run(torchrun + STEP_TINY + ["--epochs", "1"], out, timeout=300), before, _listing(out)
    finally:
        os.close(fd)


@early(_torchrun_into_a_locked_folder)
def test_torchrun_ranks_all_exit_at_once_when_rank_0_finds_the_output_folder_locked(early_run):
    """Rank 0 takes the lock; its refusal reaches rank 1 through the run's first collective, so both exit 2 with
    its message, and neither waits on the other (for --dist_timeout, or torchrun's SIGKILL)."""
    r, before, after = early_run
    text = r.stdout + r.stderr
    assert text.count("is in use by another run (pid 4242 on elsewhere") == 2, text[-4000:]
    assert r.returncode == 1 and "exitcode  : 2" in text, text[-4000:]  # torchrun's report of its failed ranks
    assert after == before


def _processes_mentioning(*texts):
    found = []
    for pid in filter(str.isdigit, os.listdir("/proc")):
        try:
            with open(f"/proc/{pid}/cmdline", "rb") as f:
                cmdline = f.read()
                if all(text.encode() in cmdline for text in texts):
                    found.append(int(pid))
        except OSError:
            pass
    return found


# torchrun starts each rank in a session of its own and forwards the signal it gets to each rank's process group
# (os.killpg): rank and worker both receive it. Two ranks for SIGTERM (they must agree on the step to stop
# after), one for the others (the same handler). to="ranks": the signal goes to torchrun's children alone, the
# ranks, as train.py's StopFlag advises for an exit status 0.
def _signal_to_torchrun(tmp_path, sig, nproc, to):
    """-> (output folder, the run's output, the processes still naming that folder 15 s after it ended, torchrun's
    exit status)."""
    torchrun = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}",
                "train.py"]
    out = tmp_path / "run"
    cmd = torchrun + STEP_TINY + ["--synthetic_images", str(8 * nproc), "--num_workers", "1", "--epochs", "1000",
                                  "--output_dir", str(out)]  # epochs of 2 steps
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1")
    # a session of its own, as a batch job has: the signal goes to its whole process group (scancel, a closed ssh)
    proc = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            start_new_session=True)
    text = b""
    try:
        os.set_blocking(proc.stdout.fileno(), False)
        deadline = time.time() + 180
        while not (out / "log.txt").exists() and time.time() < deadline and proc.poll() is None:
            time.sleep(0.1)  # until the first epoch (2 steps) is done and the persistent workers serve the next
            text += proc.stdout.read() or b""
        if to == "group":
            os.killpg(proc.pid, getattr(signal, sig))
        else:
            with open(f"/proc/{proc.pid}/task/{proc.pid}/children") as f:
                for rank in f.read().split():
                    os.kill(int(rank), getattr(signal, sig))
        os.set_blocking(proc.stdout.fileno(), True)
        text = (text + proc.communicate(timeout=120)[0]).decode(errors="replace")
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
    deadline = time.time() + 15
    while _processes_mentioning(str(out)) and time.time() < deadline:  # DataLoader workers leave with their rank
        time.sleep(0.5)
    return out, text, _processes_mentioning(str(out)), proc.returncode


class _SignalsItselfOnIter:
    """Iterating it sends SIGTERM to this process: a signal that comes while DataLoader workers are forked."""

    def __iter__(self):
        os.kill(os.getpid(), signal.SIGTERM)
        return iter([1, 2])


def _signal_own_worker_then_ignore(worker_id):
    os.kill(os.getpid(), signal.SIGTERM)  # in the worker, where PyTorch's worker start has made SIGTERM fatal
    data.ignore_stop_signals(worker_id)


def test_a_stop_signal_while_workers_start_kills_no_worker_and_still_reaches_the_main_process():
    """data.start_workers holds the stop signals back while iter() forks the workers: one that reaches a worker
    before its worker_init_fn (ignore_stop_signals) is dropped there instead of killing it (which fails the step),
    and one that reaches the main process is delivered to StopFlag once the workers are up."""
    loader = torch.utils.data.DataLoader(list(range(4)), batch_size=2, num_workers=1,
                                         worker_init_fn=_signal_own_worker_then_ignore)
    stop = data.StopFlag()
    try:
        assert [b.tolist() for b in data.start_workers(loader)] == [[0, 1], [2, 3]]  # the worker lived
        assert not stop.requested
        assert list(data.start_workers(_SignalsItselfOnIter())) == [1, 2] and stop.requested
        assert signal.SIGTERM not in signal.pthread_sigmask(signal.SIG_BLOCK, [])  # the mask is restored
    finally:
        stop.restore()


@pytest.mark.parametrize("sig,nproc,to", [("SIGTERM", 2, "group"), ("SIGINT", 1, "group"), ("SIGHUP", 1, "group"),
                                          ("SIGTERM", 2, "ranks")])
@early(_signal_to_torchrun)
def test_signal_to_torchrun_process_group_with_workers_saves_and_leaves_no_process(early_run, sig, nproc, to):
    """Every rank saves and exits 0. torchrun's own exit status is 1 when it was signalled too (its
    SignalException, whatever the ranks' exit codes: train.py's StopFlag documents it), 0 when the ranks alone
    were."""
    out, text, left, returncode = early_run
    assert "signal received: saved" in text and "The save is complete" in text, text[-4000:]
    raised = "multiprocessing.api.SignalException: Process" in text  # torchrun's traceback
    assert (returncode, raised) == ((1, True) if to == "group" else (0, False)), text[-4000:]
    assert "killed by signal" not in text and "FloatingPointError" not in text
    ckpt = M.torch_load(str(out / "checkpoint.pth"))
    assert ckpt["epoch"] < 1000 and len(ckpt["rng"]) == nproc
    assert not [f for f in os.listdir(out) if ".tmp" in f]
    assert left == []


def _signal_during_eval_every(tmp_path):
    """A 1-process run with --eval_every 1, signalled as a job is (SIGTERM to its whole process group) while rank 0's
    eval_kmeans.py process runs -> (output folder, its command, the run's CompletedProcess)."""
    out = tmp_path / "run"
    cmd = [sys.executable, "train.py"] + STEP_TINY + [
        "--epochs", "2", "--eval_every", "1", "--output_dir", str(out),
        "--eval_args", "--img_size 64 --n_last_blocks 1 --seeds 0 --n_pictures 0 --batch_size 8"]
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1")
    proc = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            start_new_session=True)
    try:
        deadline = time.time() + 180
        while not _processes_mentioning("eval_kmeans.py", str(out)) and proc.poll() is None and time.time() < deadline:
            time.sleep(0.05)  # until the evaluation after epoch 0 runs (its --weights lie in the output folder)
        os.killpg(proc.pid, signal.SIGTERM)
        stdout, stderr = proc.communicate(timeout=120)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
    return out, cmd, subprocess.CompletedProcess(cmd, proc.returncode, stdout, stderr)


@early(_signal_during_eval_every)
def test_a_stop_signal_during_eval_every_saves_the_epoch_and_resumes_exactly(early_run, tmp_path):
    """A scheduler signals every process of the job, the --eval_every evaluation too: the ended evaluation is the
    run's stop, not a failure. The epoch just trained is saved (logged without its reading) and the run exits 0;
    the same command then resumes to the weights of an uninterrupted run."""
    out, cmd, r = early_run
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    assert "signal received: saved" in r.stdout and "at the end of epoch 0" in r.stdout, r.stdout[-3000:]
    assert "ended by a stop signal" in r.stderr and "Traceback" not in r.stderr, r.stderr[-3000:]
    (row,) = _log(out)
    assert row["epoch"] == 0 and "eval_kmeans_miou" not in row
    assert M.torch_load(str(out / "checkpoint.pth"))["epoch"] == 1
    assert not (out / "eval" / "epoch0001" / "teacher.pth").exists()
    r = run(cmd, in_process=True)  # the same command: epoch 1 and its evaluation
    assert r.returncode == 0 and "resumed from" in r.stdout, r.stderr[-3000:]
    rows = _log(out)
    assert [e["epoch"] for e in rows] == [0, 1] and np.isfinite(rows[1]["eval_kmeans_miou"])
    _train_here(tmp_path / "whole", ["--epochs", "2"])  # no evaluation: it leaves training unchanged
    a, b = (M.torch_load(str(folder / "checkpoint.pth")) for folder in (tmp_path / "whole", out))
    for key in ("student", "teacher"):
        for name, tensor in a[key].items():
            assert torch.equal(tensor, b[key][name]), (key, name)


def _full_disk():
    """preexec_fn: this process's files stop at 1 MB, so its first checkpoint fails as on a full disk."""
    signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # the write then fails (EFBIG) instead of killing the process
    resource.setrlimit(resource.RLIMIT_FSIZE, (2 ** 20, 2 ** 20))


@pytest.mark.parametrize("failure", ["eval_every", "full_disk"])
def test_an_error_with_workers_running_ends_the_run_and_its_workers(tmp_path, failure):
    """The workers ignore stop signals, and Python's exit waits for its child processes after a SIGTERM: an error
    raised while they run (a failing --eval_every, a full disk; a non-finite loss alike) must still end the run,
    with its own message, and leave no process behind."""
    out = tmp_path / "run"
    flags = ["--eval_every", "1", "--eval_args=--no_such_flag"] if failure == "eval_every" else []
    r = run([sys.executable, "train.py"] + STEP_TINY + ["--num_workers", "1", "--epochs", "2", "--output_dir",
                                                        str(out)] + flags,
            timeout=180, preexec_fn=_full_disk if failure == "full_disk" else None)
    assert r.returncode == 1, r.stderr[-3000:]
    assert "exited unexpectedly" not in r.stderr  # the workers' end does not hide the error
    if failure == "eval_every":
        assert "--eval_every: eval_kmeans.py failed" in r.stderr and "--no_such_flag" in r.stderr
    else:
        assert "save_atomic" in r.stderr, r.stderr[-3000:]  # the checkpoint's write failed
        assert not os.path.exists(out / "checkpoint.pth")
    assert _processes_mentioning(str(out)) == []


# ==============================================================================================================
# 12. CUDA: the clusterer and the training step give the CPU's values on a GPU; gpu_check.sh
# ==============================================================================================================
@pytest.fixture(params=["cpu", pytest.param("cuda", marks=pytest.mark.skipif(not torch.cuda.is_available(),
                                                                             reason="no CUDA"))])
def device(request):
    """Every device this machine has: the tests below compare it with the CPU (gpu_check.sh runs them with
    `-k on_device` on a GPU; on the CPU they compare the CPU with itself)."""
    return torch.device(request.param)


def test_cluster_on_device_equals_cluster_on_cpu(device):
    """Same tokens and seeds: the same hard assignment, kept clusters and K, and costs within float tolerance."""
    n_problems, k_start = 6, 6
    tokens, positions, _ = grouped_tokens(n_problems, torch.arange(4).repeat_interleave(6),
                                          torch.arange(3).repeat_interleave(8), d=16)  # group 3: view 1 only
    gen = torch.Generator().manual_seed(0)
    cls = torch.randn(n_problems, 16, generator=gen)
    seeds = torch.stack([torch.randperm(tokens.shape[1], generator=gen)[:k_start] for _ in range(n_problems)])
    on_cpu = cluster(tokens, positions, cls, k_start=k_start, k_max=5, seeds=seeds)
    on_device = cluster(tokens.to(device), positions.to(device), cls.to(device), k_start=k_start, k_max=5,
                        seeds=seeds.to(device))
    assert on_device.assignment.device.type == device.type
    assert (~on_cpu.valid).any()  # pruned or unused slots: the masking runs too
    for name in ("assignment", "valid", "k", "steps"):
        assert torch.equal(getattr(on_device, name).cpu(), getattr(on_cpu, name)), name
    torch.testing.assert_close(on_device.d_c.cpu(), on_cpu.d_c, rtol=1e-4, atol=1e-5)


def test_train_step_on_device_matches_cpu_within_tolerance(device, monkeypatch):
    """One full CrOC step (train_step, then backward, AdamW, teacher EMA) in fp32 from the same weights, views and
    clusterer seeds: the same losses, kept centroids, gradients, centres and teacher, within float tolerance."""
    original = clustering.cluster

    def cluster_with_fixed_seeds(tokens, positions, cls=None, *, k_start, generator=None, **kw):
        """The seeds drawn on the CPU: a CUDA generator draws other numbers than a CPU one."""
        gen = torch.Generator().manual_seed(0)
        seeds = torch.stack([torch.randperm(tokens.shape[1], generator=gen)[:k_start] for _ in tokens])
        return original(tokens, positions, cls, k_start=k_start, seeds=seeds.to(tokens.device), **kw)
    monkeypatch.setattr(clustering, "cluster", cluster_with_fixed_seeds)
    monkeypatch.setattr(torch.backends.cudnn, "allow_tf32", False)  # the patch embedding's convolution in fp32
    args = _args()
    args.k_max = args.k_start
    epoch = args.freeze_last_layer  # every layer learns
    models = _models(args)
    results = {}
    for dev in (torch.device("cpu"), device):
        student, teacher = (copy.deepcopy(m).to(dev) for m in models)
        loss_fn = _loss(args, args.out_dim, args.out_dim_c).to(dev)
        optimizer = torch.optim.AdamW(M.param_groups(student), lr=1e-3)
        scaler = torch.amp.GradScaler("cuda", enabled=False)
        views, positions = _batch(B=3)
        loss, stats = M.train_step(student, teacher, loss_fn, views.to(dev), positions.to(dev), epoch,
                                   torch.Generator(device=dev), nullcontext(), alpha=args.alpha,
                                   which_features=args.which_features, cluster_settings=args)
        M.optimizer_step(student, teacher, optimizer, scaler, loss, epoch, 0.996, clip_grad=args.clip_grad,
                         freeze_last_layer=args.freeze_last_layer)
        results[dev.type] = ({k: v.cpu() for k, v in stats.items()},
                             [p.grad.cpu() for p in student.parameters() if p.grad is not None],
                             [p.cpu() for p in teacher.parameters()], [b.cpu() for b in loss_fn.buffers()])
    (stats, grads, teacher, centres), (d_stats, d_grads, d_teacher, d_centres) = results["cpu"], results[device.type]
    assert 0 < stats["kept_centroids"] < 3 * args.k_max  # some slots pruned: the masked path runs
    assert d_stats.keys() == stats.keys()
    for key in stats:
        torch.testing.assert_close(d_stats[key], stats[key], rtol=1e-4, atol=1e-5, msg=key)
    assert len(d_grads) == len(grads) > 0
    for a, b in zip(d_grads, grads):
        assert (a - b).norm() <= 1e-3 * b.norm() + 1e-7, ((a - b).norm(), b.norm())
    for a, b in zip(d_centres + d_teacher, centres + teacher):  # the EMA moves the teacher by 0.004 of AdamW's step
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5)


def _gpu_check_dry(tmp_path):
    out = tmp_path / "gpu_check"
    return out, run(["bash", "gpu_check.sh", str(out)], {"GPU_CHECK_DRY": "1", "PYTHON": sys.executable})


@early(_gpu_check_dry)
def test_gpu_check_dry_run_writes_every_part_and_a_summary(early_run):
    """gpu_check.sh without a GPU (forced here, so that a GPU machine's test run stays short): every part's CPU
    skeleton, the GPU-only ones marked as skipped, and the same JSON keys as on a GPU."""
    out, proc = early_run
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    res = json.loads((out / "gpu_check.json").read_text())
    assert {"date", "mode", "machine", "parts", "tests", "syncs", "training", "compile", "ddp", "summary"} <= set(res)
    assert res["mode"] == "dry" and res["parts"]["tests"]["rc"] == 0
    assert (out / "parts.tsv").read_text().splitlines()[-1].startswith("cpu_parts\t0\t")
    assert res["tests"]["status"] == "ok" and "passed" in res["tests"]["pytest"]
    assert {"clusterer", "step_fp32"} <= set(res["syncs"]) and res["syncs"]["status"] == "skipped: no CUDA"
    assert res["syncs"]["step_fp32"]["loss_finite"]
    runs = {(r["compiled"], r["variant"]): r for r in res["training"]["runs"]}
    for variant in ("DINO", "CrOC"):
        assert runs[False, variant]["status"] == "ok" and runs[False, variant]["loss_finite"]
        assert runs[False, variant]["steps"] == 2 and runs[False, variant]["images_per_s"] > 0
        assert runs[True, variant]["status"] == "skipped: no CUDA"
    (ratio,) = res["training"]["ratios"]
    assert ratio["croc_over_dino"] > 0 and ratio["clusterer_share_of_croc_step"] > 0
    assert {"nccl", "gloo"} <= set(res["ddp"]) and res["ddp"]["status"].startswith("skipped: no CUDA")
    text = (out / "gpu_check.txt").read_text()
    assert res["compile"]["status"] == "skipped: no CUDA"  # inductor would take minutes on a CPU
    for heading in ("1. Tests that take a device", "2. Host syncs", "3. Training", "CrOC/DINO",
                    "4. The clusterer torch.compile'd", "5. Two ranks"):
        assert heading in text, heading
    assert text.strip() in proc.stdout
