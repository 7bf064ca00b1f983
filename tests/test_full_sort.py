"""Full-sort evaluation's fast path (docs/DESIGN.md §3, §3.3) against RecBole's own path.

- ``exact_topk`` is ``torch.topk``, indices and tie order included, on adversarial scores (ties,
  ``-inf`` rows, NaN, signed zeros), and numpy's stable argsort where the top-k is unique;
- the plugin's collector fills ``rec.items`` / ``rec.topk`` / ``rec.meanrank`` exactly as
  RecBole's ``Collector``, dtype included, so every RecBole metric is identical;
- a whole evaluation through the plugin's trainer equals RecBole's own ``Trainer`` (its
  ``_full_sort_batch_eval`` and its collector) on the same model, bit for bit, for a
  prior-separated model, RecBole's own model, a model scored by its own ``full_sort_predict``
  and one without a dot-product score, with and without ties;
- the peak memory of a scoring chunk, counted from the allocator's events (torch's profiler),
  stays under ``eval_score_budget_mb``, where sizing by the scores alone would not.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from recbole.evaluator import Evaluator
from recbole.trainer import Trainer
from torch.profiler import ProfilerActivity, profile, record_function

from recbole_popprior.compat import FixedCollector
from recbole_popprior.evaluator import topk as topk_module
from recbole_popprior.evaluator.collector import PopPriorCollector
from recbole_popprior.evaluator.full_sort import ChunkPlan, mask_scores
from recbole_popprior.evaluator.topk import exact_topk, topk_hits
from recbole_popprior.memory import TensorPeak
from recbole_popprior.quick_start import build_config, build_pipeline

from conftest import tiny_config, tiny_rows, write_inter

#: every RecBole ranking metric whose input the collector builds (GAUC: rec.meanrank)
RECBOLE_METRICS = ["Recall", "MRR", "NDCG", "Hit", "Precision", "MAP", "GAUC", "ItemCoverage",
                   "AveragePopularity", "TailPercentage", "ShannonEntropy", "GiniIndex"]
N_WIDE = 800  # item tokens of the ``wide`` dataset (about 600 occur): enough blocks for the two-stage top-k at BLOCK = 8


def _scores(kind: str, rows: int, n: int, seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    if kind == "normal":
        return torch.randn(rows, n, generator=g)
    if kind == "integers":  # every value shared by many items
        return torch.randint(0, 40, (rows, n), generator=g).float()
    if kind == "rounded":  # ties among the best values
        return torch.randn(rows, n, generator=g).mul(3).round()
    if kind == "few-finite":  # fewer finite items than k: the rest are -inf ties
        s = torch.full((rows, n), -torch.inf)
        s[:, : 1 + seed % 7] = torch.randn(rows, 1 + seed % 7, generator=g)
        return s
    if kind == "all-inf":
        return torch.full((rows, n), -torch.inf)
    if kind == "nan":
        s = torch.randn(rows, n, generator=g)
        s[torch.rand(rows, n, generator=g) < 0.01] = torch.nan
        return s
    if kind == "signed-zero":  # -0.0 == 0.0: a tie torch.topk decides
        s = torch.zeros(rows, n)
        s[:, ::3] = -0.0
        s[:, 5::97] = 1.0
        return s
    if kind == "plus-inf":
        s = torch.randn(rows, n, generator=g)
        s[:, 7::50] = torch.inf
        return s
    if kind == "blocks":  # one block copied into another: tied block maxima
        s = torch.randn(rows, n, generator=g)
        s[:, 64:128] = s[:, 0:64]
        return s
    raise ValueError(kind)


KINDS = ["normal", "integers", "rounded", "few-finite", "all-inf", "nan", "signed-zero", "plus-inf", "blocks"]


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("n, k, block", [(3001, 10, 8), (1000, 1, 16), (2053, 20, 4), (30011, 10, 512)])
def test_exact_topk_is_torch_topk(kind, n, k, block):
    scores = _scores(kind, 13, n, seed=n + k)
    assert n // block >= 4 * (k + 1)  # the two-stage path runs
    assert torch.equal(exact_topk(scores, k, block=block), torch.topk(scores, k, dim=-1).indices)


def test_exact_topk_on_unique_scores_is_the_sorted_order():
    """Where the top-k is unique, an independent reference: numpy's stable descending argsort."""
    g = torch.Generator().manual_seed(3)
    scores = torch.randn(50, 5003, generator=g)
    ref = np.argsort(-scores.numpy(), axis=1, kind="stable")[:, :10]
    assert np.array_equal(exact_topk(scores, 10, block=16).numpy(), ref)


