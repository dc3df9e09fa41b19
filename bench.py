"""What CrOC costs on top of DINO: the full training step with and without the dense loss, at the paper's
ViT-S/16 224 and at repro.sh's synthetic recipe (vit_nano/8 48), with the FLOPs, the peak memory and the share
of the clustering; the clusterer alone against the official algorithm; with --compile, the clusterer eager
against torch.compile'd (and on a GPU the step's images/s with compiled backbones). BENCHMARKS.md holds the
numbers this printed.

    python bench.py                          # the full run (CPU: ~6 min on 2 cores; GPU: batch 128, bf16)
    python bench.py --quick                  # tiny shapes, one repeat, seconds: the same table (used by the test)
    python bench.py --json bench.json        # also write the results as JSON
    python bench.py --step_shapes recipe     # one step row only (paper or recipe; no name: the clusterer alone)
    python bench.py --compile --cluster_batches 8   # also the clusterer compiled (CPU: minutes of compilation)

Machines are noisy, so every figure is a median of --repeats runs, and the CrOC and DINO steps are interleaved
(DINO, CrOC, CrOC, DINO, ...) so that a load that comes and goes hits both: read the ratio, not the milliseconds.
The step is model.train_step (teacher and student forward, clustering, heads, loss) followed by
model.optimizer_step (backward, AdamW step, teacher EMA), as train.py runs them.
"""
import argparse
import inspect
import json
import math
import os
import platform
import statistics
import sys
import time
import traceback
import warnings
from contextlib import nullcontext

import torch
import torch.nn.functional as F
from einops import rearrange, repeat
from torch.nn.utils.rnn import pad_sequence
from torch.profiler import ProfilerActivity, profile, record_function
from torch.utils.flop_counter import FlopCounterMode
from tqdm import tqdm

import clustering
import data
from model import (CrOCLoss, PretrainConfig, bool_flag, build_student_teacher, build_vit, optimizer_step,
                   param_groups, train_step, view_centroids)

# The parts model.train_step and model.optimizer_step label with torch.profiler.record_function, in step order.
STEP_PARTS = ("teacher forward", "clustering", "teacher centroid head", "student forward", "loss", "backward",
              "AdamW", "teacher EMA")
PAPER_TABLE_A2 = "paper Table A2 (2 V100, batch 256): clustering 67 ms = 8% of an 841.5 ms step"
SYNC_EVENTS = ("cudaStreamSynchronize", "cudaDeviceSynchronize", "cudaEventSynchronize", "cudaMemcpy")
VIEW_OPS = {"aten::view", "aten::reshape", "aten::expand", "aten::expand_as", "aten::unsqueeze", "aten::squeeze",
            "aten::permute", "aten::transpose", "aten::t", "aten::select", "aten::slice", "aten::flatten",
            "aten::unflatten", "aten::unbind", "aten::as_strided", "aten::alias", "aten::contiguous", "aten::to",
            "aten::promote_types"}  # metadata only, or no-ops on an already contiguous / right-dtype tensor
LAUNCH_EVENTS = ("cudaLaunchKernel", "cudaLaunchKernelExC", "cuLaunchKernel", "cuLaunchKernelEx")
# The step rows (--step_shapes): (arch, patch, img) and the model.PretrainConfig fields that differ from the
# paper's. paper: ViT-S/16 224 with the paper's heads (Sec. 4.1; --batch, --out_dim, --out_dim_c). recipe:
# repro.sh's headline recipe, its train.py flags that change what a step computes (batch 32, DINO's BatchNorm
# head 512 wide with 256 outputs, no stochastic depth, clipping at 3, 48-px views of 64-px scenes).
RECIPE = {"batch_size_per_gpu": 32, "out_dim": 256, "out_dim_c": 256, "head_hidden_dim": 512, "use_bn_in_head": True,
          "drop_path_rate": 0.0, "clip_grad": 3.0, "freeze_last_layer": 0, "global_crops_scale": (0.5, 1.0),
          "synthetic_size": 64}
STEP_SHAPES = {"paper": (("vit_small", 16, 224), {}), "recipe": (("vit_nano", 8, 48), RECIPE)}
QUICK_STEP_SHAPES = {"paper": (("vit_tiny", 16, 64), {}),  # 2N = 32 tokens >= K_start
                     "recipe": (("vit_nano", 8, 32), {**RECIPE, "batch_size_per_gpu": 2})}


def get_args_parser():
    paper = PretrainConfig()
    p = argparse.ArgumentParser("CrOC benchmarks", formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--batch", default=None, type=int,
                   help="Images per step of the paper row (each gives two views). Default: 128 on a GPU (the paper's "
                        "per-GPU batch), 8 on CPU (a ViT-S/16 224 step then takes about 10 s on one core). The recipe "
                        "row keeps repro.sh's 32.")
    p.add_argument("--step_shapes", nargs="*", default=["paper", "recipe"], choices=sorted(STEP_SHAPES),
                   help="The training-step rows: paper (ViT-S/16 224, the paper's heads) and recipe (repro.sh: "
                        "vit_nano/8 48, batch 32, BatchNorm head 512 wide, 256 outputs). With no name: the clusterer "
                        "alone.")
    p.add_argument("--cluster_batches", nargs="+", default=[8, 32, 128], type=int,
                   help="Images B of the clusterer-alone rows; each is B x 6 heads problems at ViT-S/16 224 shapes.")
    p.add_argument("--out_dim", default=paper.out_dim, type=int,
                   help="Image head output L-bar of the paper row (paper 65,536).")
    p.add_argument("--out_dim_c", default=paper.out_dim_c, type=int,
                   help="Centroid head output L of the paper row (paper 8,192).")
    p.add_argument("--k_start", default=paper.k_start, type=int,
                   help="K_start of the clusterer (paper 12, official code 5).")
    p.add_argument("--k_max", default=None, type=int,
                   help="Largest K the selection may pick (default k_start, as train.py; official code 4). Each image "
                        "has heads x k_max centroid slots; the kept ones (Eq. 16) go through the centroid head.")
    p.add_argument("--repeats", default=5, type=int, help="Timed runs of each variant; the median is reported.")
    p.add_argument("--warmup", default=1, type=int, help="Untimed runs of each variant first.")
    p.add_argument("--precision", default="bf16", choices=["bf16", "fp16", "fp32"],
                   help="Autocast on a GPU (the throughput rows ask for bf16). CPU always runs fp32, as train.py.")
    p.add_argument("--compile", nargs="?", const=True, default=None, type=bool_flag,
                   help="Also time clustering.cluster torch.compile'd (inductor, fullgraph: one graph) against eager, "
                        "with its compile time, at every --cluster_batches; on a GPU also the step with compiled "
                        "backbones. Default: on with a GPU, off on CPU, where inductor takes minutes per batch size.")
    p.add_argument("--device", default=None, help="cpu or cuda (default: cuda when available).")
    p.add_argument("--threads", default=None, type=int,
                   help="torch CPU threads (default: torch's own choice). On a CPU shared with other jobs, 1 thread "
                        "gives steadier numbers than threads that wait on each other.")
    p.add_argument("--quick", action="store_true",
                   help="Tiny shapes (ViT-Ti/16 at 64 px with small heads, vit_nano/8 at 32 px with the recipe's head, "
                        "2N = 32 tokens, batch 2), one repeat, no warm-up: runs in seconds; the numbers mean nothing.")
    p.add_argument("--json", default=None, help="Also write the results to this JSON file.")
    p.add_argument("--seed", default=0, type=int, help="Seed of the synthetic inputs, weights and clusterer draws.")
    p.add_argument("--differences", action="store_true",
                   help="Instead of the benchmark, print the measured differences from the official clusterer "
                        "(selected K, kept centroids, hard-assignment rule) on an initial ViT's and on random tokens, "
                        "--batch images (default 16) at vit_small/16 224 and vit_nano/8 48; seconds on CPU.")
    g = p.add_argument_group("GPU check (gpu_check.sh runs these parts; see BENCHMARKS.md, 'GPU check')")
    g.add_argument("--gpu", nargs="+", default=None, choices=["syncs", "training", "compile", "ddp", "summary"],
                   help="Run these parts of the GPU check instead of the benchmark, writing PART.json to --out.")
    g.add_argument("--out", default="gpu_check_out", help="Folder of the GPU check's JSON files and summary.")
    g.add_argument("--dry", action="store_true",
                   help="The CPU skeleton of every part, in seconds (also the default when CUDA is absent).")
    g.add_argument("--steps", default=100, type=int, help="Timed training steps per run of the training part.")
    g.add_argument("--warmup_steps", default=10, type=int,
                   help="Untimed steps first (torch.compile compiles during them).")
    g.add_argument("--budget_s", default=200, type=float,
                   help="Seconds the training part may take; runs that no longer fit are skipped, the last one cut.")
    return p


def resolve_args(args):
    """Fill the device-dependent defaults and the --quick overrides (an explicit --batch, or smaller heads, win)."""
    if args.threads:
        torch.set_num_threads(args.threads)
    args.k_max = args.k_max or args.k_start
    args.device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    args.compile = args.device.type == "cuda" if args.compile is None else args.compile
    if args.device.type == "cpu":
        args.precision = "fp32"
    if args.quick:
        args.batch = args.batch or 2
        args.cluster_batches = [1, 2]
        args.repeats, args.warmup = 1, 0
        args.out_dim, args.out_dim_c = min(args.out_dim, 1024), min(args.out_dim_c, 256)
        args.step_configs = [QUICK_STEP_SHAPES[name] for name in args.step_shapes]
        args.cluster_shape = ("vit_tiny", 16, 64)  # (arch, patch, img): 2N = 32 tokens, 3 heads of d = 64
    else:
        args.batch = args.batch or (128 if args.device.type == "cuda" else 8)
        args.step_configs = [STEP_SHAPES[name] for name in args.step_shapes]
        args.cluster_shape = ("vit_small", 16, 224)  # 2N = 392 tokens, 6 heads of d = 64
    return args


# --------------------------------------------------------------------------------------------------------------
# Measuring
# --------------------------------------------------------------------------------------------------------------
def sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def time_interleaved(fns, repeats, warmup, device, desc):
    """{name: fn} -> {name: [seconds]}. Warm-up in the given order, then rounds whose order alternates
    (A B, B A, ...): a load that rises or falls during the run weighs on every variant alike."""
    for fn in fns.values():
        for _ in range(warmup):
            fn()
    sync(device)
    times = {name: [] for name in fns}
    names = list(fns)
    for i in tqdm(range(repeats), desc=desc, leave=False, file=sys.stderr):
        for name in names if i % 2 == 0 else names[::-1]:
            sync(device)
            start = time.perf_counter()
            fns[name]()
            sync(device)
            times[name].append(time.perf_counter() - start)
    return times


