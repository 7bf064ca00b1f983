"""Mixed precision (docs/DESIGN.md §9.2): RecBole's ``enable_amp`` through the plugin's trainer, on CPU
(bfloat16 autocast).

- the prior, the logQ and the pairwise prior terms are added to float32 logits, whatever the
  autocast dtype (bf16 keeps 8 significant bits: a prior rounded to it is off by up to 2^-8 of
  its size);
- each objective's loss under bf16 autocast is within 1e-2 (relative) of its float32 loss on the
  same batch and weights, and finite. Why 1e-2: bf16's unit roundoff is 2^-8 = 3.9e-3 and a loss
  is a smooth mean over rows whose logits carry a few such roundings; the differences measured
  here are 1e-7 to 3e-4;
- one training epoch of every supported model with ``enable_amp: True`` through the plugin's
  trainer runs under autocast, stays finite and moves the weights;
- the energy statistics stay float64 under autocast;
- on known truth, the separated model trained with AMP still recovers PMI (as tests/test_theory.py);
- ``amp_dtype`` is checked.
"""

from __future__ import annotations

import logging
import math

import pytest
import torch

from conftest import pmi_spearman, theory_settings, tiny_config
from test_model_zoo import _CACHE, Zoo, s3rec_pretrained, zoo_data  # noqa: F401  (fixtures)

from recbole_popprior.compat import AUTOCAST_BROKEN
from recbole_popprior.compare import arm_config, train_arm
from recbole_popprior.config import Config
from recbole_popprior.errors import PopPriorError
from recbole_popprior.evaluator.energy import matched_reduction, popularity_energy
from recbole_popprior.model import supported_models
from recbole_popprior.trainer import autocast_dtype, get_trainer

BF16 = torch.bfloat16
LOSS_RTOL = 1e-2


def _zoo(name, data, pretrained, **overrides) -> Zoo:
    key = name if not overrides else f"{name}-{sorted(overrides.items())}"
    if key not in _CACHE:
        _CACHE[key] = Zoo(name, data, pretrained, **overrides)
    return _CACHE[key]


# --- the prior terms stay float32 --------------------------------------------------------------------
def test_the_training_prior_is_added_in_float32_to_bf16_logits(zoo_data, s3rec_pretrained):  # noqa: F811
    model = _zoo("SASRec", zoo_data, s3rec_pretrained).plugin(prior_tau=1.0)
    n = model.log_prior.shape[0]
    logits = torch.randn(5, n).to(BF16)
    out = model.add_training_prior(logits)
    assert out.dtype == torch.float32
    expected = logits.float() + model.log_prior  # the float32 prior, padding -inf
    torch.testing.assert_close(out[:, 1:], expected[:, 1:], rtol=0, atol=0)
    # what adding it in bf16 would have given is measurably off
    in_bf16 = (logits + model.log_prior.to(BF16)).float()
    assert (in_bf16[:, 1:] - expected[:, 1:]).abs().max() > 1e-3


def test_sampled_and_pairwise_logits_are_float32_under_autocast(zoo_data, s3rec_pretrained):  # noqa: F811
    from recbole_popprior.model.factors import training_factors
    from recbole_popprior.model.objective import TrainingBatch

    zoo = _zoo("SASRec", zoo_data, s3rec_pretrained)
    model = zoo.plugin(softmax_negatives=8)
    model.eval()
    with torch.no_grad(), torch.autocast("cpu", dtype=BF16):
        parts = training_factors(model, zoo.train_batch)
        assert (parts.H @ parts.E.T).dtype == BF16  # the matmul does run in bf16
        batch = TrainingBatch(parts.H, parts.E, parts.targets)
        objective = model.training_objective
        logits = objective.logits(model, batch, objective.draw())
        assert logits.dtype == torch.float32
    assert logits.dtype == torch.float32