def test_exact_topk_without_the_two_stage_path_is_torch_topk():
    scores = _scores("rounded", 4, 100, seed=1)
    assert torch.equal(exact_topk(scores, 10, block=8), torch.topk(scores, 10, dim=-1).indices)
    strided = _scores("normal", 50, 4, seed=2).T  # columns not contiguous
    assert torch.equal(exact_topk(strided, 3, block=1), torch.topk(strided, 3, dim=-1).indices)


def test_topk_hits_is_recboles_pos_matrix():
    """RecBole's rec.topk, written out from its collector (int pos_matrix, gather, row sums)."""
    g = torch.Generator().manual_seed(0)
    rows, n, k = 9, 300, 7
    scores = torch.randn(rows, n, generator=g)
    positive_u = torch.tensor([0, 0, 0, 2, 3, 3, 5, 8, 8])
    positive_i = torch.tensor([4, 4, 9, 1, 7, 299, 0, 5, 6])  # a repeated pair and item 0
    top = torch.topk(scores, k, dim=-1).indices
    scores[positive_u[:5], positive_i[:5]] = 10.0  # some positives in the top-k
    top = torch.topk(scores, k, dim=-1).indices
    pos_matrix = torch.zeros_like(scores, dtype=torch.int)
    pos_matrix[positive_u, positive_i] = 1
    ref = torch.cat((torch.gather(pos_matrix, 1, top), pos_matrix.sum(dim=1, keepdim=True)), dim=1)
    ours = topk_hits(top, positive_u, positive_i, n)
    assert ours.dtype == ref.dtype and torch.equal(ours, ref)


@pytest.mark.parametrize("contiguous", [True, False])
def test_mask_scores_sets_recboles_entries(contiguous):
    """RecBole's masks (trainer.py: scores[:, 0] = -inf; scores[history_index] = -inf), repeats included."""
    g = torch.Generator().manual_seed(1)
    scores = torch.randn(7, 50, generator=g) if contiguous else torch.randn(50, 7, generator=g).T
    history = (torch.tensor([0, 0, 3, 3, 3, 6]), torch.tensor([4, 4, 0, 49, 10, 2]))
    ref = scores.clone()
    ref[:, 0] = -torch.inf
    ref[history] = -torch.inf
    assert torch.equal(mask_scores(scores, history), ref) and torch.equal(mask_scores(ref.clone(), None), ref)


# --- the collector against RecBole's -----------------------------------------------------------------
@pytest.fixture(scope="module")
def wide_data(tmp_path_factory):
    root = tmp_path_factory.mktemp("wide")
    write_inter(root / "wide" / "wide.inter", tiny_rows(n_users=150, n_items=N_WIDE, length=8, seed=5, zipf=0.2))
    return root


@pytest.fixture()
def small_blocks(monkeypatch):
    """The two-stage top-k on an 800-item catalogue (it needs 4 (k + 1) blocks)."""
    monkeypatch.setattr(topk_module, "BLOCK", 8)


def _config(data, tmp_path, model="SASRec", **overrides):
    settings = tiny_config(data, metrics=RECBOLE_METRICS, topk=[5, 10], valid_metric="MRR@10",
                           output=str(tmp_path), metric_decimal_place=12, eval_batch_size=40)
    settings.update(overrides)
    return build_config(model, "wide", config_dict=settings)


