"""CrOC's online clustering (Sec. 3.3): Sinkhorn-Knopp assignments, iterative merging, a-posteriori K, pruning.

Every function takes a leading problem dimension P (one problem = one image x one attention head, Sec. 3.3.3)
and runs with no Python loop over problems and no host-device synchronisation, so a GPU runs the whole batch as
a fixed sequence of kernels. The loop over the K_start - 2 merge steps is the algorithm itself.

Where the paper is silent we follow the authors' public pretraining code (github.com/stegmuel/CrOC); where the
two disagree we follow the paper. The differences from the official code, each noted where it applies:
  - the total cost is min-max normalised per problem, not over the whole batch (`transport_cost_matrix`);
  - the pair to merge has the highest COSINE similarity (Eq. 14 text), not the highest dot product of the
    unnormalised means (`merge_closest`);
  - a merge averages the pair's Y columns and C rows and recomputes E_cen = Y^T E and c from Y (Eq. 14,
    Sec. 3.3.2); the official code sums the pair's plan columns and recomputes the centroids, their
    (assignment-weighted) positions and c (mean token mass per cluster) from that merged plan (`merge_closest`);
  - the hard assignment is the plain row argmax (Eq. 15 after the paper's row normalisation); the official code
    takes it after normalising each view's columns, which moves about a tenth of an initial ViT's tokens at
    K_start = 12 (`hard_assignment`; `python bench.py --differences` measures it);
  - the centroids pool the tokens with the soft Q* (Eq. 2: the selected plan, rows normalised, pruned columns
    dropped); the official code pools with Q* * M, each view's columns normalised (`soft_assignment`);
  - seeds are drawn by an exponential race instead of torch.multinomial, which checks r on the host
    (`sample_seeds`); the distribution is the same.
Kept from the official code although the paper's equations say otherwise, each because the literal reading is
degenerate or unspecified: r is the softmax of the tokens' cosine similarity to the [CLS] token (the paper: "the
attention map of the [CLS] token"); c = softmax(Y^T s) on those raw similarities s, not on r (Eq. 10 on r is
uniform: `centroid_marginal`); the temperature 2.0 in both marginals (Eq. 10 has none); d_c measured on the
normalised total cost (Eq. 13 writes T_sem). Also kept: Sinkhorn's division of the plan by its sum before the
rescalings, which the first row rescaling undoes (`sinkhorn`).
"""
import math
from typing import NamedTuple, Optional

import torch
import torch.nn.functional as F
from einops import rearrange, repeat
from torch import Tensor


class ClusterResult(NamedTuple):
    plan: Tensor  # (P, 2N, k_max) the Sinkhorn plan of the selected K, as `sinkhorn` gave it; columns >= k zero
    q_star: Tensor  # (P, 2N, k_max) Q*: that plan, rows normalised, pruned (Eq. 16) and padded columns zero
    assignment: Tensor  # (P, 2N, k_max) M, hard 0/1 (Eq. 15); pruned columns and columns >= k are zero
    valid: Tensor  # (P, k_max) bool: the cluster has a token in both views (Eq. 16)
    k: Tensor  # (P,) long: the selected number of clusters, before pruning
    d_c: Tensor  # (P, k_start - 1) the transport cost d_c (Eq. 13) for K = k_start, k_start - 1, ..., 2
    steps: Tensor  # (P, k_start - 1, 2N) long with return_steps (`step_labels` per K), else (P, 0, 2N)


# --------------------------------------------------------------------------------------------------------------
# Optimal transport (Eq. 11-13)
# --------------------------------------------------------------------------------------------------------------
def max_sinkhorn_lambda(dtype: torch.dtype) -> float:
    """The largest lambda for which exp(-lambda * cost), cost in [0, 1], and its square stay normal floats
    (43.6 in float32, 354 in float64; the paper's 20 is well inside)."""
    return -0.5 * math.log(torch.finfo(dtype).tiny)