# --- each objective: bf16 loss close to float32 --------------------------------------------------------
OBJECTIVES = [
    ("SASRec", "full softmax", {}, {}),
    ("SASRec", "BPR", {"loss_type": "BPR"}, {}),
    ("SASRec", "sampled softmax", {}, {"softmax_negatives": 8}),
    ("SASRec", "windowed", {"prior_mode": "windowed", "prior_windows": 3}, {}),
    ("SASRec", "learned tau", {}, {"prior_tau": "learned"}),
    ("SASRec", "directspec", {}, {"prior_tau": 0.0, "remedy": "directspec"}),
    ("SASRec", "adap_tau", {}, {"prior_tau": 0.0, "remedy": "adap_tau"}),
    ("SASRec", "resn", {}, {"remedy": "resn"}),
    ("SASRec", "resn identity, sampled", {}, {"remedy": "resn", "resn_link": "identity", "softmax_negatives": 8}),
    ("GRU4Rec", "full softmax", {}, {}),
    ("NARM", "BPR", {"loss_type": "BPR"}, {}),
    ("BERT4Rec", "full softmax", {}, {}),
    ("BERT4Rec", "sampled softmax", {}, {"softmax_negatives": 8}),
    ("CORE", "full softmax", {}, {}),
    ("SINE", "NLL (log space)", {"loss_type": "NLL"}, {}),
]


@pytest.mark.parametrize("name,case,data_keys,model_keys", OBJECTIVES, ids=[f"{o[0]}-{o[1]}" for o in OBJECTIVES])
def test_bf16_loss_is_close_to_float32(name, case, data_keys, model_keys, zoo_data, s3rec_pretrained):  # noqa: F811
    zoo = _zoo(name, zoo_data, s3rec_pretrained, **data_keys)
    model = zoo.plugin(**model_keys)
    model.eval()  # no dropout: both runs see the same network
    losses = []
    for enabled in (False, True):
        torch.manual_seed(0)  # the same sampled negatives
        with torch.no_grad(), torch.autocast("cpu", dtype=BF16, enabled=enabled):
            losses.append(float(model.calculate_loss(zoo.train_batch)))
    fp32, bf16 = losses
    assert math.isfinite(bf16) and math.isfinite(fp32)
    assert bf16 == pytest.approx(fp32, rel=LOSS_RTOL)


# --- enable_amp trains every model through the plugin's trainer ----------------------------------------
@pytest.mark.parametrize("name", supported_models())
def test_enable_amp_trains_every_model(name, zoo_data, s3rec_pretrained, tmp_path, monkeypatch, caplog):  # noqa: F811
    monkeypatch.chdir(tmp_path)  # RecBole's trainer opens log_tensorboard/ under the working directory
    zoo = _zoo(name, zoo_data, s3rec_pretrained)
    saved = {k: zoo.config[k] for k in ("enable_amp", "checkpoint_dir")}
    zoo.config["enable_amp"], zoo.config["checkpoint_dir"] = True, str(tmp_path)
    try:
        model = zoo.plugin()
        with caplog.at_level(logging.WARNING):
            trainer = get_trainer(zoo.config)(zoo.config, model)
    finally:
        for key, value in saved.items():
            zoo.config[key] = value
    assert trainer.enable_amp and not trainer.enable_scaler  # no CUDA scaler for a CPU model
    # RecBole's CPR models and RepeatNet fail under autocast (compat shim 9): they train in float32
    expected = (False, BF16) if name in AUTOCAST_BROKEN else (True, BF16)
    said = [r.getMessage() for r in caplog.records if "trains in float32" in r.getMessage()]
    assert len(said) == (name in AUTOCAST_BROKEN) and (not said or name in said[0])
    seen = []
    inner = model.calculate_loss

    def spy(interaction):
        seen.append((torch.is_autocast_enabled("cpu"), torch.get_autocast_dtype("cpu")))
        return inner(interaction)

    model.calculate_loss = spy
    before = [p.detach().clone() for p in model.parameters()]
    total = trainer._train_epoch(zoo.train_data, 0)
    assert seen and all(s == expected for s in seen)
    total = sum(total) if isinstance(total, tuple) else total
    assert math.isfinite(total)
    assert any(not torch.equal(b, p) for b, p in zip(before, model.parameters()))
    assert all(torch.isfinite(p).all() for p in model.parameters())


