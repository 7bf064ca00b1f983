"""The trainer mixin: one forward pass per evaluation batch, even with the energy metrics on;
full-sort evaluation in row chunks under ``eval_score_budget_mb`` gives the whole-batch results
(docs/DESIGN.md §3)."""

from __future__ import annotations

import logging

import pytest
import torch
from recbole.data.interaction import Interaction
from recbole.evaluator import register
from recbole.evaluator.base_metric import AbstractMetric
from recbole.utils import EvaluatorType

from recbole_popprior.quick_start import build_config, build_pipeline
from recbole_popprior.trainer import reuse_forward, split_full_sort_batch

from conftest import tiny_config


def _pipeline(tiny_data, tmp_path, metrics, baseline=False):
    config = build_config("SASRec", "tiny", config_dict=tiny_config(
        tiny_data, metrics=metrics, output=str(tmp_path), energy_permutations=0, popprior_baseline=baseline))
    return build_pipeline(config, log=False)


@pytest.mark.parametrize("transfer", [False, True], ids=["same-device", "copying-transfer"])
@pytest.mark.parametrize("baseline", [False, True], ids=["prior-separated", "recbole-own"])
def test_energy_metrics_reuse_the_scoring_forward_pass(tiny_data, tmp_path, monkeypatch, baseline, transfer):
    """One forward per batch with the energy metrics on. ``copying-transfer``: ``Interaction.to``
    returns new tensors, as a host-to-GPU move does, so the cache must see the moved batch."""
    if transfer:
        def to(self, device, selected_field=None):  # a copy the first time, then already there
            if getattr(self, "moved", False):
                return self
            moved = Interaction({k: v.clone() for k, v in self.interaction.items()})
            moved.moved = True
            return moved

        monkeypatch.setattr(Interaction, "to", to)
    results = {}
    for name, metrics in {"plain": ["MRR"], "energy": ["MRR", "PopEnergy", "EmbeddingSpectrum"]}.items():
        pipe = _pipeline(tiny_data, tmp_path / name, metrics, baseline)
        recbole_class = [c for c in type(pipe.model).__mro__ if c.__module__.startswith("recbole.model")][0]
        calls = []
        original = recbole_class.forward

        def counting(self, *args, _original=original, **kwargs):
            calls.append(1)
            return _original(self, *args, **kwargs)

        monkeypatch.setattr(recbole_class, "forward", counting)
        pipe.trainer.eval_collector.data_collect(pipe.train_data)
        results[name] = (pipe.trainer.evaluate(pipe.test_data, load_best_model=False), len(calls))
        monkeypatch.setattr(recbole_class, "forward", original)
    (plain, plain_calls), (energy, energy_calls) = results["plain"], results["energy"]
    assert energy_calls == plain_calls > 0
    assert energy["mrr@10"] == plain["mrr@10"]
    assert energy["pop_contexts"] == 60  # one test context per user


def test_forward_cache_is_dropped_after_the_block(tiny_data, tmp_path):
    pipe = _pipeline(tiny_data, tmp_path, ["MRR"])
    model = pipe.model.eval()
    batch = next(iter(pipe.test_data))[0]
    seq, length = batch["item_id_list"], batch["item_length"]
    with torch.no_grad(), reuse_forward(model):
        first = model.forward(seq, length)
        assert model.forward(seq, length) is first
    assert "forward" not in vars(model)  # the wrapper is gone
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.1)
        assert not torch.equal(model.forward(seq, length), first)


# --- full-sort evaluation in bounded memory (docs/DESIGN.md §3) -------------------------------------
_ALL_METRICS = ["Recall", "MRR", "NDCG", "Hit", "Precision", "MAP", "GAUC", "ItemCoverage", "AveragePopularity",
                "TailPercentage", "PopEnergy", "PopPermutation", "PopSubspace", "EmbeddingSpectrum", "PopBandRecall"]
#: energy metrics are sums over contexts: chunking changes only the order of float64 additions
_SUMMED = ("pop_", "emb_")


def _budget_mb(rows: int, n_items: int) -> float:
    """A budget that holds ``rows`` rows of float32 scores, and not one more."""
    return (rows * n_items * 4 + 2) / 2**20


def _evaluate_recording(pipe, state: dict) -> tuple[dict, list[tuple[int, int]], list[int]]:
    """Evaluate the test split with ``state`` loaded; record the shape of every score tensor the
    model made, and the rows of every score tensor the collector received."""
    pipe.model.load_state_dict(state)
    shapes: list[tuple[int, int]] = []
    collected: list[int] = []
    model, collector = pipe.model, pipe.trainer.eval_collector
    predict, collect = model.full_sort_predict, collector.eval_batch_collect

    def recording_predict(interaction):
        scores = predict(interaction)
        shapes.append(tuple(scores.shape))
        return scores

    def recording_collect(scores, *args):
        if scores is not None:
            collected.append(scores.shape[0])
        return collect(scores, *args)

    model.full_sort_predict, collector.eval_batch_collect = recording_predict, recording_collect
    try:
        collector.data_collect(pipe.train_data)
        result = pipe.trainer.evaluate(pipe.test_data, load_best_model=False)
    finally:
        del model.full_sort_predict, collector.eval_batch_collect
    return dict(result), shapes, collected


