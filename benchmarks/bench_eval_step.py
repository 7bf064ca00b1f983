# Over 500 lines: both evaluation paths written out part by part, beside the floors, the low-precision table and the trainer batch.
"""One full-sort evaluation chunk at the headline shape, part by part: RecBole's path against the plugin's.

    python benchmarks/bench_eval_step.py [--quick] [--items 731000] [--rows 256] [--batch 4096] [--repeats 7]
                                         [--mallopt] [--sweep]

The chunk: ``rows`` contexts ``H [rows, 64]`` scored against ``E [items, 64]`` with a serving prior
``beta log p_hat`` (Zipf-shaped counts), one positive per context, history masks of realistic
lengths (lognormal, median 60 items: the Tianchi log holds about 100 events per user; sequential
models mask only the padding column, general models mask the history too), top-10, and the
metrics' collection for Recall/NDCG/MRR/Hit/Precision/MAP (``rec.topk``) and ItemCoverage
(``rec.items``). The encoder forward that makes ``H`` is the same in both paths and not timed here
(``bench_scale.py``'s evaluate phase times whole evaluations, forward included).

- **RecBole's path** (the plugin's evaluation before this change): ``H @ E.T`` into a fresh
  matrix, ``+ beta log p`` into another, RecBole's masks, and RecBole's own
  ``Collector.eval_batch_collect`` (``torch.topk`` once for ``rec.items`` and once for
  ``rec.topk``, an int ``pos_matrix`` of ``[rows, items]``, its row sums and a gather).
- **The plugin's path**: ``torch.matmul(H, E.T, out=buffer)`` into a buffer kept between chunks,
  the prior added in place, the same masks, and ``PopPriorCollector.eval_batch_collect`` (one
  exact two-stage top-k, hits read at the top-k indices).

Each part is timed in both paths, the two paths interleaved (ABBA), medians over ``--repeats``;
the collector line is the real method call, its top-k / hits split beside it. Each part is shown
beside a floor from this machine's measured rates: matmul GFLOP/s of a compute-bound 2048^3 float32
GEMM (the matmul's floor is the larger of its FLOPs at that rate and its output at the write
bandwidth), and the memory bandwidth of a read pass, a write pass and a copy over a
``[rows, items]`` float32 matrix (history masking: one cache line per masked entry). ``peak`` is the exact count of tensor bytes one chunk holds at
once (:class:`recbole_popprior.memory.TensorPeak`), plus torch.topk's per-thread work vector
(16 bytes per item, which no tensor shows). ``--sweep`` times the plugin's chunk per context over
chunk sizes, and ``exact_topk`` over block sizes.

Then one whole evaluation batch (``--batch`` contexts) through the plugin's trainer, the SASRec
encoder forward included, against :func:`previous_evaluation` (the plugin's evaluation before the
fast path: RecBole's ``_full_sort_batch_eval`` and ``Collector`` in chunks of ``budget / (4 n)``
contexts), with the contexts per second extrapolated to the 988k users of the Tianchi log. The
machine is shared: read the ratios.
"""

from __future__ import annotations

import argparse
import ctypes
import os
import statistics
import sys
import time
from pathlib import Path
from typing import Callable

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import recbole_popprior  # noqa: E402,F401  (shims + metric registration)
from recbole.evaluator.collector import Collector  # noqa: E402

from recbole_popprior.compat import FixedCollector  # noqa: E402
from recbole_popprior.evaluator import topk as topk_module  # noqa: E402
from recbole_popprior.evaluator.collector import PopPriorCollector  # noqa: E402
from recbole_popprior.evaluator.full_sort import mask_scores  # noqa: E402
from recbole_popprior.evaluator.topk import candidate_topk, exact_topk, topk_hits  # noqa: E402
from recbole_popprior.memory import TensorPeak  # noqa: E402
from recbole_popprior.model.mixin import prior_term  # noqa: E402
from recbole_popprior.prior import estimate_log_prior  # noqa: E402

