"""The trainer mixin: one forward pass per evaluation batch, even with the energy metrics on."""

from __future__ import annotations

import pytest
import torch

from recbole_popprior.quick_start import build_config, build_pipeline
from recbole_popprior.trainer import reuse_forward

from conftest import tiny_config


def _pipeline(tiny_data, tmp_path, metrics, baseline=False):
    config = build_config("SASRec", "tiny", config_dict=tiny_config(
        tiny_data, metrics=metrics, output=str(tmp_path), energy_permutations=0, popprior_baseline=baseline))
    return build_pipeline(config, log=False)


@pytest.mark.parametrize("baseline", [False, True], ids=["prior-separated", "recbole-own"])
def test_energy_metrics_reuse_the_scoring_forward_pass(tiny_data, tmp_path, monkeypatch, baseline):
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
