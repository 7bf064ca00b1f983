"""The evaluation collector (recbole_popprior/evaluator/collector.py): summing workers'
statistics, caller-supplied factors, against the single-pass reference ``popularity_energy``."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import yaml

from recbole_popprior.config import properties_file
from recbole_popprior.evaluator import popularity_energy
from recbole_popprior.evaluator.collector import PopPriorCollector


class _Cfg(dict):
    """RecBole-config stand-in for collector unit tests: the plugin's energy defaults from
    properties/overall.yaml, other missing keys read as None."""

    def __init__(self, **values):
        with open(properties_file("overall.yaml"), encoding="utf-8") as handle:
            defaults = {k: v for k, v in yaml.safe_load(handle).items() if k.startswith(("energy_", "prior_"))}
        super().__init__({**defaults, **values})

    def __getitem__(self, key):
        return self.get(key)


class _DotModel(torch.nn.Module):
    def __init__(self, H, E, lp):
        super().__init__()
        self.H, self.item_embedding = H, torch.nn.Embedding.from_pretrained(E)
        self.register_buffer("log_prior", lp)

    def popprior_factors(self, rows):
        return self.H[rows], self.item_embedding.weight

    def popprior_learned_scores(self, rows):
        return self.H[rows] @ self.item_embedding.weight.T


def _collector(metrics):
    return PopPriorCollector(_Cfg(metrics=metrics, topk=[5], eval_args={"mode": "full"}, device="cpu",
                                  energy_permutations=30, energy_seed=3))


@pytest.mark.parametrize("factorised", [True, False])
def test_summed_worker_stats_equal_one_worker(factorised):
    """reduce_energy_stats(fn): summing two workers' statistics gives the single-worker result."""
    g = torch.Generator().manual_seed(0)
    H, E = torch.randn(40, 8, generator=g, dtype=torch.float64), torch.randn(31, 8, generator=g, dtype=torch.float64)
    lp = torch.log(torch.rand(31, generator=g, dtype=torch.float64))
    lp[0] = -torch.inf
    model = _DotModel(H, E, lp)
    if not factorised:
        model.popprior_factors = lambda rows: None
    workers = [_collector(["PopEnergy", "PopPermutation"]) for _ in range(2)]
    for w, rows in zip(workers, (torch.arange(0, 25), torch.arange(25, 40))):
        for chunk in rows.split(7):
            w.context_collect(model, chunk, torch.zeros(len(chunk), 31), None, None)
    recorded = []
    workers[1].reduce_energy_stats(lambda a: recorded.append(np.array(a, copy=True)) or a)
    workers[0].reduce_energy_stats(lambda a: a + recorded.pop(0))
    got = workers[0].get_data_struct().get("popprior.energy").energy()
    ref = popularity_energy(H, E, lp, permutations=30, seed=3)
    for key in ("total", "dir", "shared", "dir_frac", "shared_frac", "null_mean", "null_q95", "p_value"):
        assert got[key] == pytest.approx(ref[key], rel=1e-9), key
    assert got["m"] == 40 and got["path"] == ("factorised" if factorised else "scores")


def test_caller_supplied_factors_skip_the_model():
    g = torch.Generator().manual_seed(1)
    H, E = torch.randn(12, 4, generator=g), torch.randn(21, 4, generator=g)
    lp = torch.log(torch.rand(21, generator=g))
    lp[0] = -torch.inf
    model = _DotModel(H, E, lp)
    model.popprior_factors = None  # would fail if the collector called it
    collector = _collector(["PopEnergy"])
    collector.context_collect(model, None, torch.zeros(12, 21), None, None, factors=(H, E))
    got = collector.get_data_struct().get("popprior.energy").energy()
    assert got["dir_frac"] == pytest.approx(popularity_energy(H, E, lp)["dir_frac"], rel=1e-9)