D, K, BETA, USERS = 64, 10, 1.0, 988_000
METRICS = ["Recall", "NDCG", "MRR", "Hit", "Precision", "MAP", "ItemCoverage"]
PARTS = ("matmul", "prior add", "history mask", "top-k", "hits / metrics")


def _timed(fn: Callable[[], object]) -> float:
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


def _median(fn: Callable[[], object], repeats: int) -> float:
    fn()
    return statistics.median(_timed(fn) for _ in range(repeats))


def machine_rates(rows: int, items: int, repeats: int) -> dict[str, float]:
    """Matmul GFLOP/s (a 2048^3 float32 GEMM: compute-bound) and read / write / copy GB/s over a
    chunk-sized matrix."""
    A = torch.randn(2048, 2048)
    out = torch.empty(2048, 2048)
    t = _median(lambda: torch.matmul(A, A, out=out), repeats + 2)
    big, other = torch.randn(rows, items), torch.empty(rows, items)
    nbytes = big.numel() * 4
    read = _median(lambda: big.sum(), repeats)
    write = _median(lambda: other.fill_(1.0), repeats)
    copy = _median(lambda: other.copy_(big), repeats)
    return {"gflops": 2 * 2048**3 / t / 1e9, "read_gbs": nbytes / read / 1e9,
            "write_gbs": nbytes / write / 1e9, "copy_gbs": 2 * nbytes / copy / 1e9}


def floors(rows: int, items: int, rates: dict[str, float], history: int) -> dict[str, float]:
    """Seconds each part needs at least: FLOPs at the GEMM rate, bytes at the bandwidths."""
    nbytes = rows * items * 4
    return {"matmul": max(2 * rows * items * D / rates["gflops"] / 1e9, nbytes / rates["write_gbs"] / 1e9),
            "prior add": 2 * nbytes / rates["copy_gbs"] / 1e9,
            "history mask": (rows + history) * 64 / rates["write_gbs"] / 1e9,  # a cache line per entry
            "top-k": nbytes / rates["read_gbs"] / 1e9,
            "hits / metrics": 0.0}


def zipf_log_prior(items: int, g: torch.Generator) -> torch.Tensor:
    """The plugin's log prior of 100M Zipf(1.1) targets over ``items`` (padding -inf)."""
    ranks = torch.arange(1, items + 1, dtype=torch.float64)
    counts = torch.poisson((1e8 / ranks**1.1 / (1 / ranks**1.1).sum()).float(), generator=g)
    return estimate_log_prior(torch.repeat_interleave(torch.arange(items), counts.long()), items)