def sinkhorn(cost: Tensor, r: Tensor, c: Tensor, lam: float = 20.0, n_iter: int = 5):
    """Sinkhorn-Knopp (Eq. 11-12): plan (P, n, k) and transport cost d_c = <plan, cost> (P,) (Eq. 13).

    cost (P, n, k) the matrix T in [0, 1], as `cluster` gives it (min-max normalised); r (P, n) and c (P, k) the
    marginals. The algorithm the paper cites (Cuturi 2013, its [10]): plan = exp(-lam * cost), then `n_iter`
    rounds of rescaling the plan's rows to sum to r and its columns to sum to c (the polytope of Eq. 12). It
    converges to Eq. 11's entropic OT plan for regularisation 1 / lam (POT's `ot.sinkhorn` with reg = 1 / lam).
    The division by the plan's sum first is the official code's, not the paper's: the first row rescaling undoes
    it, so it only makes the plan of n_iter = 0 sum to 1.
    """
    if cost.dim() != 3 or not cost.is_floating_point():
        raise ValueError(f"sinkhorn: cost must be a float (P, n, k) tensor, got {cost.dtype} {tuple(cost.shape)}")
    n_problems, n, k = cost.shape
    if r.shape != (n_problems, n):
        raise ValueError(f"sinkhorn: r must be (P, n) = {(n_problems, n)}, got {tuple(r.shape)}")
    if c.shape != (n_problems, k):
        raise ValueError(f"sinkhorn: c must be (P, k) = {(n_problems, k)}, got {tuple(c.shape)}")
    if not 0 < lam <= max_sinkhorn_lambda(cost.dtype):
        raise ValueError(f"sinkhorn: lambda must lie in (0, {max_sinkhorn_lambda(cost.dtype):.1f}] for a "
                         f"{cost.dtype} cost in [0, 1] (exp(-lambda) would underflow), got {lam}")
    r, c = r.to(cost.dtype), c.to(cost.dtype)
    plan = torch.exp(-lam * cost)  # Eq. 11: entries in [exp(-lam), 1]
    plan = plan / plan.sum(dim=(1, 2), keepdim=True)  # the official code's P /= sum(P)
    for _ in range(n_iter):  # Eq. 12
        plan = plan * rearrange(r / plan.sum(dim=2), "p n -> p n 1")  # rows sum to r: Q 1_K = r
        plan = plan * rearrange(c / plan.sum(dim=1), "p k -> p 1 k")  # columns sum to c: Q^T 1_2N = c
    return plan, (plan * cost).sum(dim=(1, 2))  # Eq. 13


# --------------------------------------------------------------------------------------------------------------
# The steps of Sec. 3.3, one function per idea
# --------------------------------------------------------------------------------------------------------------
def cls_similarity(joint: Tensor, cls: Tensor) -> Tensor:
    """s (P, 2N): each joint token's cosine similarity to the CLS token in the same space (Sec. 3.3).

    joint (P, 2N, d) is L2-normalised. cls is (P, d), one CLS for all tokens, or (P, 2, d), each view's own CLS
    for that view's tokens (the official code: each view's attention map, joined).
    """
    cls = F.normalize(cls.to(joint.dtype), dim=-1)
    if cls.dim() == 2:
        return torch.einsum("pnd,pd->pn", joint, cls)
    per_view = rearrange(joint, "p (v n) d -> p v n d", v=2)
    return rearrange(torch.einsum("pvnd,pvd->pvn", per_view, cls), "p v n -> p (v n)")


def token_marginal(similarity: Tensor, temperature: float) -> Tensor:
    """r (P, 2N) = softmax(s / temperature) over the 2N joint tokens (Sec. 3.3; the temperature, 2.0, comes from
    the official code). s = 0 gives the uniform marginal."""
    return torch.softmax(similarity / temperature, dim=-1)


