"""Cost of the energy metrics (DESIGN.md §3), measured side by side in one run.

1. Evaluation overhead: a full-sort RecBole evaluation with and without ``PopEnergy`` +
   ``EmbeddingSpectrum`` (no permutations), alternating runs, median ratio.
   a. ml-100k (shipped with RecBole), the plugin's SASRec, untrained (timing only).
   b. a synthetic catalogue (>= 200k items, >= 10k contexts): a synthetic dot-product model
      evaluated through RecBole's real ``Collector`` + ``Evaluator`` path (top-K, Recall, NDCG)
      with the plugin's collector, because building a RecBole dataset of that size takes
      minutes. Goal: ratio <= 1.05.
2. Permutation test at B=2000 on the 200k-item catalogue: wall time and peak extra memory
   (tracemalloc, numpy allocations; and the process RSS high-water delta). Goals: <= 5 s on
   2 cores, <= 256 MB.
3. Naive dense baseline (builds ``Zc``) at a size where it fits, against the factorised path.

Usage: ``python benchmarks/bench_eval_overhead.py [--quick]``
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import time
import tracemalloc
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import recbole_popprior  # noqa: E402,F401  (shims + metric registration)
from recbole.evaluator import Evaluator  # noqa: E402

from recbole_popprior.evaluator import ContextStats, energy_from_stats  # noqa: E402
from recbole_popprior.evaluator.collector import PopPriorCollector  # noqa: E402

BASE_METRICS = ["Recall", "NDCG"]
ENERGY_METRICS = BASE_METRICS + ["PopEnergy", "EmbeddingSpectrum"]


def _median_ratio(run_base, run_energy, repeats: int) -> tuple[float, float, float]:
    """Alternate the two runs (ABBA order, so neither always goes first); medians of each
    and the median of per-pair ratios."""
    base, energy, ratios = [], [], []
    run_base(), run_energy()  # warm-up

    def timed(run):
        t0 = time.perf_counter()
        run()
        return time.perf_counter() - t0

    for i in range(repeats):
        if i % 2:
            e = timed(run_energy)
            b = timed(run_base)
        else:
            b = timed(run_base)
            e = timed(run_energy)
        base.append(b)
        energy.append(e)
        ratios.append(e / b)
    return statistics.median(base), statistics.median(energy), statistics.median(ratios)


# --- 1a. ml-100k through the real trainer ---------------------------------------------------
def bench_ml100k(repeats: int) -> None:
    from recbole_popprior.config import Config
    from recbole_popprior.quick_start import build_pipeline

    out = tempfile.mkdtemp()
    config = Config(model="SASRec", dataset="ml-100k", config_dict={
        "metrics": ENERGY_METRICS, "valid_metric": "NDCG@10", "topk": [10], "state": "ERROR",
        "show_progress": False, "gpu_id": "", "output": out, "fast_loader": False,
        "hidden_size": 64, "inner_size": 128, "n_layers": 2, "eval_batch_size": 256,
        "loss_type": "CE", "train_neg_sample_args": None, "energy_permutations": 0,
        "eval_args": {"split": {"LS": "valid_and_test"}, "order": "TO", "mode": "full"}})
    pipe = build_pipeline(config, log=False)
    trainer = pipe.trainer
    trainer.eval_collector.data_collect(pipe.train_data)
    collectors = {}
    for name, metrics in (("base", BASE_METRICS), ("energy", ENERGY_METRICS)):
        config["metrics"] = metrics
        collector = PopPriorCollector(config)
        collector.data_collect(pipe.train_data)
        collectors[name] = (collector, Evaluator(config))

    def run(name):
        trainer.eval_collector, trainer.evaluator = collectors[name]
        return trainer.evaluate(pipe.test_data, load_best_model=False)

    result = run("energy")
    assert "pop_dir_frac" in result, result
    b, e, r = _median_ratio(lambda: run("base"), lambda: run("energy"), repeats)
    print(f"[1a] ml-100k SASRec full-sort test eval ({len(pipe.test_data.dataset)} contexts, "
          f"{pipe.dataset.item_num} items): base {b * 1e3:.1f} ms, with energy {e * 1e3:.1f} ms, "
          f"median ratio {r:.3f}  (the trainer shares one forward pass per batch with the factors)")


# --- 1b. synthetic 200k-item catalogue through RecBole's collector/evaluator ---------------
class _Cfg(dict):
    """Minimal RecBole-config stand-in: missing keys read as None."""

    def __getitem__(self, key):
        return self.get(key)


class _DotModel(torch.nn.Module):
    """Synthetic dot-product model: context c -> h_c, score h_c . e_i (with a popularity axis)."""

    def __init__(self, m: int, n_items: int, d: int, log_prior: torch.Tensor):
        super().__init__()
        g = torch.Generator().manual_seed(0)
        self.H = torch.randn(m, d, generator=g)
        self.item_embedding = torch.nn.Embedding(n_items, d)
        with torch.no_grad():
            self.item_embedding.weight.normal_(generator=g)
            lp = log_prior.clone()
            lp[0] = 0.0
            self.item_embedding.weight[:, 0] += 0.5 * (lp - lp[1:].mean())
        self.register_buffer("log_prior", log_prior)
        self.log_prior_windows = None

    def popprior_factors(self, rows):
        return self.H[rows], self.item_embedding.weight

    def full_sort_predict(self, rows):
        return self.H[rows] @ self.item_embedding.weight.T


def _synthetic_prior(n_items: int) -> torch.Tensor:
    rng = np.random.default_rng(1)
    counts = rng.zipf(1.3, size=n_items).astype(np.float64)
    lp = np.log(counts / counts.sum())
    lp[0] = -np.inf
    return torch.from_numpy(lp)


def bench_synthetic(m: int, n_items: int, repeats: int, batch: int = 512) -> None:
    model = _DotModel(m, n_items, 64, _synthetic_prior(n_items)).eval()
    targets = torch.randint(1, n_items, (m,), generator=torch.Generator().manual_seed(2))

    def config(metrics):
        return _Cfg(metrics=metrics, topk=[10], eval_args={"mode": "full"}, device=torch.device("cpu"),
                    metric_decimal_place=4, energy_permutations=0, energy_permutation_stage="test",
                    energy_subspace=0.95, energy_seed=0)

    setups = {name: config(metrics) for name, metrics in (("base", BASE_METRICS), ("energy", ENERGY_METRICS))}

    @torch.no_grad()
    def run(name):
        cfg = setups[name]
        collector, evaluator = PopPriorCollector(cfg), Evaluator(cfg)
        for start in range(0, m, batch):
            rows = torch.arange(start, min(m, start + batch))
            scores = model.full_sort_predict(rows)
            scores[:, 0] = -np.inf
            positive_u = torch.arange(len(rows))
            positive_i = targets[rows]
            collector.eval_batch_collect(scores, None, positive_u, positive_i)
            collector.context_collect(model, rows, scores, positive_u, positive_i)
        collector.model_collect(model)
        return evaluator.evaluate(collector.get_data_struct())

    result = run("energy")
    assert result["pop_contexts"] == m, result
    b, e, r = _median_ratio(lambda: run("base"), lambda: run("energy"), repeats)
    print(f"[1b] synthetic dot-product model, RecBole collector+evaluator ({m} contexts, "
          f"{n_items - 1} items, d=64): base {b:.2f} s, with energy {e:.2f} s, median ratio {r:.3f}")


# --- 2. permutation cost ------------------------------------------------------------------
def _rss_kb(field: str) -> int:
    with open("/proc/self/status") as handle:
        for line in handle:
            if line.startswith(field):
                return int(line.split()[1])
    return 0


def bench_permutations(m: int, n_items: int, B: int, repeats: int) -> None:
    rng = np.random.default_rng(3)
    H = rng.standard_normal((m, 64))
    E = rng.standard_normal((n_items, 64))  # float64 already: the measured extra memory is the test's own
    lp = _synthetic_prior(n_items).numpy()
    stats = ContextStats.from_H(H)
    energy_from_stats(stats, E, lp, permutations=8)  # warm-up
    times0, timesB = [], []
    for _ in range(repeats):
        t0 = time.perf_counter()
        energy_from_stats(stats, E, lp)
        t1 = time.perf_counter()
        energy_from_stats(stats, E, lp, permutations=B, seed=1)
        t2 = time.perf_counter()
        times0.append(t1 - t0)
        timesB.append(t2 - t1)
    tracemalloc.start()
    energy_from_stats(stats, E, lp, permutations=B, seed=1)
    _, peak = tracemalloc.get_traced_memory()
    tracemalloc.stop()
    rss_delta = None
    try:  # reset the RSS high-water mark (Linux), then measure the test alone
        Path("/proc/self/clear_refs").write_text("5")
        before = _rss_kb("VmRSS:")
        energy_from_stats(stats, E, lp, permutations=B, seed=1)
        rss_delta = (_rss_kb("VmHWM:") - before) / 1024
    except OSError:
        pass
    t0, tB = statistics.median(times0), statistics.median(timesB)
    print(f"[2] permutation test, B={B}, {n_items - 1} items, d=64, {torch.get_num_threads()} threads: "
          f"energy alone {t0:.2f} s, with B={B} {tB:.2f} s (permutations {tB - t0:.2f} s, "
          f"{(tB - t0) / B * 1e3:.2f} ms each); peak extra memory {peak / 2**20:.0f} MB (tracemalloc)"
          + (f", RSS high-water delta {rss_delta:.0f} MB" if rss_delta is not None else ""))


# --- 3. naive dense baseline --------------------------------------------------------------
def bench_dense(m: int, n_items: int, B: int) -> None:
    rng = np.random.default_rng(4)
    H = rng.standard_normal((m, 64))
    E = rng.standard_normal((n_items, 64))
    lp = _synthetic_prior(n_items).numpy()
    from recbole_popprior.evaluator.energy import permuted_directions, popularity_direction

    l = popularity_direction(lp)
    t0 = time.perf_counter()
    Zc = H @ E[1:].T
    Zc -= Zc.mean(axis=1, keepdims=True)
    T = float(np.einsum("ij,ij->", Zc, Zc))
    s = Zc @ l
    dense_frac = float(s @ s) / T
    null = [np.sum((Zc @ L.T) ** 2, axis=0) / T for L in permuted_directions(l, B, 1)]
    t1 = time.perf_counter()
    res = energy_from_stats(ContextStats.from_H(H), E, lp, permutations=B, seed=1)
    t2 = time.perf_counter()
    assert abs(res["dir_frac"] - dense_frac) <= 1e-9 * dense_frac
    assert np.allclose(np.concatenate(null).mean(), res["null_mean"], rtol=1e-9)
    print(f"[3] dense Zc baseline ({m} x {n_items - 1}, {Zc.nbytes / 2**20:.0f} MB score matrix, B={B}): "
          f"dense {t1 - t0:.2f} s vs factorised {t2 - t1:.2f} s (ratio {(t1 - t0) / (t2 - t1):.1f}x); "
          f"dense at m=10k, n=200k would need a {10_000 * 200_000 * 8 / 2**30:.0f} GB matrix")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="smaller sizes and fewer repeats")
    args = parser.parse_args()
    repeats = 3 if args.quick else 5
    print(f"torch threads {torch.get_num_threads()}, cpus {os.cpu_count()}, load {os.getloadavg()[0]:.2f}")
    bench_ml100k(repeats)
    if args.quick:
        bench_synthetic(m=2_000, n_items=200_001, repeats=repeats)
    else:
        bench_synthetic(m=10_000, n_items=200_001, repeats=repeats)
    bench_permutations(m=10_000, n_items=200_001, B=200 if args.quick else 2000, repeats=1 if args.quick else 3)
    bench_dense(m=1_000, n_items=20_001, B=100)
    print(f"load at end {os.getloadavg()[0]:.2f}")


if __name__ == "__main__":
    main()
