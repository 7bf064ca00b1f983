"""Collective operations (recbole_popprior/collective.py): the energy statistics summed over two
real gloo processes equal a single process's, and RecBole's averaging is kept off them."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from conftest import free_port
from recbole_popprior import collective


# --- summing the energy statistics across ranks ----------------------------------------
def _reduce_worker(rank: int, world: int, port: int, out: str) -> None:
    """Each rank holds every ``world``-th row of one H; the collector's sums must be global."""
    from recbole_popprior.evaluator.collector import EnergyState, PopPriorCollector
    from recbole_popprior.evaluator.energy import ContextStats, ScoreStats

    torch.distributed.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank,
                                         world_size=world)
    try:
        rng = np.random.default_rng(0)
        H = rng.normal(size=(23, 5))
        E = rng.normal(size=(13, 5))
        log_prior = np.r_[-np.inf, np.log(rng.dirichlet(np.ones(12)))]
        mine = H[rank::world]
        results = {}
        for path in ("factorised", "scores"):
            collector = PopPriorCollector.__new__(PopPriorCollector)  # only the reduction is exercised
            state = EnergyState(log_prior, None, permutations=7, seed=3, subspace_energy=0.95, with_subspace=False)
            state.path = path
            if path == "factorised":
                state.contexts, state.E = ContextStats.from_H(torch.as_tensor(mine, dtype=torch.float32)), E
            else:
                state.scores = ScoreStats(log_prior, permutations=7, seed=3).update(mine @ E.T)
            collector._state = state
            collector.reduce_energy_stats(collective.all_reduce_array)
            collector.reduce_energy_stats(collective.all_reduce_array)  # a second call is a no-op
            results[path] = state.energy()
        summed = collective.all_reduce_array(mine.T @ mine)
        np.savez(out.format(rank=rank), summed=summed, result=json.dumps(results))
    finally:
        torch.distributed.destroy_process_group()


def test_energy_statistics_are_summed_over_ranks(tmp_path):
    from recbole_popprior.evaluator.energy import ScoreStats, popularity_energy

    world = 2
    out = str(tmp_path / "rank{rank}.npz")
    torch.multiprocessing.spawn(_reduce_worker, args=(world, free_port(), out), nprocs=world, join=True)
    rng = np.random.default_rng(0)
    H = rng.normal(size=(23, 5))
    E = rng.normal(size=(13, 5))
    log_prior = np.r_[-np.inf, np.log(rng.dirichlet(np.ones(12)))]
    H32 = H.astype(np.float32).astype(np.float64)
    expected = {"factorised": popularity_energy(H32, E, log_prior, permutations=7, seed=3),
                "scores": ScoreStats(log_prior, permutations=7, seed=3).update(H @ E.T).result()}
    for rank in range(world):
        got = np.load(out.format(rank=rank))
        np.testing.assert_allclose(got["summed"], H.T @ H, rtol=1e-12)
        results = json.loads(str(got["result"]))
        for path, reference in expected.items():
            for key, value in reference.items():
                assert results[path][key] == pytest.approx(value, rel=1e-9, abs=1e-12), (path, key)


def test_reduced_metrics_are_kept_out_of_recbole_averaging():
    class Reduced:
        ddp_key_prefixes = ("fake_",)

    prefixes = collective.reduced_key_prefixes([Reduced, object])
    result = {"fake_dir_frac": 0.123456, "recall@10": 0.5, "FAKE_shared": 1.0}
    averaged, already_global = collective.split_reduced(result, prefixes)
    assert averaged == {"recall@10": 0.5}
    assert already_global == {"fake_dir_frac": 0.123456, "FAKE_shared": 1.0}
    calls = []

    def recbole_map_reduce(part, num_sample):  # stands in for the collective weighted mean
        calls.append(dict(part))
        return {key: round(value / 2, 4) for key, value in part.items()}

    merged = collective.map_reduce(recbole_map_reduce, result, 10, prefixes)
    assert calls == [{"recall@10": 0.5}]
    assert list(merged.items()) == [("fake_dir_frac", 0.123456), ("recall@10", 0.25), ("FAKE_shared", 1.0)]


def test_collectives_are_identities_in_one_process():
    values = np.arange(6.0).reshape(2, 3)
    out = collective.all_reduce_array(values)
    assert out is not values and np.array_equal(out, values)
    assert collective.all_gather("x") == ["x"] and collective.rank() == 0