class Chunk:
    """The inputs of one chunk, and the two ways of processing it."""

    def __init__(self, rows: int, items: int, seed: int = 0) -> None:
        g = torch.Generator().manual_seed(seed)
        self.rows, self.items = rows, items
        self.H = torch.randn(rows, D, generator=g)
        self.E = torch.randn(items, D, generator=g) * 0.3
        self.term = prior_term(zipf_log_prior(items, g), BETA)
        lengths = torch.exp(torch.randn(rows, generator=g) * 0.8 + 4.1).long().clamp(5, 2000)
        self.history = (torch.repeat_interleave(torch.arange(rows), lengths),
                        torch.randint(1, items, (int(lengths.sum()),), generator=g))
        self.positive_u = torch.arange(rows)
        self.positive_i = torch.randint(1, items, (rows,), generator=g)
        self.buffer = torch.empty(rows, items)
        config = {"eval_args": {"mode": {"valid": "full", "test": "full"}}, "topk": [K], "device": torch.device("cpu"),
                  "metrics": METRICS, "energy_permutations": 0, "energy_permutation_stage": "test",
                  "energy_max_contexts": None, "energy_subspace": 0.95, "energy_seed": 0}
        self.recbole, self.plugin = FixedCollector(config), PopPriorCollector(config)

    def mask(self, scores: torch.Tensor) -> None:  # RecBole's masks
        scores[:, 0] = -torch.inf
        scores[self.history] = -torch.inf

    # RecBole's path, part by part (its collector's code in order), and as one call
    def recbole_parts(self) -> tuple[dict[str, float], torch.Tensor]:
        t, out = {}, {}
        t["matmul"] = _timed(lambda: out.setdefault("s", self.H @ self.E.T))
        t["prior add"] = _timed(lambda: out.__setitem__("s", out["s"] + self.term))
        scores = out["s"]
        t["history mask"] = _timed(lambda: self.mask(scores))

        def topk_twice():  # rec.items, then rec.topk
            torch.topk(scores, K, dim=-1)
            out["top"] = torch.topk(scores, K, dim=-1).indices

        t["top-k"] = _timed(topk_twice)

        def hits():
            pos_matrix = torch.zeros_like(scores, dtype=torch.int)
            pos_matrix[self.positive_u, self.positive_i] = 1
            pos_len = pos_matrix.sum(dim=1, keepdim=True)
            out["hits"] = torch.cat((torch.gather(pos_matrix, 1, out["top"]), pos_len), dim=1)

        t["hits / metrics"] = _timed(hits)
        return t, out["hits"]

    def plugin_parts(self) -> tuple[dict[str, float], torch.Tensor]:
        t, out = {}, {}
        scores = self.buffer
        t["matmul"] = _timed(lambda: torch.matmul(self.H, self.E.T, out=scores))
        t["prior add"] = _timed(lambda: scores.add_(self.term))
        t["history mask"] = _timed(lambda: mask_scores(scores, self.history))
        t["top-k"] = _timed(lambda: out.setdefault("top", exact_topk(scores, K)))
        t["hits / metrics"] = _timed(lambda: out.setdefault(
            "hits", topk_hits(out["top"], self.positive_u, self.positive_i, self.items)))
        return t, out["hits"]

    def low_parts(self, dtype: torch.dtype) -> tuple[dict[str, float], torch.Tensor, torch.Tensor]:
        """``eval_score_dtype``'s chunk (FullSortScorer.score_topk's steps): the matmul, prior and
        masks in ``dtype``, 4k + 32 candidates, their float32 re-scoring; and the coarse top-k."""
        t, out = {}, {}
        if not hasattr(self, "low"):
            self.low = {}
        if dtype not in self.low:
            self.low[dtype] = (torch.empty(self.rows, self.items, dtype=dtype), self.E.to(dtype),
                               self.term.to(dtype))
        scores, E_low, term_low = self.low[dtype]
        t["matmul"] = _timed(lambda: torch.matmul(self.H.to(dtype), E_low.T, out=scores))
        t["prior add"] = _timed(lambda: scores.add_(term_low))
        t["history mask"] = _timed(lambda: mask_scores(scores, self.history))

        def rerank():
            candidates = candidate_topk(scores, 4 * K + 32)
            exact = torch.bmm(self.E[candidates], self.H.unsqueeze(-1)).squeeze(-1).add_(self.term[candidates])
            exact.masked_fill_(scores.gather(1, candidates) == -torch.inf, -torch.inf)
            out["top"] = candidates.gather(1, torch.topk(exact, K, dim=-1).indices)

        t["top-k"] = _timed(rerank)
        t["hits / metrics"] = _timed(lambda: topk_hits(out["top"], self.positive_u, self.positive_i, self.items))
        coarse = candidate_topk(scores, K)
        return t, out["top"], coarse

    def recbole_chunk(self) -> None:
        scores = self.H @ self.E.T + self.term
        self.mask(scores)
        Collector.eval_batch_collect(self.recbole, scores, None, self.positive_u, self.positive_i)
        self.recbole.data_struct._data_dict.clear()

    def plugin_chunk(self, buffer: torch.Tensor | None = None) -> None:
        scores = torch.matmul(self.H, self.E.T, out=self.buffer if buffer is None else buffer).add_(self.term)
        mask_scores(scores, self.history)
        self.plugin.eval_batch_collect(scores, None, self.positive_u, self.positive_i)
        self.plugin._parts.clear()

    def collect_times(self) -> tuple[float, float]:
        """The collectors' real calls on the same masked scores (RecBole's, the plugin's)."""
        scores = torch.matmul(self.H, self.E.T, out=self.buffer).add_(self.term)
        self.mask(scores)

        def recbole():
            Collector.eval_batch_collect(self.recbole, scores, None, self.positive_u, self.positive_i)
            self.recbole.data_struct._data_dict.clear()

        def plugin():
            self.plugin.eval_batch_collect(scores, None, self.positive_u, self.positive_i)
            self.plugin._parts.clear()

        return _timed(recbole), _timed(plugin)


