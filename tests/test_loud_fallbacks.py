"""Loud, not silent (docs/DESIGN.md §9.4): the energy collector's fallbacks are WARNINGs naming the
model and the reason, the factor check's tolerance fits TF32 and bf16 scores and still catches a
wrong factorisation, ``--compare`` says why a p-value is missing, and it frees each finished arm
before the next one trains."""

from __future__ import annotations

import gc
import json
import logging
import weakref

import numpy as np
import pytest
import torch

from conftest import synthetic_settings
from test_model_zoo import NO_FACTORS, Zoo, s3rec_pretrained, zoo_data  # noqa: F401  (fixtures)

from recbole_popprior import compare
from recbole_popprior.evaluator import collector as collector_module
from recbole_popprior.evaluator.collector import PopPriorCollector, factor_tolerance, score_roundoff
from recbole_popprior.model import supported_models


# --- the factor check's tolerance ------------------------------------------------------------------
def _round_mantissa(x: torch.Tensor, bits: int) -> torch.Tensor:
    """float32 rounded to nearest with ``bits`` explicit mantissa bits (TF32: 10), as float32."""
    drop = 23 - bits
    raw = x.float().contiguous().view(torch.int32)
    raw = (raw + (1 << (drop - 1))) & ~((1 << drop) - 1)
    return raw.view(torch.float32)


def _excess(H, E, reference, roundoff) -> float:
    Z = H.double() @ E.double().T
    return float(((Z - reference.double()).abs() / factor_tolerance(H, E, reference, roundoff)).max())


@pytest.fixture()
def factors64():
    g = torch.Generator().manual_seed(0)
    return torch.randn(64, 64, generator=g), torch.randn(500, 64, generator=g)


def test_tf32_scores_pass_the_tf32_bound_and_fail_the_exact_float32_one(factors64):
    H, E = factors64
    tf32 = _round_mantissa(H, 10) @ _round_mantissa(E, 10).T  # what a TF32 matmul computes
    assert _excess(H, E, tf32, score_roundoff(torch.float32, "cuda", "high")) <= 1.0
    assert _excess(H, E, tf32, score_roundoff(torch.float32, "cpu", "highest")) > 1.0
    # the former check, rtol = atol / max|ref| = 1e-5, failed TF32 scores
    assert not torch.allclose(H.double() @ E.double().T, tf32.double(), rtol=1e-5, atol=1e-5 * float(tf32.abs().max()))
    exact = H @ E.T
    assert _excess(H, E, exact, score_roundoff(torch.float32, "cpu", "highest")) <= 1.0


def test_bf16_scores_pass_the_bf16_bound(factors64):
    H, E = factors64
    with torch.autocast("cpu", dtype=torch.bfloat16):
        bf16 = H @ E.T
    assert bf16.dtype == torch.bfloat16
    assert _excess(H, E, bf16, score_roundoff(torch.bfloat16, "cpu", "highest")) <= 1.0


@pytest.mark.parametrize("dtype,device,precision", [(torch.float32, "cpu", "highest"), (torch.float32, "cuda", "high"),
                                                    (torch.bfloat16, "cpu", "highest")])
def test_a_wrong_factorisation_still_fails(factors64, dtype, device, precision):
    """A score that H E^T misses (a per-item bias of a tenth of a typical score) fails every bound."""
    H, E = factors64
    bias = 0.1 * float((H @ E.T).std()) * torch.randn(E.shape[0], generator=torch.Generator().manual_seed(1))
    reference = (H @ E.T + bias).to(dtype)
    assert _excess(H, E, reference, score_roundoff(dtype, device, precision)) > 1.0


# --- the collector says so --------------------------------------------------------------------------
_CACHE: dict[str, Zoo] = {}


def _zoo(name, data, pretrained) -> Zoo:
    if name not in _CACHE:
        _CACHE[name] = Zoo(name, data, pretrained)
    return _CACHE[name]


def _path_of(zoo: Zoo, model, caplog) -> tuple[bool, list[logging.LogRecord]]:
    collector = PopPriorCollector(zoo.base_config)
    model.eval()
    caplog.clear()
    with caplog.at_level(logging.INFO), torch.no_grad():
        pair = collector._factors(model, zoo.eval_batch, None)
    return pair is not None, [r for r in caplog.records if "energy metrics" in r.getMessage()]


@pytest.mark.parametrize("name", supported_models())
def test_recboles_own_models_pass_the_factor_check_without_a_warning(name, zoo_data, s3rec_pretrained, caplog):  # noqa: F811
    zoo = _zoo(name, zoo_data, s3rec_pretrained)
    factorised, records = _path_of(zoo, zoo.baseline(), caplog)
    assert factorised == (name not in NO_FACTORS)
    assert records and all(r.levelno == logging.INFO for r in records), [r.getMessage() for r in records]


def test_a_failing_factorisation_is_a_warning_with_the_model_and_the_reason(zoo_data, s3rec_pretrained, caplog,  # noqa: F811
                                                                             monkeypatch):
    zoo = _zoo("SASRec", zoo_data, s3rec_pretrained)

    def broken(model, interaction):
        raise RuntimeError("planted: no such layer")

    monkeypatch.setattr(collector_module, "factors", broken)
    factorised, records = _path_of(zoo, zoo.baseline(), caplog)
    assert not factorised
    [warning] = [r for r in records if r.levelno == logging.WARNING]
    text = warning.getMessage()
    assert "SASRec" in text and "planted: no such layer" in text and "streaming" in text