def median_ms(seconds):
    return 1e3 * statistics.median(seconds)


def peak_step_memory(bench, alpha, device):
    """MiB that one training step allocates at its peak above what was allocated when it started (models,
    optimizer state and inputs; the previous step's gradients are freed first): what a larger batch would need.
    Returns (that, the whole peak including models and optimizer state, or None where not known).

    CUDA: torch.cuda.max_memory_allocated - memory_allocated. CPU: the same quantity from torch.profiler's
    allocation records (a running sum of every allocation and free of torch's CPU allocator, in time order);
    the process RSS is no use here, since glibc keeps freed tensors resident and ru_maxrss never comes down.
    """
    bench.optimizer.zero_grad(set_to_none=True)
    if device.type == "cuda":
        sync(device)
        torch.cuda.reset_peak_memory_stats(device)
        start = torch.cuda.memory_allocated(device)
        bench.step(alpha)
        sync(device)
        peak = torch.cuda.max_memory_allocated(device)
        return (peak - start) / 2 ** 20, peak / 2 ** 20
    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        bench.step(alpha)
    try:  # the raw records: parsing them into prof.events() would attribute every record to an op, slowly
        events = prof.profiler.kineto_results.events()
    except AttributeError:  # a torch whose profiler internals moved: no figure rather than a wrong one
        return float("nan"), None
    records = sorted((e.start_ns(), e.nbytes()) for e in events
                     if e.name() == "[memory]" and e.device_type() == torch.autograd.DeviceType.CPU)
    live = peak = 0
    for _, nbytes in records:
        live += nbytes
        peak = max(peak, live)
    return peak / 2 ** 20, None


def count_ops(fn, device):
    """Operator calls of one call of fn, from torch.profiler.

    top_level_aten_ops: `aten::` events whose parent event is not an `aten::` event, i.e. the operators the
    Python code calls (an einsum counts once, not with the bmm and views it runs inside); top_level_view_ops:
    those of them in VIEW_OPS (no arithmetic: reshapes, expands, no-op casts); all_aten_ops: every `aten::`
    event, nested ones included. On CUDA also the kernel launches and the synchronising runtime calls
    (cuda*Synchronize, blocking cudaMemcpy) the profiler saw.
    """
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda" else [])
    with profile(activities=activities) as prof:
        with record_function("bench.call"):  # marks fn's own events: not the profiler's final synchronisation
            fn()
    marker = next(e.time_range for e in prof.events() if e.name == "bench.call")
    events = [e for e in prof.events()
              if marker.start <= e.time_range.start and e.time_range.end <= marker.end and e.name != "bench.call"]
    aten = [e for e in events if e.name.startswith("aten::")]
    top = [e for e in aten if e.cpu_parent is None or not e.cpu_parent.name.startswith("aten::")]
    out = {"top_level_aten_ops": len(top), "top_level_view_ops": sum(e.name in VIEW_OPS for e in top),
           "all_aten_ops": len(aten)}
    if device.type == "cuda":
        out["kernel_launches"] = sum(e.name in LAUNCH_EVENTS for e in events)
        out["sync_runtime_calls"] = sum(e.name in SYNC_EVENTS for e in events)
    return out


def count_syncs(fn, device):
    """Host-device synchronisations of one call of fn. CUDA: the warnings of torch.cuda.set_sync_debug_mode
    ('warn' reports every synchronising operation torch knows of). CPU: 0 by construction (no device to wait
    for); clustering.py also holds none of the calls that would synchronise on a GPU (test_croc checks it)."""
    return 0 if device.type != "cuda" else len(sync_warnings(fn, device))


def sync_warnings(fn, device):
    """The warnings torch.cuda.set_sync_debug_mode('warn') gives for one call of fn: one per synchronising
    operation torch knows of."""
    sync(device)
    previous = torch.cuda.get_sync_debug_mode()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        torch.cuda.set_sync_debug_mode("warn")
        try:
            fn()
        finally:
            torch.cuda.set_sync_debug_mode(previous)
    sync(device)
    return [w for w in caught if "synchroniz" in str(w.message).lower()]


# --------------------------------------------------------------------------------------------------------------
# The training step, CrOC (alpha 1) and DINO (alpha 0) on the same models
# --------------------------------------------------------------------------------------------------------------
class StepBench:
    """Student, teacher, loss, optimizer and synthetic inputs for one backbone, built as train.py builds them,
    with the paper's settings (model.PretrainConfig) but for `settings` (its fields, and synthetic_size: the scenes'
    size, default img).
    One set of models serves both variants: DINO leaves the centroid last layer without a gradient, which AdamW
    skips, exactly as in a `--alpha 0` run."""

    def __init__(self, arch, patch, img, bench_args, settings=None):
        settings = dict(settings or {})
        scene_size = settings.pop("synthetic_size", img)
        fields = dict(arch=arch, patch_size=patch, img_size=img, out_dim=bench_args.out_dim,
                      out_dim_c=bench_args.out_dim_c, batch_size_per_gpu=bench_args.batch,
                      precision=bench_args.precision, k_start=bench_args.k_start, k_max=bench_args.k_max)
        a = PretrainConfig(**{**fields, **settings})
        self.config, self.device = a, bench_args.device
        self.epoch = a.freeze_last_layer  # a step after the first epoch: every layer, the last ones too, learns
        torch.manual_seed(bench_args.seed)
        self.student, self.teacher = (m.to(self.device) for m in build_student_teacher(
            a.arch, a.patch_size, a.out_dim, a.out_dim_c, a.head_hidden_dim, a.norm_last_layer, a.use_bn_in_head,
            a.drop_path_rate))
        self.loss_fn = CrOCLoss(a.out_dim, a.out_dim_c, a.warmup_teacher_temp, a.teacher_temp,
                                a.warmup_teacher_temp_epochs, a.epochs, a.student_temp, a.center_momentum)
        self.loss_fn.to(self.device)
        self.optimizer = torch.optim.AdamW(param_groups(self.student), lr=a.lr * a.batch_size_per_gpu / 256,
                                           weight_decay=a.weight_decay)
        self.scaler = torch.amp.GradScaler("cuda", enabled=self.device.type == "cuda" and a.precision == "fp16")
        dtype = {"fp16": torch.float16, "bf16": torch.bfloat16}.get(a.precision)
        self.autocast = torch.autocast(self.device.type, dtype=dtype) if dtype else nullcontext()
        self.generator = torch.Generator(device=self.device).manual_seed(bench_args.seed)
        # two augmented views of synthetic scenes, as train.py makes them: pruning then keeps a realistic share
        # of the centroid slots (random noise views would keep other counts)
        torch.manual_seed(bench_args.seed)
        scenes = data.SyntheticPretrain(a.batch_size_per_gpu, scene_size, bench_args.seed,
                                        data.TwoViews(img, patch, tuple(a.global_crops_scale)))
        views, positions, _ = torch.utils.data.default_collate([scenes[i] for i in range(len(scenes))])
        self.views, self.positions = views.to(self.device), positions.to(self.device)  # (B, 2, 3, S, S), (B, 2, N, 2)

    def kept_slots(self):
        """Mean kept centroids (Eq. 16) per image and view, all heads, for these views and the initial teacher."""
        with torch.no_grad(), self.autocast:
            x = rearrange(self.views, "b v c h w -> (v b) c h w")  # as model.train_step
            tf = self.teacher.backbone.forward_features(x, which=self.config.which_features)
            _, valid, _ = clustering.cluster_views(tf.tokens, self.positions, self.config, self.generator)
        return valid.sum(1).float().mean().item()

    def step(self, alpha, views=None, positions=None):
        """One full training step: model.train_step, then model.optimizer_step (backward, AdamW, EMA), on views and
        positions already on the device (default: the bench's own). -> the loss."""
        a = self.config
        views, positions = (self.views, self.positions) if views is None else (views, positions)
        loss, _ = train_step(self.student, self.teacher, self.loss_fn, views, positions, self.epoch, self.generator,
                             self.autocast, alpha=alpha, which_features=a.which_features, cluster_settings=a)
        optimizer_step(self.student, self.teacher, self.optimizer, self.scaler, loss, self.epoch,
                       a.momentum_teacher,  # the EMA momentum at its initial value
                       clip_grad=a.clip_grad, freeze_last_layer=a.freeze_last_layer)
        return loss

    def set_compiled(self, compiled):
        """Swap torch.compile'd forward_features into (or out of) both backbones; train_step calls that method."""
        for backbone in (self.student.backbone, self.teacher.backbone):
            if compiled:
                if "_compiled_forward_features" not in backbone.__dict__:
                    backbone._compiled_forward_features = torch.compile(backbone.forward_features)
                backbone.forward_features = backbone._compiled_forward_features
            else:
                backbone.__dict__.pop("forward_features", None)


ARCH_NAMES = {"vit_small": "ViT-S", "vit_tiny": "ViT-Ti", "vit_base": "ViT-B"}  # vit_nano (ours) keeps its name


def label(arch, patch, img):
    return f"{ARCH_NAMES.get(arch, arch)}/{patch} {img}"


