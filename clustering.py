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
    takes it after normalising each view's columns, which can move a few tokens (`hard_assignment`);
  - seeds are drawn by an exponential race instead of torch.multinomial, which checks r on the host
    (`sample_seeds`); the distribution is the same.
Kept from the official code although the paper's equations say otherwise: the temperature 2.0 in the marginals
(Eq. 10 has none) and d_c measured on the normalised total cost (Eq. 13 writes T_sem).
"""
import math
from typing import NamedTuple, Optional

import torch
import torch.nn.functional as F
from einops import rearrange
from torch import Tensor


class ClusterResult(NamedTuple):
    assignment: Tensor  # (P, 2N, k_max) hard 0/1 (Eq. 15); pruned columns (Eq. 16) and columns >= k are zero
    valid: Tensor  # (P, k_max) bool: the cluster has a token in both views (Eq. 16)
    k: Tensor  # (P,) long: the selected number of clusters, before pruning
    cost: Tensor  # (P, k_start - 1) d_c (Eq. 13) for K = k_start, k_start - 1, ..., 2
    steps: Tensor  # (P, k_start - 1, 2N) long with return_steps (`step_labels` per K), else (P, 0, 2N)


# --------------------------------------------------------------------------------------------------------------
# Optimal transport (Eq. 11-13)
# --------------------------------------------------------------------------------------------------------------
def sinkhorn(cost: Tensor, r: Tensor, c: Tensor, lam: float = 20.0, n_iter: int = 5,
             cost_range: Optional[float] = None):
    """Sinkhorn-Knopp (Eq. 11-12): plan (P, n, k) and transport cost d_c = <plan, cost> (P,) (Eq. 13).

    P = exp(-lam * cost) normalised to mass 1, then `n_iter` rounds of scaling rows to r (P, n) and columns to
    c (P, k). Converges to the entropic OT plan for regularisation 1 / lam.

    cost_range: the caller's guarantee that every entry of cost lies in [0, cost_range] (`cluster` passes 1: its
    cost is min-max normalised). When lam * cost_range is small enough that exp(-lam * cost) and its square stay
    normal floats (lam 20 on [0, 1] spans e^-20), the rounds run as the textbook scaling u = r / (K v),
    v = c / (K^T u): two batched matrix-vector products and two divisions per round. Otherwise (no guarantee,
    or a wider span) they run in the log domain, as potentials f, g with plan = exp(f_i + g_j - lam * cost_ij):
    the same numbers, finite however far lam * cost spans (exp(-lam * cost) would zero whole rows), at about
    twice the operator calls.
    """
    if cost.dim() != 3 or not cost.is_floating_point():
        raise ValueError(f"sinkhorn: cost must be a float (P, n, k) tensor, got {cost.dtype} {tuple(cost.shape)}")
    n_problems, n, k = cost.shape
    if r.shape != (n_problems, n):
        raise ValueError(f"sinkhorn: r must be (P, n) = {(n_problems, n)}, got {tuple(r.shape)}")
    if c.shape != (n_problems, k):
        raise ValueError(f"sinkhorn: c must be (P, k) = {(n_problems, k)}, got {tuple(c.shape)}")
    tiny = torch.finfo(cost.dtype).tiny
    r, c = r.to(cost.dtype), c.to(cost.dtype)
    if n_iter == 0:
        log_kernel = -lam * cost
        plan = (log_kernel - torch.logsumexp(log_kernel, dim=(1, 2), keepdim=True)).exp()  # P /= sum(P)
        return plan, (plan * cost).sum(dim=(1, 2))
    # P /= sum(P) is absorbed by the first row scaling, which is blind to a global factor.
    if cost_range is not None and lam * cost_range < -0.5 * math.log(tiny):
        kernel = torch.exp(-lam * cost)  # entries in [exp(-lam * cost_range), 1]: no underflow
        u = r / kernel.sum(dim=2)  # rows sum to r (the first round's v is all ones)
        v = c / torch.einsum("pnk,pn->pk", kernel, u)  # columns sum to c
        for _ in range(n_iter - 1):
            u = r / torch.einsum("pnk,pk->pn", kernel, v)
            v = c / torch.einsum("pnk,pn->pk", kernel, u)
        plan = kernel * rearrange(u, "p n -> p n 1") * rearrange(v, "p k -> p 1 k")
        return plan, (plan * cost).sum(dim=(1, 2))  # Eq. 13
    log_r = r.clamp_min(tiny).log()  # (P, n); a zero marginal entry would give -inf - (-inf) = NaN
    log_c = c.clamp_min(tiny).log()  # (P, k)
    log_kernel = -lam * cost  # (P, n, k)
    # The column step reduces over the last axis of a transposed copy: over the middle axis is ~3x slower on CPU.
    log_kernel_t = rearrange(log_kernel, "p n k -> p k n").contiguous()
    g = torch.zeros_like(log_c)
    for _ in range(n_iter):
        f = log_r - torch.logsumexp(log_kernel + rearrange(g, "p k -> p 1 k"), dim=2)  # rows sum to r
        g = log_c - torch.logsumexp(log_kernel_t + rearrange(f, "p n -> p 1 n"), dim=2)  # columns sum to c
    plan = (log_kernel + rearrange(f, "p n -> p n 1") + rearrange(g, "p k -> p 1 k")).exp()
    return plan, (plan * cost).sum(dim=(1, 2))  # Eq. 13


# --------------------------------------------------------------------------------------------------------------
# The steps of Sec. 3.3, one function per idea
# --------------------------------------------------------------------------------------------------------------
def token_marginal(joint: Tensor, cls: Optional[Tensor], temperature: float, uniform: bool) -> Tensor:
    """r (P, 2N): softmax over the joint tokens of their cosine similarity to the CLS token (Sec. 3.3).

    cls is (P, d), one CLS for all tokens, or (P, 2, d), each view's own CLS for that view's tokens (what the
    official code does: each view's attention map, then one softmax over the 2N joint tokens).
    """
    n_problems, n, _ = joint.shape
    if cls is None or uniform:
        return joint.new_full((n_problems, n), 1.0 / n)
    cls = F.normalize(cls.to(joint.dtype), dim=-1)
    if cls.dim() == 2:
        similarity = torch.einsum("pnd,pd->pn", joint, cls)
    else:
        per_view = rearrange(joint, "p (v n) d -> p v n d", v=2)
        similarity = rearrange(torch.einsum("pvnd,pvd->pvn", per_view, cls), "p v n -> p (v n)")
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


def centroid_marginal(seed_mass: Tensor, temperature: float, uniform: bool) -> Tensor:
    """c (P, K) = softmax(Y^T r / temperature) from seed_mass = Y^T r (P, K) (Eq. 10; the temperature comes from
    the official code)."""
    if uniform:
        return torch.full_like(seed_mass, 1.0 / seed_mass.shape[1])
    return torch.softmax(seed_mass / temperature, dim=-1)


def unit_rows(x: Tensor) -> Tensor:
    """F.normalize(x, dim=-1) in three operator calls instead of four (it runs twice per merge step)."""
    return x / torch.linalg.vector_norm(x, dim=-1, keepdim=True).clamp_min(1e-12)


def transport_cost_matrix(joint: Tensor, centroids: Tensor, positions: Tensor, centroid_positions: Tensor,
                          lambda_pos: float) -> Tensor:
    """T (P, 2N, K) = T_sem + lambda_pos T_pos (Eq. 9, 17, 18), min-max normalised to [0, 1] per problem.

    The normalisation fixes the scale on which the Sinkhorn lambda acts. The official code normalises over the
    whole batch at once, which couples the images of a batch; here each problem is normalised on its own.
    """
    eps = torch.finfo(joint.dtype).eps  # spans below eps are rounding noise: leave them unamplified
    unit = unit_rows(centroids)
    # Euclidean distances (P, 2N, K), computed directly: cdist's default matrix-product path loses pixels
    distance = torch.cdist(positions, centroid_positions, compute_mode="donot_use_mm_for_euclid_dist")
    scale = lambda_pos / distance.amax(dim=(1, 2), keepdim=True).clamp_min(eps)  # Eq. 17: S = max
    # Eq. 18 with Eq. 9 in one batched product: T = lambda_pos T_pos - Z_cat C^T
    total = torch.baddbmm(distance * scale, joint, unit.transpose(1, 2), alpha=-1.0)
    low, high = torch.aminmax(total.flatten(1), dim=1, keepdim=True)  # (P, 1) each
    return (total - low[..., None]) / (high - low).clamp_min(eps)[..., None]


def update_centroids(joint: Tensor, plan: Tensor) -> Tensor:
    """C (P, K, d): C^T = Z^T Q* with Q* column-normalised, i.e. each centroid is its tokens' mean (Eq. 14 text)."""
    mass = plan.sum(dim=1).clamp_min(torch.finfo(plan.dtype).tiny)  # (P, K) column sums
    return torch.einsum("pnk,pnd->pkd", plan, joint) / mass[..., None]


def merge_matrix(i: Tensor, j: Tensor, k: int, dtype: torch.dtype) -> Tensor:
    """(P, K - 1, K): the linear map of a merge (Eq. 14), for pairs i < j (each (P,)).

    Row i averages old rows i and j; every other new row copies one old row, in order, skipping j. Left-multiply
    C (P, K, d) by it, right-multiply Y (P, 2N, K) by its transpose: one batched product each, no gather/scatter.
    """
    new, old = torch.arange(k - 1, device=i.device), torch.arange(k, device=i.device)
    source = new + (new >= j[:, None])  # (P, K - 1): the old row each new row copies
    copy = (source[:, :, None] == old).to(dtype)  # (P, K - 1, K) one-hot
    pair = ((old == i[:, None]) | (old == j[:, None])).to(dtype) / 2  # (P, K): (e_i + e_j) / 2
    return torch.where((new == i[:, None])[:, :, None], pair[:, None, :], copy)


class MergeMaps(NamedTuple):
    matrices: Tensor  # (k * k, k - 1, k) `merge_matrix` of every pair at the flat index i * k + j (i < j)
    lower: Tensor  # (k, k) bool, True on and below the diagonal: the entries that are not a pair i < j


def merge_maps(k: int, dtype: torch.dtype, device: torch.device) -> MergeMaps:
    """Every merge map for up to k centroids, built once per `cluster` call (entries with i >= j are unused).

    The map of a pair i < j at a smaller K is the top-left (K - 1, K) block of this one (rows before j copy the
    same rows, rows after it the next ones), so one table serves every step.
    """
    pairs = torch.arange(k * k, device=device)
    matrices = merge_matrix(torch.div(pairs, k, rounding_mode="floor"), pairs % k, k, dtype)
    return MergeMaps(matrices, torch.ones(k, k, dtype=torch.bool, device=device).tril())


def merge_closest(centroids: Tensor, seeds: Tensor, maps: Optional[MergeMaps] = None):
    """Eq. 14: merge the two centroids with the highest cosine similarity, per problem.

    centroids (P, K, d), seeds Y (P, 2N, K) -> (P, K - 1, d), (P, 2N, K - 1): the pair's C rows and Y columns
    are averaged, the obsolete ones removed. maps: `merge_maps(k0, ...)` for some k0 >= K (built here when
    None). The official code instead picks the pair by the dot product of the unnormalised means and sums the
    pair's plan columns (see the module docstring).
    """
    k = centroids.shape[1]
    maps = merge_maps(k, centroids.dtype, centroids.device) if maps is None else maps
    k0 = maps.lower.shape[0]
    unit = unit_rows(centroids)
    similarity = torch.einsum("pkd,pld->pkl", unit, unit).masked_fill(maps.lower[:k, :k], float("-inf"))  # cosine
    similarity = F.pad(similarity, (0, k0 - k, 0, k0 - k), value=float("-inf"))  # (P, k0, k0): flat index i k0 + j
    pair = similarity.flatten(1).argmax(dim=1)  # (P,); ties: the first
    mix = maps.matrices[pair, :k - 1, :k]  # (P, K - 1, K)
    return torch.einsum("pmk,pkd->pmd", mix, centroids), torch.einsum("pnk,pmk->pnm", seeds, mix)


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
    cost: Tensor  # (P,) its d_c
    k: Tensor  # (P,) long, its K


def select_k(best: _Selection, plan: Tensor, cost: Tensor) -> _Selection:
    """A-posteriori K (Sec. 3.3): keep, per problem, the plan with the smallest d_c seen so far.

    Called for K = k_max, ..., 2 only; ties keep the larger K (the first seen). (Keeping every step's row argmax
    instead and choosing at the end is fewer operator calls but slower: an argmax over K <= 12 columns is a
    slow reduction on CPU.)
    """
    k, k_max = plan.shape[-1], best.plan.shape[-1]
    better = cost < best.cost  # (P,)
    padded = plan if k == k_max else F.pad(plan, (0, k_max - k))  # (P, 2N, k_max)
    return _Selection(plan=torch.where(rearrange(better, "p -> p 1 1"), padded, best.plan),
                      cost=torch.where(better, cost, best.cost), k=torch.where(better, k, best.k))


def hard_assignment(plan: Tensor, k: Tensor) -> Tensor:
    """M (P, 2N, k_max): one-hot of each token's largest plan entry among the first k[p] columns (Eq. 15).

    The paper normalises rows first, which does not move a row's argmax. The official code normalises each
    view's columns instead, which can move a few tokens.
    """
    columns = torch.arange(plan.shape[-1], device=plan.device)
    padding = columns >= rearrange(k, "p -> p 1 1")  # (P, 1, k_max)
    best = plan.masked_fill(padding, float("-inf")).argmax(dim=-1)  # (P, 2N)
    return (rearrange(best, "p n -> p n 1") == columns).to(plan.dtype)


def prune_single_view(assignment: Tensor):
    """Eq. 16: drop clusters with no token in one of the views -> (assignment with those columns zeroed, valid).

    assignment (P, 2N, K) is view 1's tokens then view 2's; valid (P, K) bool.
    """
    view1, view2 = rearrange(assignment, "p (v n) k -> v p n k", v=2)
    valid = (view1.sum(dim=1) > 0) & (view2.sum(dim=1) > 0)  # (P, K)
    return assignment * rearrange(valid, "p k -> p 1 k").to(assignment.dtype), valid


def centroids(tokens: Tensor, assignment: Tensor) -> Tensor:
    """(P, K, d) = M^T Z, the sum of each cluster's tokens (Eq. 1-2); the caller normalises.

    tokens (P, n, d), assignment (P, n, K): pass one view's rows of both for per-view centroids.
    """
    if tokens.dim() != 3 or assignment.dim() != 3 or tokens.shape[:2] != assignment.shape[:2]:
        raise ValueError(f"centroids: tokens (P, n, d) and assignment (P, n, K) must agree on P and n, got "
                         f"{tuple(tokens.shape)} and {tuple(assignment.shape)}")
    return torch.einsum("pnk,pnd->pkd", assignment.to(tokens.dtype), tokens)


# --------------------------------------------------------------------------------------------------------------
# The whole of Sec. 3.3
# --------------------------------------------------------------------------------------------------------------
def _check_inputs(tokens, positions, cls, k_start, k_max, seeds, marginal_temp):
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
    if seeds is not None:
        if seeds.shape != (n_problems, k_start) or seeds.is_floating_point() or seeds.dtype == torch.bool:
            raise ValueError(f"cluster: seeds must be integer token indices (P, k_start) = {(n_problems, k_start)}, "
                             f"got {seeds.dtype} {tuple(seeds.shape)}")
        # Range check on CPU only: on a GPU it would synchronise (scatter then fails with a device assert).
        if seeds.device.type == "cpu" and bool(((seeds < 0) | (seeds >= n)).any()):
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
    space, for the token marginal r (uniform when None or `uniform_marginals`). seeds (P, k_start): token indices of the initial centroids,
    otherwise drawn from r with `generator`. k_max (default k_start): the largest K the selection may pick.
    return_steps: also return every step's hard assignment (`ClusterResult.steps`, Fig. 3); it adds work, no sync.
    Computed in at least float32 and without gradients.
    """
    k_max = k_start if k_max is None else k_max
    _check_inputs(tokens, positions, cls, k_start, k_max, seeds, marginal_temp)
    n_problems, n, _ = tokens.shape
    dtype = torch.promote_types(tokens.dtype, torch.float32)  # fp16 is too coarse for pixel positions and costs
    with torch.autocast(tokens.device.type, enabled=False):  # ... also inside the training step's autocast
        joint = F.normalize(tokens.to(dtype), dim=-1)  # (P, 2N, d) Z_cat, L2-normalised
        positions = positions.to(dtype)  # (P, 2N, 2) E_cat

        r = token_marginal(joint, cls, marginal_temp, uniform_marginals)  # (P, 2N)
        if seeds is None:
            seeds = sample_seeds(r, k_start, generator)  # (P, k_start)
        y = seed_matrix(seeds, n, dtype)  # (P, 2N, K) Y
        cents = torch.einsum("pnk,pnd->pkd", y, joint)  # (P, K, d) Eq. 8: C = Y^T Z_cat
        marks = torch.cat([positions, r[..., None]], dim=-1)  # (P, 2N, 3): what Y^T pools at every step
        maps = merge_maps(k_start, dtype, tokens.device)  # Eq. 14's maps, built once

        best = _Selection(plan=joint.new_zeros(n_problems, n, k_max), cost=joint.new_full((n_problems,), torch.inf),
                          k=torch.full((n_problems,), k_max, dtype=torch.long, device=tokens.device))
        costs, steps = [], []
        for k in range(k_start, 1, -1):
            pooled = torch.einsum("pnk,pnc->pkc", y, marks)  # (P, K, 3)
            cent_positions = pooled[..., :2]  # (P, K, 2) E_cen = Y^T E_cat (Sec. 3.3.2)
            c = centroid_marginal(pooled[..., 2], marginal_temp, uniform_marginals)  # (P, K) Eq. 10
            cost = transport_cost_matrix(joint, cents, positions, cent_positions, lambda_pos)  # Eq. 9, 17, 18
            plan, d_c = sinkhorn(cost, r, c, sinkhorn_lambda, sinkhorn_iterations, cost_range=1.0)  # Eq. 11-13
            costs.append(d_c)
            if return_steps:
                steps.append(step_labels(plan.argmax(dim=-1), y, seeds))
            if k <= k_max:
                best = select_k(best, plan, d_c)
            if k > 2:
                cents = update_centroids(joint, plan)  # C^T = Z^T Q*
                cents, y = merge_closest(cents, y, maps)  # Eq. 14

        assignment = hard_assignment(best.plan, best.k)  # Eq. 15
        assignment, valid = prune_single_view(assignment)  # Eq. 16
        steps = torch.stack(steps, dim=1) if return_steps else joint.new_empty(n_problems, 0, n, dtype=torch.long)
    return ClusterResult(assignment=assignment.to(tokens.dtype), valid=valid, k=best.k,
                         cost=torch.stack(costs, dim=1), steps=steps)