def _structs(collector, batches) -> tuple[dict, dict]:
    for scores, positive_u, positive_i in batches:
        collector.eval_batch_collect(scores.clone(), None, positive_u, positive_i)
    struct = collector.get_data_struct()
    structs = {key: struct[key] for key in ("rec.items", "rec.topk", "rec.meanrank")}
    return structs, struct


@pytest.mark.usefixtures("small_blocks")
@pytest.mark.parametrize("kind", ["normal", "rounded", "few-finite", "integers"])
def test_collector_fills_recboles_data_struct(wide_data, tmp_path, kind):
    config = _config(wide_data, tmp_path)
    pipe = build_pipeline(config, log=False)
    n = pipe.train_data.dataset.item_num
    batches = []
    for b, rows in enumerate((17, 40, 3)):
        scores = _scores(kind, rows, n, seed=b)
        scores[:, 0] = -torch.inf
        positive_u = torch.arange(rows).repeat_interleave(2)[: 2 * rows - 1]
        positive_i = torch.randint(1, n, (len(positive_u),), generator=torch.Generator().manual_seed(b))
        scores[positive_u[::3], positive_i[::3]] = -torch.inf  # masked positives still count
        batches.append((scores, positive_u, positive_i))
    recbole, ours = FixedCollector(config), PopPriorCollector(config)
    results = []
    for collector in (recbole, ours):
        collector.data_collect(pipe.train_data)
        structs, struct = _structs(collector, batches)
        results.append((structs, Evaluator(config).evaluate(struct)))
    (ref, ref_result), (got, got_result) = results
    for key in ref:
        assert got[key].dtype == ref[key].dtype and torch.equal(got[key], ref[key]), key
    assert got_result == ref_result


# --- a whole evaluation: the plugin's trainer against RecBole's Trainer ----------------------------------
def _recbole_evaluation(pipe, config):
    """RecBole's own Trainer on the same model (FixedCollector: only its get_data_struct is fixed)."""
    trainer = Trainer(config, pipe.model)
    trainer.eval_collector = FixedCollector(config)
    return _evaluate(trainer, pipe)


def _evaluate(trainer, pipe):
    structs = {}
    evaluate = trainer.evaluator.evaluate

    def keep(struct):
        structs.update({key: struct[key] for key in ("rec.items", "rec.topk", "rec.meanrank") if key in struct})
        return evaluate(struct)

    trainer.evaluator.evaluate = keep
    trainer.eval_collector.data_collect(pipe.train_data)
    result = trainer.evaluate(pipe.test_data, load_best_model=False)
    return dict(result), structs


CASES = {  # model, settings, the scorer's path (None: either)
    "prior-separated": ("SASRec", {"prior_tau": 1.0}, "factors"),
    "beta-zero": ("SASRec", {"prior_tau": 0.0}, "factors"),
    "recbole-own": ("SASRec", {"popprior_baseline": True}, "factors"),
    "scaled-after-matmul": ("CORE", {}, "model"),  # scores = (H E^T) / T: not bit for bit (H / T) E^T
    "output-bias": ("BERT4Rec", {}, None),
    "no-dot-product": ("GRU4RecCPR", {}, "model"),
}