def sample_seeds(r: Tensor, k: int, generator: Optional[torch.Generator] = None) -> Tensor:
    """(P, k) distinct token indices drawn without replacement with probabilities r (P, 2N) (Eq. 8's Y).

    Exponential race: the k largest r_i / E_i with E_i ~ Exp(1), which is torch.multinomial's own algorithm
    without replacement, minus its host-side check of r (a synchronisation on a GPU).
    """
    race = torch.empty_like(r).exponential_(generator=generator)
    return (r / race).topk(k, dim=-1).indices


def seed_matrix(seeds: Tensor, n: int, dtype: torch.dtype) -> Tensor:
    """Y (P, n, K): column one-hot vectors marking the seed tokens (Eq. 8)."""
    n_problems, k = seeds.shape
    y = torch.zeros(n_problems, n, k, dtype=dtype, device=seeds.device)
    return y.scatter_(1, rearrange(seeds, "p k -> p 1 k"), 1.0)


def centroid_marginal(y: Tensor, similarity: Tensor, temperature: float) -> Tensor:
    """c (P, K) = softmax(Y^T s / temperature) (Eq. 10), s the tokens' raw CLS similarities (P, 2N).

    Eq. 10 writes softmax(Y^T r). Read literally on r, a distribution over the 2N joint tokens whose entries are
    all about 1 / 2N, that softmax is uniform to four decimals and the marginal does nothing, against its stated
    purpose (scale the importance of the centroids). The official code (`compute_c_marginals`) applies it to the
    raw similarities s, as here: max/min about 1.3 at initialisation, up to e for a trained network. After a
    merge Y's columns are averages of seed columns, so Y^T s is the mean similarity of a cluster's seeds.
    """
    return torch.softmax(torch.einsum("pnk,pn->pk", y, similarity) / temperature, dim=-1)


def transport_cost_matrix(joint: Tensor, centroids: Tensor, positions: Tensor, centroid_positions: Tensor,
                          lambda_pos: float) -> Tensor:
    """T (P, 2N, K) = T_sem + lambda_pos T_pos (Eq. 9, 17, 18), min-max normalised to [0, 1] per problem.

    The normalisation (official code) fixes the scale on which the Sinkhorn lambda acts. The official code
    normalises over the whole batch at once, which couples the images of a batch; here each problem is
    normalised on its own.
    """
    eps = torch.finfo(joint.dtype).eps  # spans below eps are rounding noise: leave them unamplified
    t_sem = -torch.einsum("pnd,pkd->pnk", joint, F.normalize(centroids, dim=-1))  # Eq. 9: T_sem = -Z_cat C^T
    # Euclidean distances, computed directly: cdist's default matrix-product path loses pixels
    distance = torch.cdist(positions, centroid_positions, compute_mode="donot_use_mm_for_euclid_dist")
    t_pos = distance / distance.amax(dim=(1, 2), keepdim=True).clamp_min(eps)  # Eq. 17: / S, its max
    total = t_sem + lambda_pos * t_pos  # Eq. 18
    low, high = total.amin(dim=(1, 2), keepdim=True), total.amax(dim=(1, 2), keepdim=True)
    return (total - low) / (high - low).clamp_min(eps)


def update_centroids(joint: Tensor, plan: Tensor) -> Tensor:
    """C (P, K, d): C^T = Z^T Q* with Q* column-normalised, i.e. each centroid is its tokens' mean (Eq. 14 text)."""
    mass = plan.sum(dim=1).clamp_min(torch.finfo(plan.dtype).tiny)  # (P, K) column sums
    return torch.einsum("pnk,pnd->pkd", plan, joint) / mass[..., None]