# --- the energy statistics stay float64 ----------------------------------------------------------------
def test_energy_statistics_ignore_autocast():
    g = torch.Generator().manual_seed(0)
    H, E = torch.randn(50, 8, generator=g), torch.randn(31, 8, generator=g)
    lp = torch.log_softmax(torch.randn(31, generator=g), 0)
    lp[0] = -torch.inf
    plain = popularity_energy(H, E, lp, permutations=50, seed=1)
    other = (H * 0.5 + 0.1, E)
    reduction = matched_reduction((H, E), other, permutations=50, seed=1, log_prior=lp)
    with torch.autocast("cpu", dtype=BF16):
        assert popularity_energy(H, E, lp, permutations=50, seed=1) == plain
        assert matched_reduction((H, E), other, permutations=50, seed=1, log_prior=lp) == reduction


# --- known truth with AMP ---------------------------------------------------------------------------
@pytest.mark.slow
def test_separated_model_trained_with_amp_tracks_pmi(tmp_path):
    settings = theory_settings(tmp_path, enable_amp=True)
    config = arm_config("SASRec", "synthetic", None, settings, seed=None, baseline=False, run_dir=tmp_path / "sep")
    arm = train_arm("separated", config, saved=False)
    assert arm.pipe.trainer.enable_amp
    rho, rho_pop = pmi_spearman(arm)
    assert rho >= 0.90, rho  # tests/test_theory.py's bound for the float32 run
    assert rho_pop < rho, (rho_pop, rho)


# --- settings ------------------------------------------------------------------------------------------
@pytest.mark.parametrize("overrides,match", [
    ({"enable_amp": True, "amp_dtype": "float16"}, "amp_dtype: float16 needs a CUDA device"),
    ({"amp_dtype": "half"}, "amp_dtype must be one of"),
    ({"enable_amp": "yes"}, "enable_amp must be True or False"),
    ({"enable_scaler": 1}, "enable_scaler must be True or False"),
])
def test_bad_precision_settings_are_one_line_errors(tiny_data, overrides, match):
    with pytest.raises(PopPriorError, match=match) as info:
        Config(model="SASRec", dataset="tiny", config_dict=tiny_config(tiny_data, **overrides))
    assert "\n" not in str(info.value)


def test_bf16_on_cpu_is_accepted_and_the_autocast_dtype_is_restored(tiny_data):
    Config(model="SASRec", dataset="tiny", config_dict=tiny_config(tiny_data, enable_amp=True, amp_dtype="bfloat16"))
    before = torch.get_autocast_dtype("cpu")
    with autocast_dtype("cpu", torch.float16):
        with torch.autocast("cpu"):
            assert (torch.ones(2, 2) @ torch.ones(2, 2)).dtype == torch.float16
    assert torch.get_autocast_dtype("cpu") == before


def test_resn_power_iteration_does_not_overflow_fp16():
    """ReSN's identity penalty sums the batch (``items @ H^T 1``): past fp16's 65504 for a batch of
    2048 contexts of norm ~40. Under fp16 autocast it runs in float32 and matches float32."""
    from recbole_popprior.remedies.resn import resn_penalty

    g = torch.Generator().manual_seed(0)
    H = 5.0 + torch.randn(2048, 64, generator=g)
    E = 1.0 + torch.rand(500, 64, generator=g)
    assert torch.isinf((E[1:].half() @ H.half().sum(0))).any()  # what fp16 would do
    reference = resn_penalty(H, E, "identity", 2)
    with torch.autocast("cpu", dtype=torch.float16):
        assert (H @ E.T).dtype == torch.float16
        penalty = resn_penalty(H, E, "identity", 2)
    assert penalty.dtype == torch.float32 and torch.isfinite(penalty)
    assert float(penalty) == pytest.approx(float(reference), rel=1e-6)