def previous_evaluation(trainer) -> None:
    """Give ``trainer`` the plugin's full-sort evaluation as it was before its fast path (for
    side-by-side ratios; bench_scale.py uses it too): chunks of ``eval_score_budget_mb /
    (4 n_items)`` contexts, each scored by RecBole's own ``Trainer._full_sort_batch_eval`` (a fresh
    score matrix, the prior added out of place) and collected by RecBole's own
    ``Collector.eval_batch_collect`` (top-k twice, an int pos_matrix)."""
    from recbole.trainer.trainer import Trainer

    from recbole_popprior.trainer import reuse_forward, split_full_sort_batch

    model, collector = trainer.model, trainer.eval_collector

    def add_serving_prior(scores, items=None):  # out of place, as it was (evaluation only)
        term = model.serving_prior_term(scores.shape[-1], scores)
        return scores if term is None else scores + term

    def batch_eval(batched_data):
        rows = max(1, int(trainer.eval_score_budget // (4 * trainer.tot_item_num)))
        model.add_serving_prior = add_serving_prior
        try:
            for interaction, history, positive_u, positive_i in split_full_sort_batch(batched_data, rows):
                interaction = interaction.to(trainer.device)
                with reuse_forward(model):
                    _, scores, _, _ = Trainer._full_sort_batch_eval(trainer, (interaction, history, positive_u,
                                                                              positive_i))
                    collector.context_collect(model, interaction, scores, positive_u, positive_i)
                Collector.eval_batch_collect(collector, scores, interaction, positive_u, positive_i)
        finally:
            del model.add_serving_prior
        return batched_data[0], None, batched_data[2], batched_data[3]

    trainer._full_sort_batch_eval = batch_eval


def headline_trainers(items: int, workdir: str, threads: int) -> tuple:
    """The plugin's SASRec at RecBole's defaults (hidden 64, 2 layers, 2 heads, length 50) with a
    ``items``-row item table and a Zipf prior, and two of the plugin's trainers on it: the plugin's
    evaluation and :func:`previous_evaluation`. The dataset is a tiny generated log; only the item
    table and the prior take the headline size (building a RecBole dataset of 731k items takes minutes)."""
    from recbole_popprior.quick_start import build_config, build_pipeline

    data = Path(workdir) / "data" / "headline"
    data.mkdir(parents=True, exist_ok=True)
    g = torch.Generator().manual_seed(0)
    with open(data / "headline.inter", "w", encoding="utf-8") as handle:
        handle.write("user_id:token\titem_id:token\ttimestamp:float\n")
        for u in range(1, 201):
            for t, i in enumerate(torch.randint(1, 500, (12,), generator=g).tolist()):
                handle.write(f"{u}\t{i}\t{1000 * u + t}\n")
    config = build_config("SASRec", "headline", config_dict={
        "data_path": str(data.parent), "output": str(Path(workdir) / "runs"), "gpu_id": "", "state": "ERROR",
        "show_progress": False, "metrics": METRICS, "topk": [K], "valid_metric": "NDCG@10", "epochs": 1,
        "MAX_ITEM_LIST_LENGTH": 50, "eval_batch_size": 4096})
    pipe = build_pipeline(config, log=False)
    model = pipe.model.eval()
    with torch.no_grad():
        model.item_embedding = torch.nn.Embedding(items, model.hidden_size, padding_idx=0)
        model.item_embedding.weight.normal_(0, 0.3, generator=g)
        model.log_prior = zipf_log_prior(items, g)
    model._term_cache.clear()
    torch.set_num_threads(threads)
    trainer_class = type(pipe.trainer)
    trainers = {"previous": trainer_class(config, model), "plugin": pipe.trainer,
                "plugin bfloat16": trainer_class(config, model)}
    previous_evaluation(trainers["previous"])
    trainers["plugin bfloat16"].eval_score_dtype = torch.bfloat16
    for trainer in trainers.values():
        trainer.tot_item_num = items
    return model, trainers


def headline_batch(model, rows: int, items: int, seed: int = 0) -> tuple:
    """One sequential full-sort batch: histories of lognormal length (median 30, at most 50)."""
    from recbole.data.interaction import Interaction

    g = torch.Generator().manual_seed(seed)
    lengths = torch.exp(torch.randn(rows, generator=g) * 0.7 + 3.4).long().clamp(1, 50)
    seq = torch.randint(1, items, (rows, 50), generator=g)
    seq[torch.arange(50).unsqueeze(0) >= lengths.unsqueeze(1)] = 0
    targets = torch.randint(1, items, (rows,), generator=g)
    interaction = Interaction({model.USER_ID: torch.arange(1, rows + 1), model.ITEM_SEQ: seq,
                               model.ITEM_SEQ_LEN: lengths, model.POS_ITEM_ID: targets})
    return interaction, None, torch.arange(rows), targets


def _topk_of(trainer) -> torch.Tensor:
    """The rec.topk rows the trainer's collector holds (and clear them)."""
    collector = trainer.eval_collector
    if "rec.topk" in collector.data_struct:  # RecBole's collector (the previous path)
        rows = collector.data_struct["rec.topk"]
    else:
        rows = torch.cat(collector._parts["rec.topk"])
    collector._parts.clear()
    collector.data_struct._data_dict.clear()
    return rows


def run_batches(items: int, rows: int, repeats: int, threads: int) -> None:
    """One evaluation batch through the trainer, forward included: the previous path, the plugin's and
    the plugin's with ``eval_score_dtype: bfloat16``, interleaved, medians; the collected rec.topk of
    the previous and the plugin's paths must be equal."""
    import tempfile

    with tempfile.TemporaryDirectory() as workdir, torch.no_grad():
        model, trainers = headline_trainers(items, workdir, threads)
        batch = headline_batch(model, rows, items)
        names = list(trainers)
        times: dict[str, list[float]] = {name: [] for name in names}
        forward, peaks, agreement = [], {}, None
        for i in range(repeats + 1):
            hits = {}
            for name in names if i % 2 == 0 else names[::-1]:
                trainer = trainers[name]
                if i == 0:  # warm-up; the plugin measures its first chunks (once per evaluation)
                    trainer._full_sort = None
                    with TensorPeak() as peak:
                        trainer._full_sort_batch_eval(batch)
                    peaks[name] = peak.peak
                else:
                    times[name].append(_timed(lambda: trainer._full_sort_batch_eval(batch)))
                hits[name] = _topk_of(trainer)
            if not torch.equal(hits["plugin"], hits["previous"]):
                raise SystemExit("the plugin's evaluation disagrees with the previous one on rec.topk")
            agreement = float((hits["plugin bfloat16"] == hits["plugin"]).all(dim=1).double().mean())
            forward.append(_timed(lambda: model.forward(batch[0][model.ITEM_SEQ], batch[0][model.ITEM_SEQ_LEN])))
        med = {name: statistics.median(times[name]) for name in names}
        plan = trainers["plugin"]._full_sort[1]
        print(f"\none evaluation batch through the trainer, forward included: {rows} contexts x {items:,} items, "
              f"SASRec (hidden 64, 2 layers, length 50), Recall/NDCG/MRR/Hit/Precision/MAP/ItemCoverage@{K}; "
              f"medians of {repeats}, interleaved")
        print(f"| path | s per batch | contexts/s | {USERS:,} contexts | speed-up | peak (exact tensor count) |")
        print("|---|---:|---:|---:|---:|---:|")
        for name in names:
            print(f"| {name} | {med[name]:,.1f} | {rows / med[name]:,.0f} | {USERS / rows * med[name] / 60:,.0f} min | "
                  f"{med['previous'] / med[name]:.2f}x | {peaks[name] / 2**20:,.0f} MB |")
        print(f"the encoder forward alone: {statistics.median(forward):,.1f} s of each batch; the plugin's chunks: "
              f"{plan.rows} contexts (budget {trainers['plugin'].eval_score_budget / 2**20:.0f} MB, measured "
              f"{plan.per_row / 2**20:.2f} MB per context + {plan.fixed / 2**20:.0f} MB), the previous path's: "
              f"{int(trainers['previous'].eval_score_budget // (4 * items))} contexts; bfloat16 hit rows equal to "
              f"float32's: {100 * agreement:.2f}%")


def peak_bytes(fn: Callable[[], object]) -> int:
    with TensorPeak() as peak:
        fn()
    return peak.peak


def run_table(chunk: Chunk, repeats: int, rates: dict[str, float]) -> dict[str, dict]:
    recbole_t: dict[str, list[float]] = {p: [] for p in PARTS}
    plugin_t: dict[str, list[float]] = {p: [] for p in PARTS}
    collect: dict[str, list[float]] = {"recbole": [], "plugin": []}
    chunk.recbole_parts(), chunk.plugin_parts()  # warm-up (and the buffer's pages)
    for i in range(repeats):
        order = (chunk.recbole_parts, chunk.plugin_parts) if i % 2 == 0 else (chunk.plugin_parts, chunk.recbole_parts)
        for fn in order:
            times, hits = fn()
            target = recbole_t if fn == chunk.recbole_parts else plugin_t
            for part, value in times.items():
                target[part].append(value)
            if fn == chunk.recbole_parts:
                ref_hits = hits
            else:
                ours = hits
        if not torch.equal(ours, ref_hits):
            raise SystemExit("the two paths disagree on rec.topk: not a benchmark of the same result")
        r, p = chunk.collect_times()
        collect["recbole"].append(r)
        collect["plugin"].append(p)
    med = lambda d: {k: statistics.median(v) for k, v in d.items()}  # noqa: E731
    return {"recbole": med(recbole_t), "plugin": med(plugin_t), "collect": med(collect),
            "floor": floors(chunk.rows, chunk.items, rates, len(chunk.history[0]))}


def _agreement(a: torch.Tensor, b: torch.Tensor) -> tuple[float, float]:
    """(share of top-k items in common, share of (row, rank) entries equal)."""
    common = sum(len(set(x.tolist()) & set(y.tolist())) for x, y in zip(a, b)) / a.numel()
    return common, float((a == b).double().mean())


def run_low(chunk: Chunk, repeats: int, dtypes: list[torch.dtype]) -> None:
    """eval_score_dtype against the exact float32 path on the same chunk: time and top-10 agreement."""
    exact = exact_topk(mask_scores(torch.matmul(chunk.H, chunk.E.T, out=chunk.buffer).add_(chunk.term),
                                   chunk.history), K)
    times: dict[str, list[float]] = {"float32": []}
    parts: dict[str, dict[str, list[float]]] = {}
    agreement = {}
    for dtype in dtypes:
        name = str(dtype).replace("torch.", "")
        times[name], parts[name] = [], {p: [] for p in PARTS}
        _, top, coarse = chunk.low_parts(dtype)
        agreement[name] = (_agreement(top, exact), _agreement(coarse, exact))
    chunk.plugin_parts()
    for i in range(repeats):
        order = [None, *dtypes]
        for dtype in order if i % 2 == 0 else order[::-1]:
            if dtype is None:
                times["float32"].append(sum(chunk.plugin_parts()[0].values()))
                continue
            name = str(dtype).replace("torch.", "")
            t = chunk.low_parts(dtype)[0]
            times[name].append(sum(t.values()))
            for part, value in t.items():
                parts[name][part].append(value)
    base = statistics.median(times["float32"])
    print(f"\neval_score_dtype on the same chunk ({chunk.rows} x {chunk.items:,}); medians in ms; agreement with "
          f"the exact float32 top-{K}: items in common / (context, rank) entries equal")
    print("| scoring dtype | matmul | prior add | mask | top-k (+ re-rank) | chunk | vs float32 | agreement "
          "| without the re-rank |")
    print("|---|---:|---:|---:|---:|---:|---:|---:|---:|")
    print(f"| float32 (exact) | | | | | {base * 1e3:,.0f} | 1.00x | 100% | |")
    for name, (with_rerank, coarse) in agreement.items():
        p = {k: statistics.median(v) * 1e3 for k, v in parts[name].items()}
        total = statistics.median(times[name])
        print(f"| {name} | {p['matmul']:,.0f} | {p['prior add']:,.0f} | {p['history mask']:,.0f} | "
              f"{p['top-k']:,.0f} | {total * 1e3:,.0f} | {base / total:.2f}x | {100 * with_rerank[0]:.2f}% / "
              f"{100 * with_rerank[1]:.2f}% | {100 * coarse[0]:.2f}% / {100 * coarse[1]:.2f}% |")


def print_table(result: dict, rows: int, items: int) -> None:
    rb, pl, fl = result["recbole"], result["plugin"], result["floor"]
    tr, tp = sum(rb.values()), sum(pl.values())
    print(f"\none chunk: {rows} contexts x {items:,} items, d={D}, top-{K}, "
          f"{result['history']:,} history entries; medians in ms")
    print(f"| part | RecBole's path | % | plugin | % | floor | plugin / floor | speed-up |")
    print("|---|---:|---:|---:|---:|---:|---:|---:|")
    for part in PARTS:
        ratio = f"{pl[part] / fl[part]:.1f}x" if fl[part] > 1e-5 else "-"
        print(f"| {part} | {rb[part] * 1e3:,.1f} | {100 * rb[part] / tr:.0f}% | {pl[part] * 1e3:,.1f} | "
              f"{100 * pl[part] / tp:.0f}% | {fl[part] * 1e3:,.2f} | {ratio} | {rb[part] / pl[part]:.2f}x |")
    print(f"| **chunk** | **{tr * 1e3:,.0f}** | | **{tp * 1e3:,.0f}** | | {sum(fl.values()) * 1e3:,.0f} | "
          f"{tp / sum(fl.values()):.2f}x | **{tr / tp:.2f}x** |")
    c = result["collect"]
    print(f"collector call alone (same masked scores): RecBole's Collector.eval_batch_collect "
          f"{c['recbole'] * 1e3:,.0f} ms, the plugin's {c['plugin'] * 1e3:,.0f} ms ({c['recbole'] / c['plugin']:.2f}x)")
    for name, total in (("RecBole's path", tr), ("plugin", tp)):
        print(f"{name}: {rows / total:,.0f} contexts/s; {USERS:,} test contexts -> "
              f"{USERS / rows * total / 60:,.1f} min of scoring and collection (forward excluded)")


def sweep(items: int, repeats: int) -> None:
    """The plugin's chunk per context over chunk sizes; exact_topk over block sizes."""
    print(f"\nchunk size sweep (plugin path, {items:,} items): ms per context, medians, interleaved")
    sizes = [16, 64, 128, 256, 512]
    chunks = {r: Chunk(r, items, seed=r) for r in sizes}
    times: dict[int, list[float]] = {r: [] for r in sizes}
    for r in sizes:
        chunks[r].plugin_chunk()
    for i in range(repeats):
        for r in (sizes if i % 2 == 0 else sizes[::-1]):
            times[r].append(_timed(chunks[r].plugin_chunk) / r)
    print("| rows | " + " | ".join(str(r) for r in sizes) + " |")
    print("|---|" + "---:|" * len(sizes))
    print("| ms/context | " + " | ".join(f"{statistics.median(times[r]) * 1e3:.2f}" for r in sizes) + " |")
    del chunks
    chunk = Chunk(256, items)
    scores = torch.matmul(chunk.H, chunk.E.T, out=chunk.buffer).add_(chunk.term)
    blocks = [128, 256, 512, 1024, 2048]
    bt: dict[int, list[float]] = {b: [] for b in blocks}
    ref = torch.topk(scores, K, dim=-1)
    bt_ref: list[float] = []
    for i in range(repeats):
        for b in (blocks if i % 2 == 0 else blocks[::-1]):
            bt[b].append(_timed(lambda: exact_topk(scores, K, block=b)))
        bt_ref.append(_timed(lambda: torch.topk(scores, K, dim=-1)))
    assert torch.equal(exact_topk(scores, K, block=topk_module.BLOCK), ref.indices)
    print(f"\nexact_topk block size, 256 x {items:,}: ms (torch.topk: {statistics.median(bt_ref) * 1e3:.0f} ms)")
    print("| block | " + " | ".join(str(b) for b in blocks) + " |")
    print("|---|" + "---:|" * len(blocks))
    print("| ms | " + " | ".join(f"{statistics.median(bt[b]) * 1e3:.0f}" for b in blocks) + " |")


def apply_mallopt() -> None:
    """glibc: no mmap for large blocks, no trimming (what the plugin's start-up tuning does)."""
    libc = ctypes.CDLL("libc.so.6")
    m_trim_threshold, m_mmap_threshold = -1, -3
    libc.mallopt(m_mmap_threshold, 2**30)
    libc.mallopt(m_trim_threshold, 2**31 - 1)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--items", type=int, default=731_000)
    parser.add_argument("--rows", type=int, default=256, help="contexts per chunk")
    parser.add_argument("--repeats", type=int, default=7)
    parser.add_argument("--batch", type=int, default=4096, help="contexts of the trainer batch (0: skip it)")
    parser.add_argument("--quick", action="store_true",
                        help="2 repeats, 128-context chunk, 256-context batch (under 2 minutes on an idle machine)")
    parser.add_argument("--mallopt", action="store_true", help="tune glibc malloc first (no mmap, no trim)")
    parser.add_argument("--sweep", action="store_true", help="also sweep chunk and block sizes")
    parser.add_argument("--threads", type=int, default=os.cpu_count() or 1)
    args = parser.parse_args()
    repeats = 2 if args.quick else args.repeats
    if args.quick:
        args.rows, args.batch = min(args.rows, 128), min(args.batch, 256)
    if args.mallopt:
        apply_mallopt()
    torch.set_num_threads(args.threads)
    print(f"{os.cpu_count()} CPUs, {args.threads} torch threads, load average {os.getloadavg()[0]:.1f}, "
          f"malloc {'tuned' if args.mallopt else 'default'}")
    rates = machine_rates(args.rows, args.items, repeats)
    print(f"measured: matmul {rates['gflops']:.0f} GFLOP/s (2048^3 float32 GEMM); memory: read "
          f"{rates['read_gbs']:.1f} GB/s, write {rates['write_gbs']:.1f} GB/s, copy {rates['copy_gbs']:.1f} GB/s "
          f"(bytes moved) over {args.rows * args.items * 4 / 2**20:,.0f} MB")
    chunk = Chunk(args.rows, args.items)
    with torch.no_grad():
        result = run_table(chunk, repeats, rates)
        result["history"] = len(chunk.history[0])
        print_table(result, args.rows, args.items)
        scratch = torch.get_num_threads() * args.items * 16
        rb_peak, pl_peak = peak_bytes(chunk.recbole_chunk), peak_bytes(lambda: chunk.plugin_chunk(
            torch.empty(args.rows, args.items)))  # a fresh buffer: the chunk's own bytes
        scores_mb = args.rows * args.items * 4 / 2**20
        print(f"peak of one chunk (exact tensor count + {scratch / 2**20:.0f} MB torch.topk work vectors): "
              f"RecBole's path {(rb_peak + scratch) / 2**20:,.0f} MB = {(rb_peak + scratch) / 2**20 / scores_mb:.2f} "
              f"score matrices, plugin {(pl_peak + scratch) / 2**20:,.0f} MB = "
              f"{(pl_peak + scratch) / 2**20 / scores_mb:.2f} score matrices ({scores_mb:,.0f} MB each)")
        run_low(chunk, repeats, [torch.bfloat16, torch.float16])
        del chunk
        if args.batch:
            run_batches(args.items, args.batch, max(1, repeats // 2) if not args.quick else 1, args.threads)
        if args.sweep:
            sweep(args.items, repeats)


if __name__ == "__main__":
    main()