def merge_closest(centroids: Tensor, y: Tensor):
    """Eq. 14: merge the two centroids with the highest cosine similarity, per problem.

    centroids C (P, K, d), Y (P, 2N, K) -> (P, K - 1, d), (P, 2N, K - 1): the pair i < j's rows of C and
    columns of Y are averaged into i, and the obsolete row and column j are removed. The official code instead
    picks the pair by the dot product of the unnormalised means and sums the pair's plan columns (see the module
    docstring).
    """
    (_, k, d), n = centroids.shape, y.shape[1]
    unit = F.normalize(centroids, dim=-1)
    similarity = torch.einsum("pkd,pld->pkl", unit, unit)  # (P, K, K) cosine
    not_a_pair = torch.ones(k, k, dtype=torch.bool, device=centroids.device).tril()  # keep i < j only
    pair = similarity.masked_fill(not_a_pair, float("-inf")).flatten(1).argmax(dim=1)  # (P,); ties: the first
    i, j = torch.div(pair, k, rounding_mode="floor"), pair % k  # (P,) each, i < j
    row_i, row_j = repeat(i, "p -> p 1 d", d=d), repeat(j, "p -> p 1 d", d=d)
    col_i, col_j = repeat(i, "p -> p n 1", n=n), repeat(j, "p -> p n 1", n=n)
    mean_c = (centroids.gather(1, row_i) + centroids.gather(1, row_j)) / 2  # (P, 1, d)
    mean_y = (y.gather(2, col_i) + y.gather(2, col_j)) / 2  # (P, 2N, 1)
    centroids, y = centroids.scatter(1, row_i, mean_c), y.scatter(2, col_i, mean_y)  # into row / column i
    new = torch.arange(k - 1, device=centroids.device)
    kept = new + (new >= j[:, None])  # (P, K - 1): the old index of each new row / column, j skipped
    return (centroids.gather(1, repeat(kept, "p m -> p m d", d=d)),
            y.gather(2, repeat(kept, "p m -> p n m", n=n)))


def step_labels(labels: Tensor, y: Tensor, seeds: Tensor) -> Tensor:
    """(P, 2N) long: each token's cluster at one merge step, named for pictures.

    labels (P, 2N): the step's row argmax of the plan (Eq. 15), an index into its K columns. A cluster is named
    by the first of the k_start initial seeds it holds (seeds (P, k_start), Y (P, 2N, K)): a merge averages
    columns i < j into i (Eq. 14), so the merged cluster keeps i's name and a name follows its cluster from
    K_start down to 2. Names lie in [0, k_start) and are distinct while the seed tokens are.
    """
    members = torch.gather(y, 1, rearrange(seeds, "p s -> p s 1").expand(-1, -1, y.shape[-1])) > 0  # (P, s, K)
    names = members.to(y.dtype).argmax(dim=1)  # (P, K): argmax returns the first maximum
    return torch.gather(names, 1, labels)


class _Selection(NamedTuple):
    plan: Tensor  # (P, 2N, k_max) best plan so far, zero-padded beyond its K
    d_c: Tensor  # (P,) its transport cost
    k: Tensor  # (P,) long, its K


def select_k(best: _Selection, plan: Tensor, d_c: Tensor) -> _Selection:
    """A-posteriori K (Sec. 3.3): keep, per problem, the plan with the smallest d_c seen so far.

    plan (P, 2N, K) and d_c (P,) of one step. Called for K = k_max, ..., 2 only; ties keep the larger K (the
    first seen).
    """
    k, k_max = plan.shape[-1], best.plan.shape[-1]
    better = d_c < best.d_c  # (P,)
    padded = F.pad(plan, (0, k_max - k))  # (P, 2N, k_max)
    return _Selection(plan=torch.where(rearrange(better, "p -> p 1 1"), padded, best.plan),
                      d_c=torch.where(better, d_c, best.d_c), k=torch.where(better, k, best.k))


def hard_assignment(plan: Tensor, k: Tensor) -> Tensor:
    """M (P, 2N, k_max): one-hot of each token's largest plan entry among the first k[p] columns (Eq. 15).

    The paper normalises rows first, which does not move a row's argmax. The official code normalises each
    view's columns instead, which moves some tokens (`python bench.py --differences` prints the share).
    """
    columns = torch.arange(plan.shape[-1], device=plan.device)
    padding = columns >= rearrange(k, "p -> p 1 1")  # (P, 1, k_max)
    best = plan.masked_fill(padding, float("-inf")).argmax(dim=-1)  # (P, 2N)
    return (rearrange(best, "p n -> p n 1") == columns).to(plan.dtype)