@pytest.mark.usefixtures("small_blocks")
@pytest.mark.parametrize("ties", [False, True], ids=["distinct", "tied-items"])
@pytest.mark.parametrize("case", list(CASES))
def test_evaluation_equals_recboles_trainer(wide_data, tmp_path, case, ties):
    model, settings, path = CASES[case]
    budget = 0.05  # MB: chunks of a few contexts
    config = _config(wide_data, tmp_path, model, eval_score_budget_mb=budget, **settings)
    pipe = build_pipeline(config, log=False)
    n = pipe.train_data.dataset.item_num
    assert n // 8 >= 4 * 11  # the two-stage top-k runs
    with torch.no_grad():
        if hasattr(pipe.model, "output_bias"):
            pipe.model.output_bias.normal_(generator=torch.Generator().manual_seed(0))
        if ties:  # a third of the catalogue shares one embedding: many tied scores in every top-k
            table = pipe.model.item_embedding.weight
            table[1: n // 3] = table[1] * 3
    pipe.model.eval()
    reference, ref_structs = _recbole_evaluation(pipe, config)
    chunks = []
    score_and_collect = pipe.trainer._score_and_collect
    pipe.trainer._score_and_collect = lambda scorer, chunk: (chunks.append(len(chunk[0])),
                                                             score_and_collect(scorer, chunk))
    ours, structs = _evaluate(pipe.trainer, pipe)
    assert max(chunks) < config["eval_batch_size"] and chunks[:3] == [1, 2, 4]  # chunked
    for key in ref_structs:
        assert structs[key].dtype == ref_structs[key].dtype and torch.equal(structs[key], ref_structs[key]), key
    assert ours == reference
    assert path is None or pipe.trainer.last_full_sort_path == path


# --- memory: the budget bounds the real peak of a chunk -------------------------------------------------
def _batch_peaks(pipe) -> list[int]:
    """Per full-sort batch: the most bytes torch's CPU allocator held at once above what it held when
    the batch began (the profiler's allocation events), less the results the batch collected."""
    trainer = pipe.trainer
    batch_eval = trainer._full_sort_batch_eval
    kept = []

    def marked(batched_data):
        before = {key: sum(t.numel() * t.element_size() for t in parts)
                  for key, parts in trainer.eval_collector._parts.items()}
        with record_function("popprior.test.batch"):
            out = batch_eval(batched_data)
        after = {key: sum(t.numel() * t.element_size() for t in parts)
                 for key, parts in trainer.eval_collector._parts.items()}
        kept.append(sum(after.values()) - sum(before.values()))
        return out

    trainer._full_sort_batch_eval = marked
    trainer.eval_collector.data_collect(pipe.train_data)
    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        trainer.evaluate(pipe.test_data, load_best_model=False)
    events = prof.profiler.kineto_results.events()
    memory = sorted((e.start_ns(), e.nbytes()) for e in events
                    if e.name() == "[memory]" and e.device_type().name == "CPU")
    windows = sorted((e.start_ns(), e.start_ns() + e.duration_ns()) for e in events
                     if e.name() == "popprior.test.batch")
    peaks = []
    for (start, end), results in zip(windows, kept):
        live = peak = 0
        for time, nbytes in memory:
            if start <= time <= end:
                live += nbytes
                peak = max(peak, live)
        peaks.append(peak - results)
    return peaks


@pytest.mark.parametrize("metrics, dtype", [(["MRR", "NDCG", "PopEnergy"], "float32"),
                                            (["MRR", "GAUC", "ItemCoverage"], "float32"),
                                            (["MRR", "NDCG", "PopEnergy"], "bfloat16")],
                         ids=["topk+energy", "meanrank", "bfloat16"])
def test_budget_bounds_the_peak_of_a_chunk(wide_data, tmp_path, monkeypatch, metrics, dtype):
    budget_mb = 0.25
    config = _config(wide_data, tmp_path, eval_score_budget_mb=budget_mb, eval_batch_size=90,
                     metrics=metrics, energy_permutations=0, eval_score_dtype=dtype)
    pipe = build_pipeline(config, log=False)
    pipe.model.eval()
    plans = []
    init = ChunkPlan.__init__

    def recording(self, *args, **kwargs):
        init(self, *args, **kwargs)
        plans.append(self)

    monkeypatch.setattr(ChunkPlan, "__init__", recording)
    peaks = _batch_peaks(pipe)
    plan = plans[-1]
    n = pipe.train_data.dataset.item_num
    assert 4 < plan.rows < 90  # the batch was chunked
    assert plan.per_row > (2 if dtype == "bfloat16" else 4) * n  # a context holds more than its scores
    assert max(peaks) <= budget_mb * 2**20
    assert max(peaks) > 0.5 * budget_mb * 2**20  # the budget was used, not dodged
    if dtype == "bfloat16":
        return

    # sized by the scores alone (the previous rule), the same batch breaks the budget
    def scores_only(self):
        self.per_row, self.fixed, self.scratch = 4.0 * self.n_items, 0.0, 0.0
        self.rows = int(self.budget // self.per_row)

    monkeypatch.setattr(ChunkPlan, "_fit", scores_only)
    assert max(_batch_peaks(pipe)) > budget_mb * 2**20


def test_tensor_peak_counts_what_the_allocator_holds(wide_data, tmp_path):
    """TensorPeak (the planner's measure) against the profiler's allocation events, on one chunk."""
    config = _config(wide_data, tmp_path)
    pipe = build_pipeline(config, log=False)
    model = pipe.model.eval()
    interaction = next(iter(pipe.test_data))[0][:16]

    def chunk():
        with torch.no_grad():
            scores = model.full_sort_predict(interaction)
            scores[:, 0] = -torch.inf
            return exact_topk(scores, 10, block=8)

    chunk()  # caches
    with TensorPeak() as peak:
        chunk()
    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        chunk()
    live = top = 0
    for e in sorted(prof.profiler.kineto_results.events(), key=lambda e: e.start_ns()):
        if e.name() == "[memory]":
            live += e.nbytes()
            top = max(top, live)
    assert peak.peak == pytest.approx(top, rel=0.02)
    assert peak.peak > 16 * N_WIDE * 4  # the scores, and the forward pass


# --- low-precision scoring (eval_score_dtype, DESIGN §3.3) -------------------------------------------
@pytest.mark.usefixtures("small_blocks")
@pytest.mark.parametrize("dtype", ["bfloat16", "float16"])
def test_low_precision_scoring_stays_within_tolerance(wide_data, tmp_path, dtype):
    """Against the exact float32 path on the same model: the top-10 lists agree on at least 99% of
    their (context, rank) entries and every top-k metric within 0.01; the energy statistics come
    from H and E in float64, so they are the same numbers whatever the scoring dtype."""
    metrics = ["Recall", "MRR", "NDCG", "Hit", "Precision", "MAP", "ItemCoverage", "PopEnergy"]
    runs = {}
    for name, score_dtype in (("exact", "float32"), ("low", dtype)):
        config = _config(wide_data, tmp_path / name, eval_score_budget_mb=0.05, metrics=metrics,
                         eval_score_dtype=score_dtype, energy_permutations=0)
        runs[name] = build_pipeline(config, log=False)
    with torch.no_grad():  # learned scores spread over several units: they, not the prior, rank
        runs["exact"].model.item_embedding.weight.mul_(40)
    runs["low"].model.load_state_dict(runs["exact"].model.state_dict())
    results = {}
    for name, pipe in runs.items():
        pipe.model.eval()
        results[name] = _evaluate(pipe.trainer, pipe)
    (exact, exact_structs), (low, low_structs) = results["exact"], results["low"]
    assert runs["low"].trainer._last_low_precision and not runs["exact"].trainer._last_low_precision
    agree = (low_structs["rec.items"] == exact_structs["rec.items"]).double().mean()
    assert agree >= 0.99
    for key, value in exact.items():
        if key.startswith("pop_"):
            assert low[key] == value, key
        else:
            assert low[key] == pytest.approx(value, abs=0.01), key


def test_low_precision_is_refused_for_metrics_reading_the_scores(wide_data, tmp_path, caplog):
    config = _config(wide_data, tmp_path, eval_score_dtype="bfloat16", metrics=["MRR", "GAUC"])
    pipe = build_pipeline(config, log=False)
    reference = _recbole_evaluation(pipe, config)[0]
    with caplog.at_level("WARNING"):
        ours = _evaluate(pipe.trainer, pipe)[0]
    assert ours == reference and not pipe.trainer._last_low_precision
    assert any("eval_score_dtype=bfloat16 is not applied" in r.getMessage() for r in caplog.records)
