"""bench.py: the quick mode runs in seconds and prints the full table; the operator counter counts the clusterer.

    python -m pytest -q test_bench.py
(to be merged into test_croc.py)
"""
import json
import math
import os
import subprocess
import sys

import torch

import bench
import clustering

BENCH_DIR = os.path.dirname(os.path.abspath(__file__))


def test_bench_quick_runs_in_seconds_and_prints_every_section(tmp_path):
    out = tmp_path / "bench.json"
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1")
    proc = subprocess.run([sys.executable, "bench.py", "--quick", "--json", str(out)], cwd=BENCH_DIR, env=env,
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    for expected in ("machine:", "1. Training step", "ViT-Ti/16 64", "ViT-Ti/8 32", "CrOC/DINO", "goal: CrOC/DINO",
                     "2. Clusterer alone", "top-level aten ops", "host syncs", "official clusterer: ~2,000",
                     "3. GPU throughput"):
        assert expected in proc.stdout, expected
    res = json.loads(out.read_text())
    assert [r["model"] for r in res["steps"]] == ["ViT-Ti/16 64", "ViT-Ti/8 32"]
    for row in res["steps"]:
        assert row["dino_ms"] > 0 and row["croc_ms"] > 0 and math.isfinite(row["ratio"])
        assert row["dino_mem_mib"] > 0 and row["croc_mem_mib"] > 0
    assert [r["batch"] for r in res["clusterer"]] == [1, 2]
    assert res["clusterer"][1]["share_of_step"] is not None  # B = 2 matches the quick step batch
    assert res["machine"]["torch"] == torch.__version__ and res["machine"]["cpu"]


def test_bench_op_counter_counts_the_clusterer_and_no_host_syncs_on_cpu():
    device = torch.device("cpu")
    tokens, positions, cls = bench.cluster_inputs(1, "vit_tiny", 8, 32, device, seed=0)  # P = 3, 2N = 32, d = 64

    def call():
        clustering.cluster(tokens, positions, cls, k_start=4, generator=torch.Generator().manual_seed(0))
    counts = bench.count_ops(call, device)
    assert 0 < counts["top_level_view_ops"] < counts["top_level_aten_ops"] <= counts["all_aten_ops"]
    assert bench.count_syncs(call, device) == 0