def prune_single_view(assignment: Tensor):
    """Eq. 16: drop clusters with no token in one of the views -> (assignment with those columns zeroed, valid).

    assignment (P, 2N, K) is view 1's tokens then view 2's; valid (P, K) bool. Dropped columns are zeroed, not
    removed, so that every problem keeps the same shape; `valid` marks the kept ones.
    """
    view1, view2 = rearrange(assignment, "p (v n) k -> v p n k", v=2)
    valid = (view1.sum(dim=1) > 0) & (view2.sum(dim=1) > 0)  # (P, K)
    return assignment * rearrange(valid, "p k -> p 1 k").to(assignment.dtype), valid


def soft_assignment(plan: Tensor, valid: Tensor) -> Tensor:
    """Q* (P, 2N, k_max): the selected plan with each row normalised over its K columns, then the pruned columns
    (the set S of Sec. 3.3.1) set to zero (end of Sec. 3.3 and Eq. 16). Columns beyond K are zero already.

    Its rows sum to at most 1, and its row argmax is M wherever M keeps the token. The official code pools with
    Q* * M instead, each view's columns normalised (a difference listed in the README).
    """
    rows = plan / plan.sum(dim=-1, keepdim=True).clamp_min(torch.finfo(plan.dtype).tiny)
    return rows * rearrange(valid, "p k -> p 1 k").to(plan.dtype)


def centroids(tokens: Tensor, q_star: Tensor) -> Tensor:
    """(P, K, d): C^T = Z^T Q* (Eq. 1-2), each cluster's tokens weighted by their assignment; the caller
    normalises (the scale does not survive the L2 normalisation before the head).

    tokens (P, n, d), q_star (P, n, K): pass one view's rows of both (Q*_1 or Q*_2) for that view's centroids.
    """
    if tokens.dim() != 3 or q_star.dim() != 3 or tokens.shape[:2] != q_star.shape[:2]:
        raise ValueError(f"centroids: tokens (P, n, d) and Q* (P, n, K) must agree on P and n, got "
                         f"{tuple(tokens.shape)} and {tuple(q_star.shape)}")
    return torch.einsum("pnk,pnd->pkd", q_star.to(tokens.dtype), tokens)


# --------------------------------------------------------------------------------------------------------------
# The whole of Sec. 3.3
# --------------------------------------------------------------------------------------------------------------
def _check_inputs(tokens, positions, cls, k_start, k_max, seeds, marginal_temp, sinkhorn_lambda):
    if tokens.dim() != 3 or not tokens.is_floating_point():
        raise ValueError(f"cluster: tokens must be a float (P, 2N, d) tensor, got {tokens.dtype} "
                         f"{tuple(tokens.shape)}")
    n_problems, n, dim = tokens.shape
    if n % 2:
        raise ValueError(f"cluster: tokens must hold view 1's then view 2's tokens (2N rows), got {n} rows")
    if positions.shape != (n_problems, n, 2):
        raise ValueError(f"cluster: positions must be (P, 2N, 2) = {(n_problems, n, 2)}, "
                         f"got {tuple(positions.shape)}")
    if cls is not None and cls.shape not in ((n_problems, dim), (n_problems, 2, dim)):
        raise ValueError(f"cluster: cls must be (P, d) = {(n_problems, dim)} or (P, 2, d) (one per view), "
                         f"got {tuple(cls.shape)}")
    if not 2 <= k_start <= n:
        raise ValueError(f"cluster: k_start must lie in [2, 2N] = [2, {n}], got {k_start}")
    if not 2 <= k_max <= k_start:
        raise ValueError(f"cluster: k_max must lie in [2, k_start] = [2, {k_start}], got {k_max}")
    if marginal_temp <= 0:
        raise ValueError(f"cluster: marginal_temp must be positive, got {marginal_temp}")
    if not 0 < sinkhorn_lambda <= max_sinkhorn_lambda(torch.float32):
        raise ValueError(f"cluster: sinkhorn_lambda must lie in (0, {max_sinkhorn_lambda(torch.float32):.1f}] "
                         f"(exp(-lambda) underflows float32 beyond), got {sinkhorn_lambda}")
    if seeds is not None:
        if seeds.shape != (n_problems, k_start) or seeds.is_floating_point() or seeds.dtype == torch.bool:
            raise ValueError(f"cluster: seeds must be integer token indices (P, k_start) = {(n_problems, k_start)}, "
                             f"got {seeds.dtype} {tuple(seeds.shape)}")
        # Range check on CPU only: on a GPU it would synchronise (scatter then fails with a device assert). Not
        # while torch.compile traces either: a value read on the host would break the graph.
        if (seeds.device.type == "cpu" and not torch.compiler.is_compiling()
                and bool(((seeds < 0) | (seeds >= n)).any())):
            raise ValueError(f"cluster: seeds must be token indices in [0, 2N) = [0, {n})")