def _assert_same_results(chunked: dict, whole: dict) -> None:
    assert chunked.keys() == whole.keys()
    for key, value in whole.items():
        if key.startswith(_SUMMED) and isinstance(value, float):
            assert chunked[key] == pytest.approx(value, rel=1e-9, abs=1e-12, nan_ok=True), key
        elif value != value:  # NaN: a popularity band without targets
            assert chunked[key] != chunked[key], key
        else:
            assert chunked[key] == value, key


@pytest.mark.parametrize("baseline", [False, True], ids=["prior-separated", "recbole-own"])
def test_chunked_full_sort_evaluation_equals_the_whole_batch(tiny_data, tmp_path, baseline):
    n_items = 31  # 30 items + padding
    runs = {}
    for name, budget in {"whole": 1024.0, "chunked": _budget_mb(7, n_items)}.items():
        config = build_config("SASRec", "tiny", config_dict=tiny_config(
            tiny_data, metrics=_ALL_METRICS, output=str(tmp_path / name), energy_permutations=50,
            popprior_baseline=baseline, eval_batch_size=25, eval_score_budget_mb=budget))
        runs[name] = build_pipeline(config, log=False)
    state = {k: v.clone() for k, v in runs["whole"].model.state_dict().items()}
    whole, _, whole_rows = _evaluate_recording(runs["whole"], state)
    chunked, _, chunked_rows = _evaluate_recording(runs["chunked"], state)
    # the first chunks of an evaluation are measured (1, 2 and 4 contexts), then the plan holds
    assert whole_rows[:4] == [1, 2, 4, 18] and whole_rows[4:] == [25, 10]
    assert chunked_rows[:3] == [1, 2, 4] and max(chunked_rows) < 25 and sum(chunked_rows) == 60
    assert whole["pop_contexts"] == 60 and {"headrecall@10", "tailrecall@10"} <= whole.keys()
    _assert_same_results(chunked, whole)


def test_split_full_sort_batch_remaps_rows_of_positives_and_history():
    interaction = Interaction({"user_id": torch.arange(10, 15)})
    positive_u = torch.tensor([0, 0, 1, 3, 4, 4])
    positive_i = torch.tensor([5, 6, 7, 8, 9, 2])
    history = (torch.tensor([0, 2, 2, 4]), torch.tensor([1, 3, 4, 7]))
    chunks = list(split_full_sort_batch((interaction, history, positive_u, positive_i), 2))
    assert [c[0]["user_id"].tolist() for c in chunks] == [[10, 11], [12, 13], [14]]
    pairs = [(start + int(u), int(i)) for start, c in zip((0, 2, 4), chunks) for u, i in zip(c[2], c[3])]
    assert pairs == list(zip(positive_u.tolist(), positive_i.tolist()))
    rows = [(start + int(r), int(col)) for start, c in zip((0, 2, 4), chunks) for r, col in zip(*c[1])]
    assert rows == list(zip(*(t.tolist() for t in history)))
    assert all(int(c[2].max()) < len(c[0]) for c in chunks)


def test_metrics_needing_every_score_keep_the_whole_batch_with_a_warning(tiny_data, tmp_path, caplog):
    """A metric that reads ``rec.score`` keeps the whole score matrix anyway: no chunking, one warning."""
    class ScoreMean(AbstractMetric):
        metric_type = EvaluatorType.RANKING
        metric_need = ["rec.score"]

        def calculate_metric(self, dataobject):
            scores = dataobject.get("rec.score")[:, 1:]
            return {"scoremean": float(scores.double().mean())}

    name = "scoremean"
    register.metrics_dict[name], register.metric_information[name] = ScoreMean, ScoreMean.metric_need
    register.metric_types[name] = ScoreMean.metric_type
    try:
        results = {}
        for label, budget in {"whole": 1024.0, "tiny": _budget_mb(7, 31)}.items():
            config = build_config("SASRec", "tiny", config_dict=tiny_config(
                tiny_data, metrics=["MRR", "ScoreMean"], output=str(tmp_path / label), eval_batch_size=25,
                eval_score_budget_mb=budget))
            pipe = build_pipeline(config, log=False)
            with caplog.at_level(logging.WARNING):
                results[label] = _evaluate_recording(pipe, {k: v.clone() for k, v in pipe.model.state_dict().items()})
    finally:
        for table in (register.metrics_dict, register.metric_information, register.metric_types):
            table.pop(name, None)
    (whole, _, whole_rows), (tiny, _, tiny_rows) = results["whole"], results["tiny"]
    assert tiny_rows == whole_rows == [25, 25, 10]
    assert tiny == whole and "scoremean" in tiny
    warnings = [r for r in caplog.records if "eval_score_budget_mb is not applied" in r.getMessage()]
    assert len(warnings) == 1