def test_a_failed_factor_check_is_a_warning_with_the_model_and_the_size_of_the_miss(zoo_data, s3rec_pretrained,  # noqa: F811
                                                                                    caplog):
    zoo = _zoo("GRU4Rec", zoo_data, s3rec_pretrained)
    model = zoo.baseline()
    own = model.full_sort_predict
    model.full_sort_predict = lambda interaction: own(interaction) + 0.05 * torch.arange(own(interaction).shape[1])
    factorised, records = _path_of(zoo, model, caplog)
    assert not factorised
    [warning] = [r for r in records if r.levelno == logging.WARNING]
    assert "GRU4Rec" in warning.getMessage() and "factor check" in warning.getMessage()
    assert "rounding bound" in warning.getMessage()


# --- --compare ----------------------------------------------------------------------------------------
def test_compare_frees_each_finished_arm_before_the_next_trains(tmp_path, monkeypatch):
    finished: list[tuple[str, list[weakref.ref]]] = []
    train = compare.train_arm

    def watched(name, config, **kwargs):
        gc.collect()
        alive = [(arm, [r for r in refs if r() is not None]) for arm, refs in finished]
        assert all(not refs for _, refs in alive), f"still alive when {name} starts: {alive}"
        arm = train(name, config, **kwargs)
        pipe = arm.pipe
        finished.append((arm.name, [weakref.ref(pipe.model), weakref.ref(pipe.trainer),
                                    weakref.ref(pipe.trainer.optimizer), weakref.ref(pipe.train_data)]))
        return arm

    monkeypatch.setattr(compare, "train_arm", watched)
    payload = compare.run_compare("SASRec", "synthetic", config_dict=synthetic_settings(tmp_path, epochs=1), seeds=1,
                                  output=tmp_path / "out", arms="standard,separated,directspec")
    assert [name for name, _ in finished] == ["standard", "separated", "directspec"]
    gc.collect()
    assert all(r() is None for _, refs in finished for r in refs)
    assert set(payload["reductions"]) == {"separated", "directspec"}
    assert all(np.isfinite(payload["reductions"][a]["R_dir"]["mean"]) for a in ("separated", "directspec"))


def test_compare_says_why_a_streaming_arm_has_no_matched_p_values(tmp_path):
    settings = synthetic_settings(tmp_path, epochs=1, reranker_CAN_NUM="10", energy_permutations=49)
    payload = compare.run_compare("GRU4RecCPR", "synthetic", config_dict=settings, seeds=1, output=tmp_path / "out")
    saved = json.loads((tmp_path / "out" / "compare.json").read_text())
    reduction = saved["per_seed"][0]["reductions"]["separated"]
    assert "p_value_dir" not in reduction and np.isfinite(reduction["R_dir"])
    assert "streaming" in reduction["p_missing"] and "GRU4RecCPR" in reduction["p_missing"]
    markdown = (tmp_path / "out" / "compare.md").read_text()
    [line] = [l for l in markdown.splitlines() if l.startswith("- separated: no matched-reduction p-value")]
    assert "p_value_dir in seed 1" in line and "streaming energy path" in line
    # the arms' own tests still run on the streaming path: nothing to explain there
    assert not [l for l in markdown.splitlines() if "no single-model p-value" in l]
    assert payload["specificity"]["separated"]["p_value"]["combined"] is not None


def test_compare_with_no_permutations_says_so_for_every_test(tmp_path):
    settings = synthetic_settings(tmp_path, epochs=1, energy_permutations=0)
    compare.run_compare("SASRec", "synthetic", config_dict=settings, seeds=1, output=tmp_path / "out")
    markdown = (tmp_path / "out" / "compare.md").read_text()
    assert [l for l in markdown.splitlines() if l.startswith("- separated: no matched-reduction p-value")
            and "energy_permutations = 0" in l]
    assert [l for l in markdown.splitlines() if l.startswith("- standard: no single-model p-value")
            and "energy_permutations = 0" in l]


def test_a_released_arm_keeps_its_statistics_on_the_host_only():
    from recbole_popprior.evaluator.collector import EnergyState
    from recbole_popprior.evaluator.energy import ContextStats

    E, log_prior = torch.randn(11, 4), torch.log(torch.rand(11))
    state = EnergyState(log_prior, log_prior[None, :], permutations=0, seed=0, subspace_energy=0.95,
                        with_subspace=True)
    state.E, state.contexts, state.path = E.detach(), ContextStats.from_H(torch.randn(5, 4)), "factorised"
    arm = compare.Arm("separated", pipe=object(), result={}, state=state)
    before = state.energy()["dir_frac"]
    compare.release_arm(arm)
    assert arm.pipe is None
    assert all(isinstance(x, np.ndarray) for x in (state.E, state.log_prior, state.windows_log_prior))
    state._energy = None
    assert state.energy()["dir_frac"] == pytest.approx(before, rel=1e-12)