@torch.no_grad()
def cluster(tokens: Tensor, positions: Tensor, cls: Optional[Tensor] = None, *, k_start: int = 12,
            k_max: Optional[int] = None, lambda_pos: float = 4.0, sinkhorn_lambda: float = 20.0,
            sinkhorn_iterations: int = 5, marginal_temp: float = 2.0, uniform_marginals: bool = False,
            seeds: Optional[Tensor] = None, generator: Optional[torch.Generator] = None,
            return_steps: bool = False) -> ClusterResult:
    """Cluster the joint tokens of P problems at once (Sec. 3.3).

    tokens (P, 2N, d): view 1's tokens then view 2's (Z_cat, Eq. 8); positions (P, 2N, 2): their (x, y) in the
    original image (E_cat, Sec. 3.3.2); cls (P, d), or (P, 2, d) with each view's own: the CLS token in the same
    space, for the marginals r and c (uniform when None or `uniform_marginals`). seeds (P, k_start): token
    indices of the initial centroids, otherwise drawn from r with `generator`. k_max (default k_start, as in the
    paper; the official code's defaults are K_start 5 and K_max 4): the largest K the selection may pick.
    return_steps: also return every step's hard assignment (`ClusterResult.steps`, Fig. 3); it adds work, no
    sync. Computed in at least float32, without gradients. torch.compile(cluster, fullgraph=True) traces it whole
    (no graph break, no host sync) given seeds, or with generator None (torch's default generator); a
    torch.Generator argument is not traceable (bench.py --compile passes seeds).
    """
    k_max = k_start if k_max is None else k_max
    _check_inputs(tokens, positions, cls, k_start, k_max, seeds, marginal_temp, sinkhorn_lambda)
    n_problems, n, _ = tokens.shape
    dtype = torch.promote_types(tokens.dtype, torch.float32)  # fp16 is too coarse for pixel positions and costs
    with torch.autocast(tokens.device.type, enabled=False):  # ... also inside the training step's autocast
        joint = F.normalize(tokens.to(dtype), dim=-1)  # (P, 2N, d) Z_cat, L2-normalised
        positions = positions.to(dtype)  # (P, 2N, 2) E_cat
        if cls is None or uniform_marginals:
            s = joint.new_zeros(n_problems, n)  # r and c uniform
        else:
            s = cls_similarity(joint, cls)  # (P, 2N)
        r = token_marginal(s, marginal_temp)  # (P, 2N)
        if seeds is None:
            seeds = sample_seeds(r, k_start, generator)  # (P, k_start)
        y = seed_matrix(seeds, n, dtype)  # (P, 2N, K) Y
        cents = torch.einsum("pnk,pnd->pkd", y, joint)  # (P, K, d) Eq. 8: C = Y^T Z_cat

        best = _Selection(plan=joint.new_zeros(n_problems, n, k_max), d_c=joint.new_full((n_problems,), torch.inf),
                          k=torch.full((n_problems,), k_max, dtype=torch.long, device=tokens.device))
        d_cs, steps = [], []
        for k in range(k_start, 1, -1):
            cent_positions = torch.einsum("pnk,pnc->pkc", y, positions)  # (P, K, 2) E_cen = Y^T E_cat (Sec. 3.3.2)
            c = centroid_marginal(y, s, marginal_temp)  # (P, K) Eq. 10
            cost = transport_cost_matrix(joint, cents, positions, cent_positions, lambda_pos)  # T: Eq. 9, 17, 18
            plan, d_c = sinkhorn(cost, r, c, sinkhorn_lambda, sinkhorn_iterations)  # Eq. 11-13
            d_cs.append(d_c)
            if return_steps:
                steps.append(step_labels(plan.argmax(dim=-1), y, seeds))
            if k <= k_max:
                best = select_k(best, plan, d_c)
            if k > 2:
                cents = update_centroids(joint, plan)  # C^T = Z^T Q*
                cents, y = merge_closest(cents, y)  # Eq. 14

        assignment = hard_assignment(best.plan, best.k)  # Eq. 15
        assignment, valid = prune_single_view(assignment)  # Eq. 16
        q_star = soft_assignment(best.plan, valid)  # Q*: rows normalised, pruned (end of Sec. 3.3, Eq. 16)
        steps = torch.stack(steps, dim=1) if return_steps else joint.new_empty(n_problems, 0, n, dtype=torch.long)
    return ClusterResult(plan=best.plan.to(tokens.dtype), q_star=q_star.to(tokens.dtype),
                         assignment=assignment.to(tokens.dtype), valid=valid, k=best.k, d_c=torch.stack(d_cs, dim=1),
                         steps=steps)