def bench_steps(args):
    rows = []
    for (arch, patch, img), settings in args.step_configs:
        bench = StepBench(arch, patch, img, args, settings)
        a = bench.config
        fns = {"DINO": lambda: bench.step(0.0), "CrOC": lambda: bench.step(1.0)}
        times = time_interleaved(fns, args.repeats, args.warmup, args.device, f"step {label(arch, patch, img)}")
        dino, croc = (median_ms(times[k]) for k in ("DINO", "CrOC"))
        breakdown = step_breakdown(bench, args)
        parts = {p["part"]: p["croc_ms"] for p in breakdown["parts"]}
        rows.append({"model": label(arch, patch, img), "arch": arch, "patch": patch, "img": img,
                     "recipe": bool(settings), "tokens_per_view": (img // patch) ** 2, "batch": a.batch_size_per_gpu,
                     "centroid_slots": bench.student.backbone.num_heads * args.k_max,
                     "kept_slots": bench.kept_slots(), "out_dim": a.out_dim, "out_dim_c": a.out_dim_c,
                     "head_hidden_dim": a.head_hidden_dim, "use_bn_in_head": a.use_bn_in_head,
                     "precision": args.precision,
                     "dino_ms": dino, "croc_ms": croc, "ratio": croc / dino, "croc_minus_dino_ms": croc - dino,
                     "dino_gflops": step_flops(lambda: bench.step(0.0)) / 1e9,
                     "croc_gflops": step_flops(lambda: bench.step(1.0)) / 1e9,
                     "breakdown": breakdown, "clustering_share": parts["clustering"] / sum(parts.values()),
                     "dino_ms_all": [1e3 * t for t in times["DINO"]], "croc_ms_all": [1e3 * t for t in times["CrOC"]],
                     **memory_columns(bench, args.device)})
        if args.compile and args.device.type == "cuda" and (arch, patch, img) == ("vit_small", 16, 224):
            rows[-1]["compiled"] = bench_compiled(bench, fns, args)
        del bench, fns
    return rows


def step_flops(fn):
    """Floating-point operations of one call of fn, from torch.utils.flop_counter (matrix products, convolutions
    and attention, forward and backward: the arithmetic, whatever the machine)."""
    counter = FlopCounterMode(display=False)
    with counter:
        fn()
    return counter.get_total_flops()


def part_times(fn, device):
    """ms of each part of one call of fn, read from the torch.profiler ranges train.py labels (STEP_PARTS). On
    CUDA the parts' device time (the profiler's GPU annotations), else their wall time on the host."""
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda" else [])
    sync(device)
    with profile(activities=activities) as prof:
        fn()
        sync(device)
    host, gpu = {}, {}
    for e in prof.events():
        if e.name in STEP_PARTS:
            on_gpu = e.device_type == torch.autograd.DeviceType.CUDA
            times = gpu if on_gpu else host
            times[e.name] = times.get(e.name, 0.0) + e.time_range.elapsed_us() / 1e3
    return gpu if gpu else host


def step_breakdown(bench, args):
    """Median ms of each part of the DINO and CrOC steps (the profiler ranges of train.py), interleaved like the
    step timing. The profiler adds a little to every part; the whole step is timed without it in table 1."""
    variants = {"DINO": 0.0, "CrOC": 1.0}
    for _ in range(args.warmup):
        for alpha in variants.values():
            bench.step(alpha)
    times = {name: {} for name in variants}
    for i in range(args.repeats):
        for name in list(variants) if i % 2 == 0 else list(variants)[::-1]:
            for part, ms in part_times(lambda: bench.step(variants[name]), args.device).items():
                times[name].setdefault(part, []).append(ms)
    parts = [p for p in STEP_PARTS if p in times["CrOC"]]
    return {"parts": [{"part": p, "dino_ms": statistics.median(times["DINO"][p]) if p in times["DINO"] else 0.0,
                       "croc_ms": statistics.median(times["CrOC"][p])} for p in parts]}


def memory_columns(bench, device):
    (dino, dino_total), (croc, croc_total) = peak_step_memory(bench, 0.0, device), peak_step_memory(bench, 1.0, device)
    return {"dino_mem_mib": dino, "croc_mem_mib": croc, "dino_mem_total_mib": dino_total,
            "croc_mem_total_mib": croc_total}


def bench_compiled(bench, fns, args):
    """GPU: images/s of the step, eager and with compiled backbones, all four variants interleaved. The first
    compiled calls (compilation, and a second graph for the teacher's q/k/v output) stay outside the timing."""
    def run(fn, compiled):
        def go():
            bench.set_compiled(compiled)
            fn()
        return go
    variants = {f"{name} {mode}": run(fn, mode == "compiled") for name, fn in fns.items()
                for mode in ("eager", "compiled")}
    start = time.perf_counter()
    try:
        for name, fn in variants.items():
            if name.endswith("compiled"):
                fn()
        sync(args.device)
        compile_s = time.perf_counter() - start
        times = time_interleaved(variants, args.repeats, args.warmup, args.device, "step eager vs compiled")
    except Exception as e:  # a compiler failure must not cost the eager numbers: report it instead
        return {"error": f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}"[:300]}
    finally:
        bench.set_compiled(False)
    return {"compile_s": compile_s, **{name: {"ms": median_ms(t), "images_per_s": args.batch / statistics.median(t)}
                                       for name, t in times.items()}}


# --------------------------------------------------------------------------------------------------------------
# The official clusterer, re-expressed for comparison (not used in training)
# --------------------------------------------------------------------------------------------------------------
# The algorithm of the official `Clustering.compute_teacher_centroids` (github.com/stegmuel/CrOC, main_croc.py),
# written again on this repository's tensor layout so that it runs on the same inputs as `clustering.cluster`.
# It keeps the official operator sequence on purpose, host synchronisations included (`.tolist()` index tuples at
# every merge, boolean-mask indexing, `multinomial`, `nonzero().tolist()` and set intersections at the end, CPU
# identity and arange copied to the device). Checked against the official class on CPU (same seeds): identical
# kept clusters and K, centroids within 3e-5. Layout differences, none changing the arithmetic: tokens (P, 2N, d)
# with each view's CLS apart (P, 2, d); positions arrive per patch and per head (the official per-pixel maps,
# their patch average and the per-head repeat are skipped); non-uniform marginals only. Its Sinkhorn is the
# official one, which is `clustering.sinkhorn` (exp, division by the sum, row and column rescalings); the official
# nan_to_num after it is left out: no NaN arises for a lambda that `clustering.sinkhorn` accepts.
def _official_distances(centre_pos, positions):
    """(P, 2N, K) Euclidean distances token -> centroid position, divided by their max per problem."""
    dist = torch.sqrt(torch.sum((centre_pos[:, None, :, :] - positions[:, :, None, :]) ** 2, dim=-1))
    dist /= dist.amax(dim=(-1, -2))[:, None, None]
    return dist


def _official_start(tokens, positions, cls, k_start, marginal_temp):
    """Normalised tokens, the marginals and the seeds: (joint, row_marg (P, 2N, 1), col_marg (P, 1, K), onehot Y^T
    (P, K, 2N), dist (P, 2N, K), centres (P, K, d))."""
    # L2-normalised tokens and CLS (official: one call on the CLS-first tensor)
    joint = F.normalize(tokens, dim=-1)
    cls_unit = F.normalize(cls, dim=-1)

    # Raw token/CLS similarity s, per view, then laid out jointly (P, 2N)
    sim = torch.einsum('p m n d, p m d -> p m n', rearrange(joint, 'p (m n) d -> p m n d', m=2), cls_unit)
    sim = rearrange(sim, 'p m n -> p (m n)')
    draw = F.softmax(sim / marginal_temp, dim=1)
    n_problems, n_joint, _ = joint.shape

    # Seeds: multinomial draw without replacement, one-hot rows of a CPU identity copied to the device
    picks = draw.multinomial(num_samples=k_start, replacement=False)
    picks = rearrange(picks, 'p k -> (p k)')
    onehot = torch.eye(n_joint).to(tokens.device)[picks].to(tokens.device)
    onehot = rearrange(onehot, '(p k) n -> p k n', p=n_problems)

    # Marginals: c = softmax(Y^T s / temp), r = softmax(s / temp)
    col_marg = torch.einsum('p n, p k n -> p k', sim, onehot)
    col_marg = F.softmax(rearrange(col_marg / marginal_temp, 'p k -> p 1 k'), dim=-1)
    row_marg = F.softmax(rearrange(sim, 'p n -> p n 1') / marginal_temp, dim=1)
    row_marg, col_marg = torch.nan_to_num(row_marg), torch.nan_to_num(col_marg)

    # Seed positions and normalised position distances
    centre_pos = torch.einsum('p n c, p k n -> p k c', positions, onehot)
    dist = _official_distances(centre_pos, positions)

    centres = torch.einsum('p n d, p k n -> p k d', joint, onehot)
    return joint, row_marg, col_marg, onehot, dist, centres


def _official_merge(joint, positions, row_marg, plan, onehot):
    """The most similar pair of the step's soft centroids, merged as the official code does: the pair's plan
    columns summed and appended after the kept ones; centroids, their positions, distances and c recomputed from
    the merged plan. -> (plan, onehot, centres, dist, col_marg) with one column fewer."""
    n_problems, _, k = plan.shape

    # Soft centroids of this step (unnormalised), and the most similar pair of distinct ones
    weights = plan / plan.sum(dim=1, keepdim=True)
    centres = torch.einsum('p n d, p n k -> p k d', joint, weights)
    pair_sim = torch.einsum('p i d, p j d -> p i j', centres, centres)
    pair_sim -= 2 * torch.eye(k).to(pair_sim.device)
    pair_sim = rearrange(pair_sim, 'p i j -> p (i j)')
    flat = torch.argmax(pair_sim, dim=-1)
    first = torch.div(flat, k, rounding_mode='floor')
    second = flat % k

    # Python index tuples (host sync) for the two merged columns
    rows = torch.arange(0, n_problems).to(first.device)
    at_first = tuple(torch.stack([rows, first]).tolist())
    at_second = tuple(torch.stack([rows, second]).tolist())
    merged_onehot = (onehot[at_first] + onehot[at_second])[:, None, :]

    # Boolean mask of the untouched columns (CPU arange copied over), applied by masked indexing
    col_ids = repeat(torch.arange(0, k), 'k -> p k', p=n_problems).to(first.device)
    first_rep = repeat(first, 'p -> p k', k=k).to(first.device)
    second_rep = repeat(second, 'p -> p k', k=k).to(first.device)
    keep = torch.logical_and(col_ids != first_rep, col_ids != second_rep)
    onehot = rearrange(onehot[keep], '(p k) n -> p k n', p=n_problems)
    onehot = torch.cat([onehot, merged_onehot], dim=1)

    # Merge the plan: sum of the two columns appended after the kept ones
    plan = rearrange(plan, 'p n k -> p k n')
    merged_plan = (plan[at_first] + plan[at_second])[:, None, :]
    kept_plan = rearrange(plan[keep], '(p k) n -> p k n', p=n_problems)
    plan = torch.cat([kept_plan, merged_plan], dim=1)
    plan = rearrange(plan, 'p k n -> p n k')

    # Centroids, centroid positions, distances and centroid marginal from the merged plan
    weights = plan / plan.sum(dim=1, keepdim=True)
    centres = torch.einsum('p n d, p n k -> p k d', joint, weights)
    centre_pos = torch.einsum('p n c, p n k -> p k c', positions, weights)
    dist = _official_distances(centre_pos, positions)
    col_marg = torch.einsum('p n, p n k -> p k', row_marg.squeeze(), weights).unsqueeze(1)
    col_marg /= col_marg.sum(dim=-1, keepdim=True)
    return plan, onehot, centres, dist, col_marg


def _official_steps(joint, positions, row_marg, col_marg, onehot, dist, centres, *, k_start, lambda_pos,
                    sinkhorn_lambda, sinkhorn_iterations):
    """Sinkhorn at K = k_start, ..., 2, merging in between -> (step_costs (P, k_start - 1), step_plans: each
    step's plan with each view's columns normalised)."""
    n_regions = k_start
    step_costs, step_plans = [], []
    while n_regions >= 2:
        centres = F.normalize(centres, dim=-1)
        affinity = torch.einsum('p n d, p k d -> p n k', joint, centres)

        # Cost, min-max normalised over the whole batch (as official)
        cost = -affinity + lambda_pos * dist
        cost = (cost - cost.min()) / (cost.max() - cost.min())

        plan, ot_cost = clustering.sinkhorn(cost, row_marg[:, :, 0], col_marg[:, 0], sinkhorn_lambda,
                                            sinkhorn_iterations)
        step_costs.append(ot_cost)

        # Keep this step's plan, columns normalised per view
        per_view = rearrange(plan, 'p (m n) k -> m p n k', m=2)
        view_a, view_b = per_view.unbind()
        view_a = view_a / view_a.sum(dim=-2, keepdim=True)
        view_b = view_b / view_b.sum(dim=-2, keepdim=True)
        step_plans.append(torch.cat([view_a, view_b], dim=1))

        if n_regions == 2:
            break
        plan, onehot, centres, dist, col_marg = _official_merge(joint, positions, row_marg, plan, onehot)
        n_regions -= 1
    return torch.stack(step_costs, dim=-1), step_plans


def _official_pool(step_costs, step_plans, last_tokens, *, k_start, k_max, heads):
    """Selection of K, hard assignment, the view centroids of the final tokens and the kept ones, as official."""
    # Scale of the output centroids: mean CLS norm; final patch tokens split per view and repeated per head
    cls_norm = last_tokens[:, 0, :].norm(dim=-1).mean()
    final = rearrange(last_tokens[:, 1:], '(m b) n e -> m b n e', m=2)
    final = repeat(final, 'm b n e -> m (b h) n e', h=heads)

    # Selection among the last k_max - 1 steps (official indexing and offset)
    step_costs = step_costs[:, -(k_max - 1):]
    chosen = step_costs.argmin(dim=-1)
    chosen = chosen + (k_start - k_max)

    # Per-problem python gather of the chosen step's plan, padded to the largest K
    picked = [step_plans[step][p].transpose(0, 1) for p, step in enumerate(chosen.tolist())]
    picked = pad_sequence(picked, batch_first=True).transpose(1, 2)

    # Hard assignment as a mask of the row maxima, applied to the plan
    row_max = torch.max(picked, dim=-1, keepdim=True).values
    row_max = repeat(row_max, 'p n 1 -> p n k', k=picked.shape[-1])
    hard = (picked == row_max).float()
    masked = picked * hard
    masked = rearrange(masked, 'p (m n) k -> m p n k', m=2)

    # Centroids of each view from the final tokens
    centroids = torch.einsum('m p n e, m p n k -> m p k e', final, masked)
    centroids = rearrange(centroids, 'm p k e -> m (p k) e')
    centroids_v1, centroids_v2 = centroids.unbind()

    # Valid clusters: non-empty in both views (nonzero -> tolist -> python set intersection)
    mass_v1, mass_v2 = rearrange(masked, 'm p n k -> m (p k) n').unbind()
    nonempty_v1 = set(mass_v1.sum(dim=-1).nonzero().squeeze().tolist())
    nonempty_v2 = set(mass_v2.sum(dim=-1).nonzero().squeeze().tolist())
    valid_centroids = list(nonempty_v1.intersection(nonempty_v2))
    centroids_v1, centroids_v2 = centroids_v1[valid_centroids], centroids_v2[valid_centroids]

    # Rescale to the CLS norm
    centroids_v1 = cls_norm * F.normalize(centroids_v1, dim=-1)
    centroids_v2 = cls_norm * F.normalize(centroids_v2, dim=-1)

    region_count = k_start - chosen.float().mean().item()
    return centroids_v1, centroids_v2, valid_centroids, region_count


@torch.no_grad()
def official_cluster(tokens, positions, cls, last_tokens, *, k_start=12, k_max=12, lambda_pos=4.0,
                     sinkhorn_lambda=20.0, sinkhorn_iterations=5, marginal_temp=2.0, heads=6):
    """tokens (P, 2N, d) last-block q/k/v of both views (view 1's N tokens then view 2's), P = B * heads, image-major
    (problem p = b * heads + h); positions (P, 2N, 2) patch positions in the original image; cls (P, 2, d) each view's
    CLS token in the same space; last_tokens (2B, 1 + N, D) the final tokens (CLS first), view 1's B images then
    view 2's. Returns (centroids_v1, centroids_v2, valid_centroids, region_count) as the official code does:
    region_count is the mean selected K, valid_centroids indexes the (problem, cluster) slots, K padded to the
    largest selected one."""
    joint, row_marg, col_marg, onehot, dist, centres = _official_start(tokens, positions, cls, k_start, marginal_temp)
    step_costs, step_plans = _official_steps(joint, positions, row_marg, col_marg, onehot, dist, centres,
                                             k_start=k_start, lambda_pos=lambda_pos, sinkhorn_lambda=sinkhorn_lambda,
                                             sinkhorn_iterations=sinkhorn_iterations)
    return _official_pool(step_costs, step_plans, last_tokens, k_start=k_start, k_max=k_max, heads=heads)


# --------------------------------------------------------------------------------------------------------------
# The clusterer alone
# --------------------------------------------------------------------------------------------------------------
def cluster_inputs(batch, arch, patch, img, device, seed):
    """Random teacher tokens at a backbone's shapes, laid out as clustering.cluster_views passes them:
    P = batch x heads problems of 2N joint tokens of the head dimension, each view's CLS, pixel positions; and
    the final tokens (2B, 1 + N, D), CLS first, that the centroids pool."""
    backbone = build_vit(arch, patch)  # only for its shapes
    heads, d = backbone.num_heads, backbone.embed_dim // backbone.num_heads
    n = 2 * (img // patch) ** 2
    gen = torch.Generator().manual_seed(seed)
    tokens = torch.randn(batch * heads, n, d, generator=gen)  # (P, 2N, d)
    positions = img * torch.rand(batch * heads, n, 2, generator=gen)  # (P, 2N, 2)
    cls = torch.randn(batch * heads, 2, d, generator=gen)  # (P, 2, d)
    final = torch.randn(2 * batch, 1 + n // 2, backbone.embed_dim, generator=gen)  # (2B, 1 + N, D)
    return tokens.to(device), positions.to(device), cls.to(device), final.to(device)


def bench_clusterer(args, step_rows):
    """`clustering.cluster` alone, then with the view centroids pooled from the final tokens (the same output as
    the official `compute_teacher_centroids`), against the official clusterer on the same inputs, interleaved."""
    a = PretrainConfig()
    generator = torch.Generator(device=args.device).manual_seed(args.seed)
    arch, patch, img = args.cluster_shape
    steps = {r["batch"]: r for r in step_rows if (r["arch"], r["patch"], r["img"]) == (arch, patch, img)}
    settings = dict(k_start=args.k_start, k_max=args.k_max, lambda_pos=a.lambda_pos, sinkhorn_lambda=a.sinkhorn_lambda,
                    sinkhorn_iterations=a.sinkhorn_iterations, marginal_temp=a.marginal_temp)
    rows = []
    for batch in args.cluster_batches:
        tokens, positions, cls, final = cluster_inputs(batch, arch, patch, img, args.device, args.seed)
        heads = tokens.shape[0] // batch

        def call():
            return clustering.cluster(tokens, positions, cls, generator=generator, **settings)

        def call_with_centroids():
            plan = rearrange(call().q_star, "(b h) (v n) k -> v b n (h k)", h=heads, v=2)
            return view_centroids(final[:, 1:], final[:, 0], plan)

        def official():
            return official_cluster(tokens, positions, cls, final, heads=heads, **settings)
        fns = {"cluster": call, "cluster + centroids": call_with_centroids, "official": official}
        times = time_interleaved(fns, args.repeats, args.warmup, args.device, f"cluster B={batch}")
        ms, with_centroids, official_ms = (median_ms(times[k]) for k in fns)
        official_ops = count_ops(official, args.device)
        rows.append({"batch": batch, "problems": tokens.shape[0], "tokens": tokens.shape[1], "dim": tokens.shape[2],
                     "k_start": args.k_start, "k_max": args.k_max, "ms": ms,
                     "step_ms": steps[batch]["croc_ms"] if batch in steps else None,
                     "share_of_step": ms / steps[batch]["croc_ms"] if batch in steps else None,
                     "croc_minus_dino_ms": steps[batch]["croc_minus_dino_ms"] if batch in steps else None,
                     **count_ops(call, args.device), "host_syncs": count_syncs(call, args.device),
                     "with_centroids_ms": with_centroids, "official_ms": official_ms,
                     "speedup_over_official": official_ms / with_centroids,
                     "official_top_level_aten_ops": official_ops["top_level_aten_ops"],
                     "official_host_syncs": count_syncs(official, args.device)})
    return rows


def compiled_clusterer(args, shape, batches, backend="inductor"):
    """`clustering.cluster` eager against torch.compile'd (inductor, fullgraph=True: one graph, so no graph break
    and no host sync), on cluster_inputs at shape (arch, patch, img) for each batch, with the same seeds for both
    (drawn from r as `cluster` draws them; a torch.Generator does not trace); then the compiled one with the view
    centroids pooled, and the official algorithm, all four interleaved. The first compiled call, the
    compilation, is timed on its own. backend: torch.compile's (the test traces with "eager", in seconds)."""
    a = PretrainConfig()
    settings = dict(k_start=args.k_start, k_max=args.k_max, lambda_pos=a.lambda_pos, sinkhorn_lambda=a.sinkhorn_lambda,
                    sinkhorn_iterations=a.sinkhorn_iterations, marginal_temp=a.marginal_temp)
    generator = torch.Generator(device=args.device).manual_seed(args.seed)
    compiled = torch.compile(clustering.cluster, fullgraph=True, dynamic=False, backend=backend)
    rows = []
    for batch in batches:
        tokens, positions, cls, final = cluster_inputs(batch, *shape, args.device, args.seed)
        heads = tokens.shape[0] // batch
        r = clustering.token_marginal(clustering.cls_similarity(F.normalize(tokens, dim=-1), cls), a.marginal_temp)
        seeds = clustering.sample_seeds(r, args.k_start, generator)  # (P, k_start)

        def eager():
            return clustering.cluster(tokens, positions, cls, seeds=seeds, **settings)

        def fast():
            return compiled(tokens, positions, cls, seeds=seeds, **settings)

        def fast_with_centroids():
            plan = rearrange(fast().q_star, "(b h) (v n) k -> v b n (h k)", h=heads, v=2)
            return view_centroids(final[:, 1:], final[:, 0], plan)

        def official():
            return official_cluster(tokens, positions, cls, final, heads=heads, **settings)
        row = {"batch": batch, "problems": tokens.shape[0], "tokens": tokens.shape[1], "shape": label(*shape)}
        try:
            sync(args.device)
            start = time.perf_counter()
            got = fast()
            sync(args.device)
            row["compile_s"] = time.perf_counter() - start
        except Exception as e:  # a compiler failure (no C++ compiler, a graph break) is reported, not raised
            rows.append({**row, "error": first_line(e)})
            continue
        want = eager()
        row["same_k_and_kept"] = bool(torch.equal(got.k, want.k) and torch.equal(got.valid, want.valid))
        row["max_q_star_difference"] = float((got.q_star - want.q_star).abs().max())
        fns = {"eager": eager, "compiled": fast, "compiled + centroids": fast_with_centroids, "official": official}
        times = time_interleaved(fns, args.repeats, args.warmup, args.device, f"compiled cluster B={batch}")
        ms = {name: median_ms(t) for name, t in times.items()}
        row.update(eager_ms=ms["eager"], compiled_ms=ms["compiled"],
                   compiled_with_centroids_ms=ms["compiled + centroids"], official_ms=ms["official"],
                   speedup=ms["eager"] / ms["compiled"],
                   speedup_over_official=ms["official"] / ms["compiled + centroids"],
                   host_syncs=count_syncs(fast, args.device))
        rows.append(row)
    return rows


# --------------------------------------------------------------------------------------------------------------
# The differences from the official code that change what the clusterer outputs, measured (--differences)
# --------------------------------------------------------------------------------------------------------------
DIFFERENCE_SHAPES = (("vit_small", 16, 224), ("vit_nano", 8, 48))  # the paper's backbone; repro.sh's, 48-px views
DIFFERENCE_SETTINGS = ((12, 12, "paper"), (5, 4, "official"))  # (K_start, K_max, whose defaults)


def initial_vit_inputs(batch, arch, patch, img, device, seed):
    """cluster_inputs' four tensors, from a randomly initialised ViT on two views of synthetic scenes as
    train.py makes them (its last-block tokens of model.PretrainConfig's which_features)."""
    a = PretrainConfig()
    torch.manual_seed(seed)
    backbone = build_vit(arch, patch).to(device).eval()
    scenes = data.SyntheticPretrain(batch, img, seed, data.TwoViews(img, patch, tuple(a.global_crops_scale)))
    views, positions, _ = torch.utils.data.default_collate([scenes[i] for i in range(len(scenes))])
    with torch.no_grad():
        x = rearrange(views.to(device), "b v c h w -> (v b) c h w")  # as model.train_step
        tf = backbone.forward_features(x, which=a.which_features)
    tokens = rearrange(tf.tokens[:, :, 1:], "(v b) h n d -> (b h) (v n) d", v=2)  # as clustering.cluster_views
    cls = rearrange(tf.tokens[:, :, 0], "(v b) h d -> (b h) v d", v=2)
    positions = repeat(positions.to(device).float(), "b v n c -> (b h) (v n) c", h=backbone.num_heads)
    return tokens, positions, cls, torch.cat([tf.cls[:, None], tf.patch], dim=1)


def official_hard_labels(plan, k):
    """(P, 2N) the official hard assignment: each token's largest entry of the selected plan (P, 2N, k_max) after
    normalising each view's columns to sum 1, among its first k (P,) columns (Eq. 15 reads it after the rows)."""
    per_view = rearrange(plan, "p (v n) k -> p v n k", v=2)
    columns = per_view / per_view.sum(dim=2, keepdim=True).clamp_min(torch.finfo(plan.dtype).tiny)
    padding = torch.arange(plan.shape[-1], device=plan.device) >= rearrange(k, "p -> p 1 1")
    return rearrange(columns, "p v n k -> p (v n) k").masked_fill(padding, float("-inf")).argmax(dim=-1)


def measure_differences(inputs, batch, k_start, k_max, seed):
    """Both clusterers on the same inputs (cluster_inputs' four tensors), train.py's other settings (which are
    clustering.cluster's defaults): the selected K, the kept centroids per image over all heads, and the share
    of tokens whose hard assignment the official rule moves on the same selected plan."""
    tokens, positions, cls, final = inputs
    heads = tokens.shape[0] // batch
    res = clustering.cluster(tokens, positions, cls, k_start=k_start, k_max=k_max,
                             generator=torch.Generator(device=tokens.device).manual_seed(seed))
    paper = clustering.hard_assignment(res.plan, res.k).argmax(dim=-1)  # (P, 2N) Eq. 15: the row argmax
    moved = (paper != official_hard_labels(res.plan, res.k)).float().mean()
    kept = rearrange(res.valid, "(b h) k -> b (h k)", h=heads).sum(dim=1).float()  # (B,)
    torch.manual_seed(seed)  # the official seeds come from torch.multinomial
    _, _, valid, mean_k = official_cluster(tokens, positions, cls, final, k_start=k_start, k_max=k_max, heads=heads)
    return {"images": batch, "problems": tokens.shape[0], "tokens": tokens.shape[1], "k_start": k_start,
            "k_max": k_max, "k_share": {int(k): float((res.k == k).float().mean()) for k in res.k.unique()},
            "mean_k": float(res.k.float().mean()), "kept_per_image": float(kept.mean()),
            "kept_min": float(kept.min()), "kept_max": float(kept.max()), "moved_tokens": float(moved),
            "official_mean_k": mean_k, "official_kept_per_image": len(valid) / batch}


def differences_table(rows):
    def k_cell(share):
        top = sorted(share.items(), key=lambda kv: -kv[1])[:3]
        rest = 1 - sum(s for _, s in top)
        return ", ".join(f"{k}: {100 * s:.0f}%" for k, s in top) + (f", other {100 * rest:.0f}%" if len(share) > 3 else "")
    body = [[r["tokens_of"], r["shape"], f"{r['k_start']}/{r['k_max']} ({r['whose']})", k_cell(r["k_share"]),
             f"{r['mean_k']:.1f} / {r['official_mean_k']:.1f}",
             f"{r['kept_per_image']:.1f} [{r['kept_min']:.0f}, {r['kept_max']:.0f}] / "
             f"{r['official_kept_per_image']:.1f}", f"{100 * r['moved_tokens']:.1f}%"] for r in rows]
    return "\n".join([table(["tokens", "shape", "K_start/K_max", "selected K: share", "mean K",
                             "kept per image [min, max]", "moved"], body),
                      f"{rows[0]['images']} images x heads problems. tokens: a randomly initialised ViT's on two views "
                      "of synthetic scenes (initial ViT), or Gaussian at its shapes (bench.cluster_inputs). mean K, "
                      "kept: clustering.cluster / bench.official_cluster on the same inputs; selected K: "
                      "clustering.cluster's, the 3 commonest. kept per image: centroids kept (Eq. 16), all heads. "
                      "moved: share of all tokens whose hard assignment of our selected plan changes when each view's "
                      "columns, not the rows (Eq. 15), are normalised before the argmax (the official rule)."])


def differences(args):
    """Print the measured differences (python bench.py --differences): seconds on CPU."""
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    shapes, batch = (((("vit_tiny", 8, 32),), 2) if args.quick else (DIFFERENCE_SHAPES, 16))
    batch = args.batch or batch
    rows = []
    for shape in shapes:
        for tokens_of, make in (("initial ViT", initial_vit_inputs), ("Gaussian", cluster_inputs)):
            inputs = make(batch, *shape, device, args.seed)
            rows += [{**measure_differences(inputs, batch, k_start, k_max, args.seed), "tokens_of": tokens_of,
                      "shape": f"{shape[0]}/{shape[1]} {shape[2]}", "whose": whose}
                     for k_start, k_max, whose in DIFFERENCE_SETTINGS]
    print(differences_table(rows), flush=True)
    return rows


# --------------------------------------------------------------------------------------------------------------
# Machine and table
# --------------------------------------------------------------------------------------------------------------
def load_average():
    """1-minute load average: how many processes wanted the CPUs while this ran (NaN where unknown)."""
    return os.getloadavg()[0] if hasattr(os, "getloadavg") else float("nan")


def machine_info(device):
    cpu = platform.processor() or "unknown"
    try:
        with open("/proc/cpuinfo") as f:
            cpu = next((line.split(":", 1)[1].strip() for line in f if line.startswith("model name")), cpu)
    except OSError:
        pass
    info = {"cpu": cpu, "cpu_count": os.cpu_count(), "torch_threads": torch.get_num_threads(),
            "torch": torch.__version__, "python": platform.python_version(), "device": str(device),
            "load_average_1min_start": load_average()}
    if device.type == "cuda":
        info["gpu"] = torch.cuda.get_device_name(device)
        info["cuda"] = torch.version.cuda
    return info


def table(headers, rows):
    cells = [[str(h) for h in headers]] + [[str(c) for c in row] for row in rows]
    widths = [max(len(r[i]) for r in cells) for i in range(len(headers))]
    lines = ["  ".join(c.rjust(w) if i else c.ljust(w) for i, (c, w) in enumerate(zip(r, widths))) for r in cells]
    return "\n".join([lines[0], "-" * len(lines[0])] + lines[1:])


def memory_cell(step, total):
    return f"{step:.0f}" if total is None else f"{step:.0f} / {total:.0f}"


def head_cell(row):
    return f"{row['head_hidden_dim']}, {row['out_dim']}/{row['out_dim_c']}" + (", BN" if row["use_bn_in_head"] else "")


def compiled_clusterer_lines(res):
    out = ["4. The clusterer torch.compile'd (inductor, fullgraph=True) against eager, on table 2's inputs"]
    rows = res.get("compiled_clusterer")
    if rows is None:
        return out + ["not measured: --compile is off (its default on CPU)."]
    body = []
    for r in rows:
        if "error" in r:
            body.append([r["batch"], r["problems"]] + ["-"] * 8 + [r["error"]])
        else:
            body.append([r["batch"], r["problems"], f"{r['compile_s']:.0f}", f"{r['eager_ms']:.1f}",
                         f"{r['compiled_ms']:.1f}", f"{r['speedup']:.2f}x", f"{r['compiled_with_centroids_ms']:.1f}",
                         f"{r['official_ms']:.1f}", f"{r['speedup_over_official']:.2f}x", r["host_syncs"],
                         f"{r['same_k_and_kept']}, {r['max_q_star_difference']:.0e}"])
    out.append(table(["B", "P", "compile s", "eager ms", "compiled ms", "speed-up", "+ centroids ms", "official ms",
                      "vs official", "host syncs", "same K and kept, max |dQ*|"], body))
    out.append("the same inputs and seeds for both (drawn from r as clustering.cluster draws them); compile s: the "
               "first compiled call, compilation included, outside the timing; + centroids: the compiled clusterer, "
               "then the view centroids (model.view_centroids); vs official: official ms / + centroids ms. One graph "
               "(fullgraph=True) holds no host sync; host syncs: as in table 2.")
    return out


def step_lines(res):
    m = res["machine"]
    out = ["1. Training step (teacher + student forward, clustering, heads, loss, backward, AdamW, EMA)"]
    if not res["steps"]:
        return out + ["not measured: --step_shapes with no name."]
    out.append(table(["model", "heads", "batch", "slots", "kept", "DINO ms", "CrOC ms", "CrOC/DINO", "FLOPs",
                      "clustering", "DINO mem MiB", "CrOC mem MiB"],
                     [[r["model"], head_cell(r), r["batch"], r["centroid_slots"], f"{r['kept_slots']:.1f}",
                       f"{r['dino_ms']:.1f}", f"{r['croc_ms']:.1f}", f"{r['ratio']:.3f}",
                       f"{r['croc_gflops'] / r['dino_gflops']:.3f}", f"{100 * r['clustering_share']:.1f}%",
                       memory_cell(r["dino_mem_mib"], r["dino_mem_total_mib"]),
                       memory_cell(r["croc_mem_mib"], r["croc_mem_total_mib"])]
                      for r in res["steps"]]))
    cuda = m["device"].startswith("cuda")
    out.append("heads: hidden width, L-bar/L outputs, BN: DINO's BatchNorm head (the recipe row is repro.sh's). "
               "slots: heads x K_max centroid slots per image and view; kept: of them, the mean number kept (Eq. 16) "
               "on these views (synthetic scenes, initial teacher). CrOC: model.train_step, the kept centroids alone "
               "through the heads and the dense loss, one host sync (their number).")
    out.append("FLOPs: the step's floating-point operations over DINO's (torch.utils.flop_counter: matrix products, "
               "convolutions, attention; forward and backward), the machine-independent share of the ratio before it "
               "(DINO step: " + ", ".join(f"{r['model']} {r['dino_gflops']:.1f} GFLOP" for r in res["steps"]) + "). "
               "clustering: the clustering part of the CrOC step (table 3's profiler ranges, over their sum).")
    out.append("goal: CrOC/DINO <= 1.10 at ViT-S/16 224. mem: peak MiB a step allocates above what it starts with "
               "(models, optimizer state, inputs; gradients freed)"
               + (" / the whole peak, from torch.cuda.max_memory_allocated." if cuda else
                  ", from torch.profiler's record of every allocation and free of torch's CPU allocator (the process "
                  "RSS cannot tell: freed tensors stay resident)."))
    return out


def breakdown_lines(res):
    cfg = res["config"]
    out = ["3. Where the CrOC step's extra time goes: each part of the step, from the torch.profiler ranges "
           f"train.py labels (medians of {cfg['repeats']} runs, interleaved)"]
    if not res["steps"]:
        return out + ["not measured: --step_shapes with no name."]
    for r in res["steps"]:
        b = r["breakdown"]
        rows = [[p["part"], f"{p['dino_ms']:.1f}", f"{p['croc_ms']:.1f}", f"{p['croc_ms'] - p['dino_ms']:+.1f}"]
                for p in b["parts"]]
        dino, croc = (sum(p[k] for p in b["parts"]) for k in ("dino_ms", "croc_ms"))
        rows.append(["whole step", f"{dino:.1f}", f"{croc:.1f}", f"{croc - dino:+.1f}"])
        out.append(table([f"{r['model']}, batch {r['batch']}", "DINO ms", "CrOC ms",
                          "CrOC - DINO"], rows))
    out.append("teacher forward: backbone and image head; clustering: clustering.cluster_views; "
               "teacher centroid head: view centroids and the head; student forward: backbone, image head, centroids "
               "and centroid head; loss: Eq. 4 and 6 with the centres; backward: all of autograd's; AdamW: gradient "
               "clipping and the optimizer step; teacher EMA: the momentum update.")
    return out


def format_results(res):
    m, cfg = res["machine"], res["config"]
    out = [f"machine: {m['cpu']} ({m['cpu_count']} CPUs, torch threads {m['torch_threads']}), torch {m['torch']}, "
           f"device {m['device']}" + (f" ({m['gpu']}, CUDA {m['cuda']})" if "gpu" in m else "")
           + f"; load average {m['load_average_1min_start']:.2f} at start, {m['load_average_1min_end']:.2f} at end",
           f"medians of {cfg['repeats']} runs after {cfg['warmup']} warm-up; CrOC and DINO interleaved; "
           f"precision {cfg['precision']}; K_start {cfg['k_start']}, K_max {cfg['k_max']}", ""]

    out += step_lines(res) + [""]

    c0 = res["clusterer"][0]
    out.append(f"2. Clusterer alone (clustering.cluster): B images x heads problems, 2N = {c0['tokens']} tokens, "
               f"d = {c0['dim']}, K_start = {c0['k_start']}, K_max = {c0['k_max']}")
    headers = ["B", "P", "ms/call", "share of step", "top-level aten ops", "of them views", "all aten ops",
               "host syncs"]
    gpu = "kernel_launches" in c0
    if gpu:
        headers += ["kernel launches", "sync runtime calls"]
    headers += ["+ centroids ms", "official ms", "speed-up", "official ops", "official syncs"]
    rows = []
    for r in res["clusterer"]:
        row = [r["batch"], r["problems"], f"{r['ms']:.1f}",
               "-" if r["share_of_step"] is None else f"{100 * r['share_of_step']:.1f}%",
               r["top_level_aten_ops"], r["top_level_view_ops"], r["all_aten_ops"], r["host_syncs"]]
        if gpu:
            row += [r["kernel_launches"], r["sync_runtime_calls"]]
        row += [f"{r['with_centroids_ms']:.1f}", f"{r['official_ms']:.1f}", f"{r['speedup_over_official']:.2f}x",
                r["official_top_level_aten_ops"], r["official_host_syncs"]]
        rows.append(row)
    out.append(table(headers, rows))
    out.append(f"share of step: ms/call over the CrOC step of the same batch in table 1 ({res['clusterer_step']}), "
               "'-' where no step of that batch was measured; "
               f"{PAPER_TABLE_A2}.")
    for r in res["clusterer"]:
        if r["croc_minus_dino_ms"] is not None:
            out.append(f"at B = {r['batch']} the CrOC step costs {r['croc_minus_dino_ms']:.1f} ms more than DINO's: "
                       f"the clusterer alone {r['ms']:.1f} ms of it, the remaining "
                       f"{r['croc_minus_dino_ms'] - r['ms']:.1f} ms are the centroid path (view centroids, the heads "
                       "on the kept centroids for teacher and student, the dense loss, their backward and the "
                       "centroid layer's AdamW update).")
    out.append("top-level aten ops: aten:: profiler events whose parent is not an aten:: event (the calls the Python "
               "code makes; of them views: reshapes, expands, no-op casts); all aten ops: every aten:: event, nested "
               "ones included. host syncs: " + ("torch.cuda.set_sync_debug_mode('warn') warnings during one call."
                                               if gpu else "0 by construction on CPU (no device to wait for)."))
    out.append("+ centroids: cluster, then the view centroids pooled from the final tokens (model.view_centroids), "
               "the output of the official clusterer; official: bench.official_cluster, the official algorithm on the "
               "same inputs (its operator sequence and host syncs kept); speed-up: official ms / + centroids ms.")
    out.append("")

    out += breakdown_lines(res) + [""]

    out += compiled_clusterer_lines(res)
    out.append("")

    out.append("5. GPU throughput, ViT-S/16 224, eager vs torch.compile'd backbones")
    compiled = next((r["compiled"] for r in res["steps"] if "compiled" in r), None)
    if compiled is None:
        out.append("not measured: " + ("no GPU on this machine." if not gpu else
                                       "--compile false or no ViT-S/16 224 step in this run."))
    elif "error" in compiled:
        out.append(f"torch.compile failed: {compiled['error']}")
    else:
        out.append(table(["variant", "ms/step", "images/s"],
                         [[name, f"{v['ms']:.1f}", f"{v['images_per_s']:.0f}"] for name, v in compiled.items()
                          if name != "compile_s"]))
        out.append(f"batch {cfg['batch']} images (2 views each) per step, precision {cfg['precision']}; first compiled "
                   f"steps (compilation) took {compiled['compile_s']:.0f} s, outside the timing.")
    return "\n".join(out)


# --------------------------------------------------------------------------------------------------------------
# GPU check (gpu_check.sh): the CUDA path run for real (syncs, fp16/bf16, torch.compile, DDP on CUDA tensors), or
# its CPU skeleton in seconds (a dry run, where CUDA is absent). Each part writes OUT/PART.json; `summary` merges
# them with the driver's exit codes into OUT/gpu_check.json and OUT/gpu_check.txt.
# --------------------------------------------------------------------------------------------------------------
NO_CUDA = "skipped: no CUDA"
def gpu_check_setup(args):
    """Device, shapes and step counts of the GPU check; a dry run (no CUDA, or --dry) gets tiny ones on the CPU."""
    args.dry = args.dry or not torch.cuda.is_available()
    args.device = torch.device("cpu" if args.dry else "cuda")
    args.compile = True if args.compile is None else args.compile
    args.k_max = args.k_max or args.k_start
    if args.dry:
        args.batch, args.sync_batch = args.batch or 2, 2
        args.steps, args.warmup_steps = min(args.steps, 2), min(args.warmup_steps, 1)
        args.out_dim, args.out_dim_c = min(args.out_dim, 256), min(args.out_dim_c, 256)
        args.shape, args.precisions = ("vit_tiny", 16, 64), ["fp32"]  # 2N = 32 tokens >= K_start 12
    else:
        args.batch, args.sync_batch = args.batch or 128, 8  # syncs do not depend on the batch
        args.shape, args.precisions = ("vit_small", 16, 224), ["bf16", "fp16"]
    os.makedirs(args.out, exist_ok=True)
    return args


def write_part(args, name, res):
    with open(os.path.join(args.out, f"{name}.json"), "w") as f:
        json.dump(res, f, indent=2, default=str)


def first_line(e):
    text = str(e).strip().splitlines()
    return f"{type(e).__name__}: {text[0] if text else ''}"[:300]


BENCH_ROOT = os.path.dirname(os.path.abspath(__file__)) + os.sep


def where(filename, lineno):
    """A short name of the source line: the repository's file, or the path below site-packages."""
    path = os.path.abspath(filename)
    if path.startswith(BENCH_ROOT):
        path = os.path.relpath(path, BENCH_ROOT)
    elif "site-packages" + os.sep in path:
        path = path.split("site-packages" + os.sep, 1)[1]
    return f"{path}:{lineno}"


def gpu_step_bench(args, precision, batch):
    """A StepBench (models, loss, AdamW, scaler, synthetic views) at the check's shape, and its views and positions
    in pinned host memory, to be copied in every step as train.main copies its batches."""
    bench = StepBench(*args.shape, argparse.Namespace(**{**vars(args), "precision": precision, "batch": batch}))
    views, positions = bench.views.cpu(), bench.positions.cpu()
    if args.device.type == "cuda":
        views, positions = views.pin_memory(), positions.pin_memory()
    return bench, views, positions


def full_step(bench, alpha, views, positions):
    """One training step as train.main runs it: the batch to the device, model.train_step, then backward,
    AdamW and the teacher EMA (model.optimizer_step). -> the loss (a device tensor: no host sync)."""
    views = views.to(bench.device, non_blocking=True)
    positions = positions.to(bench.device, non_blocking=True)
    return bench.step(alpha, views, positions).detach()


def cluster_call(args, batch):
    """clustering.cluster on random tokens at the check's shape (B x heads problems), train.py's settings."""
    a = PretrainConfig()
    tokens, positions, cls, _ = cluster_inputs(batch, *args.shape, args.device, args.seed)
    generator = torch.Generator(device=args.device).manual_seed(args.seed)

    def call():
        return clustering.cluster(tokens, positions, cls, k_start=args.k_start, k_max=args.k_max,
                                  lambda_pos=a.lambda_pos, sinkhorn_lambda=a.sinkhorn_lambda,
                                  sinkhorn_iterations=a.sinkhorn_iterations, marginal_temp=a.marginal_temp,
                                  uniform_marginals=a.uniform_marginals, generator=generator)
    return call


def sync_check(fn, device, expected=None):
    """Runs fn (already warmed up) under torch.cuda.set_sync_debug_mode('error'), then under 'warn' to list every
    synchronising line; on the CPU runs it once, unchecked. expected: the one line (file:line) where fn is meant
    to synchronise (the training step's count of kept centroids); then 'warn' alone runs, and the status says
    whether that line is the only one."""
    if device.type != "cuda":
        fn()
        return {"status": NO_CUDA + " (ran once on the CPU, unchecked)"}
    res = {}
    if expected is None:
        sync(device)
        torch.cuda.set_sync_debug_mode("error")
        try:
            fn()
            res["status"] = "ok: no host sync"
        except RuntimeError as e:
            frames = [f for f in traceback.extract_tb(e.__traceback__)]
            res["status"] = f"sync: {first_line(e)}"
            res["raised_at"] = [where(f.filename, f.lineno) for f in frames[-4:]]
        finally:
            torch.cuda.set_sync_debug_mode("default")
    res["sync_sites"] = [where(w.filename, w.lineno) for w in sync_warnings(fn, device)]
    if expected is not None:
        others = sorted(set(res["sync_sites"]) - {expected})
        res["status"] = (f"sync: also at {', '.join(others)}" if others else f"ok: one host sync, at {expected}"
                         if expected in res["sync_sites"] else "ok: no host sync")
    return res


def step_sync_site():
    """file:line of the training step's one host sync: the nonzero that counts the kept centroids in
    model.train_step."""
    lines, first = inspect.getsourcelines(train_step)
    line = first + next(i for i, text in enumerate(lines) if "nonzero(" in text)
    return where(inspect.getsourcefile(train_step), line)


def gpu_syncs(args):
    """Part 2: one clusterer call (no host sync) and one full CrOC step per precision (one host sync: the kept
    centroids' count in model.train_step) under the sync debug mode, after a warm-up step; the logging reduction
    (is the loss finite?) runs outside, as in train.main."""
    res = {"batch": args.sync_batch, "shape": label(*args.shape)}
    call = cluster_call(args, args.sync_batch)
    call()
    res["clusterer"] = sync_check(call, args.device)
    for precision in args.precisions:
        try:
            bench, views, positions = gpu_step_bench(args, precision, args.sync_batch)
            for _ in range(2):  # warm-up: AdamW's state, the scaler's scale, cuBLAS handles
                full_step(bench, 1.0, views, positions)
            losses = []
            check = sync_check(lambda: losses.append(full_step(bench, 1.0, views, positions)), args.device,
                               expected=step_sync_site())
            check["loss_finite"] = bool(torch.isfinite(torch.stack(losses)).all())  # the logging sync, outside
            del bench
        except Exception as e:  # an error other than a sync: reported, and the other precision still runs
            check = {"status": f"failed: {first_line(e)}"}
        res[f"step_{precision}"] = check
    bad = [k for k, v in res.items() if isinstance(v, dict) and not v["status"].startswith(("ok", NO_CUDA))]
    res["status"] = (NO_CUDA if args.dry else f"syncs or errors in: {', '.join(bad)}" if bad else "ok")
    return res


def train_run(bench, alpha, views, positions, args, deadline):
    """--warmup_steps untimed steps (compilation happens there), then up to --steps timed ones (fewer when the
    deadline comes): images/s, peak memory, and whether every loss was finite (checked once, at the end)."""
    losses = []
    start = time.perf_counter()
    for _ in range(args.warmup_steps):
        losses.append(full_step(bench, alpha, views, positions))
    sync(args.device)
    warmup_s = time.perf_counter() - start
    if args.device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(args.device)
    start, steps = time.perf_counter(), 0
    while steps < args.steps and (steps == 0 or time.perf_counter() < deadline):
        losses.append(full_step(bench, alpha, views, positions))
        steps += 1
    sync(args.device)
    seconds = time.perf_counter() - start
    losses = torch.stack(losses).float().tolist()
    return {"status": "ok", "warmup_s": warmup_s, "steps": steps, "ms_per_step": 1e3 * seconds / steps,
            "images_per_s": steps * args.batch / seconds,
            "peak_mem_mib": torch.cuda.max_memory_allocated(args.device) / 2 ** 20
            if args.device.type == "cuda" else None,
            "loss_finite": all(math.isfinite(x) for x in losses), "loss_first": losses[0], "loss_last": losses[-1]}


def gpu_training(args):
    """Part 3: DINO and CrOC trained on the same synthetic scenes, bf16 and fp16, eager then with compiled
    backbones; the clusterer alone at the same batch gives its share of the CrOC step. Eager runs first: what
    --budget_s leaves out is the compiled runs."""
    deadline = time.perf_counter() + args.budget_s
    res = {"shape": label(*args.shape), "batch": args.batch, "steps": args.steps, "warmup_steps": args.warmup_steps,
           "k_start": args.k_start, "k_max": args.k_max, "out_dim": args.out_dim, "out_dim_c": args.out_dim_c,
           "budget_s": args.budget_s, "runs": [], "ratios": [], "status": "incomplete"}
    call = cluster_call(args, args.batch)
    call()
    times = time_interleaved({"cluster": call}, 1 if args.dry else 10, 0 if args.dry else 2, args.device, "cluster")
    res["clusterer_ms"] = median_ms(times["cluster"])
    benches, slowest_ms = {}, 0.0
    for compiled in (False, True):
        for precision in args.precisions:
            skip = (NO_CUDA if compiled and args.dry else "skipped: --compile false" if compiled and not args.compile
                    else None)
            need = 2 * (args.steps + args.warmup_steps) * slowest_ms / 1e3 + (90 if compiled else 0)
            if skip is None and time.perf_counter() + need > deadline:
                skip = f"skipped: --budget_s {args.budget_s:.0f} (needs ~{need:.0f} s more)"
            runs = {}
            for variant, alpha in (("DINO", 0.0), ("CrOC", 1.0)):
                run = {"precision": precision, "compiled": compiled, "variant": variant}
                if skip is None:
                    try:
                        if precision not in benches:
                            benches[precision] = gpu_step_bench(args, precision, args.batch)
                        bench, views, positions = benches[precision]
                        bench.set_compiled(compiled)
                        run.update(train_run(bench, alpha, views, positions, args, deadline))
                        slowest_ms = max(slowest_ms, run["ms_per_step"])
                    except Exception as e:  # an OOM or a compiler failure must not cost the other runs
                        run["status"] = f"failed: {first_line(e)}"
                        skip = f"skipped: the {variant} run failed"  # a compiler failure would only repeat
                    finally:
                        if precision in benches:
                            benches[precision][0].set_compiled(False)
                else:
                    run["status"] = skip
                res["runs"].append(run)
                runs[variant] = run
                write_part(args, "training", res)
            if all(r["status"] == "ok" for r in runs.values()):
                croc = runs["CrOC"]["ms_per_step"]
                res["ratios"].append({"precision": precision, "compiled": compiled,
                                      "croc_over_dino": croc / runs["DINO"]["ms_per_step"],
                                      "clusterer_share_of_croc_step": res["clusterer_ms"] / croc})
    ok = [r for r in res["runs"] if r["status"] == "ok"]
    res["status"] = ("failed: no run finished" if not ok else "non-finite loss" if not all(
        r["loss_finite"] for r in ok) else NO_CUDA + " (fp32 eager skeleton on the CPU)" if args.dry else "ok")
    return res


def gpu_compile(args):
    """Part 4: clustering.cluster eager against torch.compile'd (inductor, fullgraph=True) at the training part's
    shape and batch: the compile time, both times, the official algorithm's, and the compiled call's host syncs."""
    res = {"shape": label(*args.shape), "batch": args.batch}
    if args.dry:  # inductor takes minutes on a CPU: the dry run only checks the part is wired
        return {**res, "status": NO_CUDA}
    (row,) = compiled_clusterer(args, args.shape, [args.batch])
    res.update(row)
    res["status"] = (f"failed: {row['error']}" if "error" in row else "ok" if row["host_syncs"] == 0 else
                     f"{row['host_syncs']} host syncs in the compiled clusterer")
    return res


def gpu_ddp_dry(args):
    """Part 5 without CUDA: skipped (gpu_check.sh runs it on a GPU as torchrun train.py; the CPU/gloo path of
    train.py has tests of its own)."""
    if not args.dry:
        raise ValueError("on a GPU, part 4 runs as torchrun --nproc_per_node=2 train.py --dist_backend BACKEND "
                         "(gpu_check.sh)")
    return {"status": NO_CUDA, "nccl": {"status": NO_CUDA}, "gloo": {"status": NO_CUDA}}


def read_parts(args):
    """The driver's record of each part it ran: {name: {rc, seconds, limit_s}}."""
    parts = {}
    path = os.path.join(args.out, "parts.tsv")
    if os.path.exists(path):
        with open(path) as f:
            for line in f:
                name, rc, seconds, limit = line.split()
                parts[name] = {"rc": int(rc), "seconds": int(seconds), "limit_s": int(limit)}
    return parts


def log_tail(args, name, lines=5):
    path = os.path.join(args.out, f"{name}.log")
    if not os.path.exists(path):
        return []
    with open(path, errors="replace") as f:
        return [line.rstrip() for line in f.readlines()[-lines:]]


def part_status(args, parts, name):
    """Where a part left no JSON: why, from its exit code and log."""
    p = parts.get(name)
    if p is None:
        return {"status": "not run"}
    if p["rc"] in (124, 137):
        return {"status": f"timeout after {p['limit_s']} s", "log_tail": log_tail(args, name)}
    return {"status": f"failed (exit {p['rc']})", "log_tail": log_tail(args, name)}


def read_part(args, parts, name):
    path = os.path.join(args.out, f"{name}.json")
    if not os.path.exists(path):
        return part_status(args, parts, name)
    with open(path) as f:
        res = json.load(f)
    if name in parts and parts[name]["rc"] != 0:  # killed or crashed after writing some of it
        res["status"] = part_status(args, parts, name)["status"] + " (partial results)"
    return res


def gpu_summary(args):
    """Merges the parts into OUT/gpu_check.json and a readable OUT/gpu_check.txt."""
    parts = read_parts(args)
    res = {"date": time.strftime("%Y-%m-%d %H:%M %Z"), "mode": "dry" if args.dry else "gpu",
           "machine": machine_info(args.device), "parts": parts}
    if args.device.type == "cuda":
        nccl = torch.cuda.nccl.version()
        res["machine"]["nccl"] = ".".join(map(str, nccl)) if isinstance(nccl, tuple) else str(nccl)
        res["machine"]["gpu_memory_gib"] = torch.cuda.get_device_properties(0).total_memory / 2 ** 30
    tests = parts.get("tests")
    summary_line = next((line for line in reversed(log_tail(args, "tests", 20)) if " in " in line),
                        "") if tests else ""
    res["tests"] = {"status": "not run" if tests is None else "ok" if tests["rc"] == 0 else
                    part_status(args, parts, "tests")["status"], "pytest": summary_line}
    res["syncs"] = read_part(args, parts, "syncs")
    res["training"] = read_part(args, parts, "training")
    res["compile"] = read_part(args, parts, "compile")
    if os.path.exists(os.path.join(args.out, "ddp.json")):
        res["ddp"] = read_part(args, parts, "ddp")
    else:
        res["ddp"] = {}
        for backend in ("nccl", "gloo"):  # torchrun train.py --dist_backend BACKEND --output_dir OUT/ddp_BACKEND
            name, log = f"ddp_{backend}", os.path.join(args.out, f"ddp_{backend}", "log.txt")
            if parts.get(name, {}).get("rc") == 0 and os.path.exists(log):
                with open(log) as f:
                    res["ddp"][backend] = {"status": "ok", "log": json.loads(f.readlines()[-1])}
            else:
                res["ddp"][backend] = part_status(args, parts, name)
        states = [v["status"] for v in res["ddp"].values()]
        res["ddp"]["status"] = ("ok" if all(s == "ok" for s in states) else "ok on gloo only"
                                if res["ddp"]["gloo"]["status"] == "ok" else "failed")
    text = format_gpu_check(res)
    res["summary"] = text
    with open(os.path.join(args.out, "gpu_check.json"), "w") as f:
        json.dump(res, f, indent=2, default=str)
    with open(os.path.join(args.out, "gpu_check.txt"), "w") as f:
        f.write(text + "\n")
    print(text, flush=True)


def format_gpu_check(res):
    m, t = res["machine"], res["training"]
    out = [f"GPU check, {res['date']}, {res['mode']} run: " + (f"{m['gpu']}, CUDA {m['cuda']}, nccl {m['nccl']}, "
                                                              if "gpu" in m else "no GPU, ")
           + f"torch {m['torch']}, {m['cpu']} ({m['cpu_count']} CPUs)", ""]
    out.append(f"1. Tests that take a device (pytest -k on_device): {res['tests']['status']}; {res['tests']['pytest']}")
    s = res["syncs"]
    out.append(f"2. Host syncs under torch.cuda.set_sync_debug_mode('error'), batch {s.get('batch')}: {s['status']}")
    for name, v in s.items():
        if isinstance(v, dict) and "status" in v:
            sites = ", ".join(sorted(set(v.get("sync_sites", []))))
            out.append(f"   {name}: {v['status']}" + (f"; synchronising lines ('warn'): {sites}" if sites else ""))
    out.append(f"3. Training {t.get('shape')}, batch {t.get('batch')} (two views each), {t.get('steps')} timed "
               f"steps after {t.get('warmup_steps')} warm-up: {t['status']}")
    if t.get("runs"):
        rows = []
        for r in t["runs"]:
            mode = "compiled" if r["compiled"] else "eager"
            if r["status"] == "ok":
                mem = "-" if r["peak_mem_mib"] is None else f"{r['peak_mem_mib']:.0f}"
                rows.append([r["precision"], mode, r["variant"], r["steps"], f"{r['ms_per_step']:.1f}",
                             f"{r['images_per_s']:.0f}", mem, r["loss_finite"],
                             f"{r['loss_first']:.3f} -> {r['loss_last']:.3f}", f"{r['warmup_s']:.1f}", ""])
            else:
                rows.append([r["precision"], mode, r["variant"]] + ["-"] * 7 + [r["status"]])
        out.append(table(["precision", "backbones", "variant", "steps", "ms/step", "images/s", "peak MiB",
                          "loss finite", "loss first -> last", "warm-up s", "  note"], rows))
        for r in t["ratios"]:
            out.append(f"   {r['precision']} {'compiled' if r['compiled'] else 'eager'}: CrOC/DINO "
                       f"{r['croc_over_dino']:.3f}; the clusterer alone ({t['clusterer_ms']:.1f} ms at B = "
                       f"{t['batch']}) is {100 * r['clusterer_share_of_croc_step']:.1f}% of the CrOC step")
        out.append(f"   {PAPER_TABLE_A2}")
    c = res["compile"]
    out.append(f"4. The clusterer torch.compile'd (inductor, fullgraph), {c.get('shape')}, batch {c.get('batch')}: "
               f"{c['status']}")
    if "compiled_ms" in c:
        out.append(f"   eager {c['eager_ms']:.1f} ms, compiled {c['compiled_ms']:.1f} ms ({c['speedup']:.2f}x, "
                   f"compiled in {c['compile_s']:.0f} s, {c['host_syncs']} host syncs, same K and kept: "
                   f"{c['same_k_and_kept']}); with the view centroids {c['compiled_with_centroids_ms']:.1f} ms, the "
                   f"official algorithm {c['official_ms']:.1f} ms ({c['speedup_over_official']:.2f}x)")
    d = res["ddp"]
    out.append(f"5. Two ranks on one GPU (torchrun, train.py): {d.get('status')}")
    for backend in ("nccl", "gloo"):
        v = d.get(backend, {})
        log = v.get("log") or {}
        extra = (f"; loss {log['loss']:.3f}, teacher_sync_error {log['teacher_sync_error']}" if "loss" in log else "")
        out.append(f"   {backend}: {v.get('status')}{extra}")
    out.append("parts (exit code, seconds of the limit): " + ", ".join(
        f"{k} {v['rc']} ({v['seconds']}/{v['limit_s']} s)" for k, v in res["parts"].items()))
    return "\n".join(out)


def gpu_check(args):
    args = gpu_check_setup(args)
    torch.manual_seed(args.seed)
    for part in args.gpu:
        if part == "summary":
            gpu_summary(args)
        else:
            try:
                res = {"syncs": gpu_syncs, "training": gpu_training, "compile": gpu_compile,
                       "ddp": gpu_ddp_dry}[part](args)
            except Exception as e:  # the summary reports it; the other parts still run
                res = {"status": f"failed: {first_line(e)}", "traceback": traceback.format_exc()[-3000:]}
            write_part(args, part, res)
            print(f"{part}: {res['status']}", flush=True)


def main(args):
    args = resolve_args(args)
    config = {k: str(v) if k == "device" else v for k, v in vars(args).items()}
    print("\n".join(f"{k}: {v}" for k, v in sorted(config.items())), flush=True)
    torch.manual_seed(args.seed)
    res = {"machine": machine_info(args.device), "config": config}
    res["steps"] = bench_steps(args)
    res["clusterer"] = bench_clusterer(args, res["steps"])
    if args.compile:
        res["compiled_clusterer"] = compiled_clusterer(args, args.cluster_shape, args.cluster_batches)
    arch, patch, img = args.cluster_shape
    res["clusterer_step"] = f"{label(arch, patch, img)}, batch {args.batch}"
    res["machine"]["load_average_1min_end"] = load_average()
    text = format_results(res)
    print("\n" + text, flush=True)
    if args.json:
        with open(args.json, "w") as f:
            json.dump({**res, "table": text}, f, indent=2, default=str)
    return res


if __name__ == "__main__":
    cli = get_args_parser().parse_args()
    differences(cli) if cli.differences else gpu_check(cli) if cli.gpu else main(cli)