# --------------------------------------------------------------------------------------------------------------
# Join and split around `cluster` (Sec. 3.1, 3.3.3): what training and the pictures call
# --------------------------------------------------------------------------------------------------------------
CLUSTER_SETTINGS = ("k_start", "k_max", "lambda_pos", "sinkhorn_lambda", "sinkhorn_iterations", "marginal_temp",
                    "uniform_marginals")


@torch.no_grad()
def cluster_views(tokens: Tensor, positions: Tensor, settings, generator: Optional[torch.Generator] = None,
                  return_steps: bool = False):
    """Join the two views' tokens, cluster every (image, head) problem in one call, split the result view-wise.

    tokens (2B, H, 1 + N, d): the teacher's last-block q/k/v (Eq. 21), view 1's B images then view 2's, CLS at
    index 0; positions (B, 2, N, 2): patch positions in the original image (Sec. 3.3.2); settings: any object
    with the attributes CLUSTER_SETTINGS (train.py's args, a checkpoint's args). Returns Q* split view-wise
    (2, B, N, H * K) with the heads' clusters side by side (Sec. 3.3.3), the kept-centroid mask (B, H * K)
    (Eq. 16), and the ClusterResult (every merge step's labels with return_steps, for the pictures).
    """
    heads = tokens.shape[1]
    tokens = tokens.float()  # clustering in fp32 whatever the autocast: exp(-lambda * cost) needs the range
    joint = rearrange(tokens[:, :, 1:], "(v b) h n d -> (b h) (v n) d", v=2)  # join: Z_cat per problem (P, 2N, d)
    cls = rearrange(tokens[:, :, 0], "(v b) h d -> (b h) v d", v=2)  # each view's CLS, for r and c (P, 2, d)
    pos = repeat(positions.float(), "b v n c -> (b h) (v n) c", h=heads)  # E_cat (P, 2N, 2)
    res = cluster(joint, pos, cls, generator=generator, return_steps=return_steps,
                  **{name: getattr(settings, name) for name in CLUSTER_SETTINGS})  # locate (Sec. 3.3)
    q_star = rearrange(res.q_star, "(b h) (v n) k -> v b n (h k)", h=heads, v=2)  # split: Q*_1, Q*_2
    valid = rearrange(res.valid, "(b h) k -> b (h k)", h=heads)
    return q_star, valid, res
