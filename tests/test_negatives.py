"""``softmax_negatives: auto`` (recbole_popprior/model/negatives.py, docs/DESIGN.md §6.1): the full softmax
while one batch's ``[train_batch_size, n_items]`` float32 logits fit ``eval_score_budget_mb``, otherwise
sampled softmax with K = 8192, with a log line; the config checks; the tianchi and alibaba defaults; and
every arm of a comparison resolving it alike."""

from __future__ import annotations

import logging

import pytest

from conftest import synthetic_settings, tiny_config

from recbole_popprior.arms import ARMS, arm_overrides, resolve_arm
from recbole_popprior.compare import arm_config
from recbole_popprior.config import Config
from recbole_popprior.errors import PopPriorError
from recbole_popprior.model.negatives import AUTO_NEGATIVES, logits_mb, resolve_negatives
from recbole_popprior.model.sampled_softmax import SampledSoftmax
from recbole_popprior.quick_start import build_pipeline


def _config(**overrides):
    return {"softmax_negatives": "auto", "train_batch_size": 2048, "eval_score_budget_mb": 1024, **overrides}


def test_auto_is_the_full_softmax_while_its_logits_fit_the_budget(caplog):
    caplog.set_level(logging.INFO)
    fits = 1024 * 2**20 // (2048 * 4)  # 131,072 items: exactly 1024 MB of logits
    assert logits_mb(_config(), fits) == 1024
    assert resolve_negatives(_config(), fits) == 0
    assert resolve_negatives(_config(), fits + 1) == AUTO_NEGATIVES == 8192
    assert resolve_negatives(_config(), 731_000) == 8192  # the Tianchi log: 5.7 GB of logits
    assert resolve_negatives(_config(train_batch_size=256), 731_000) == 0  # 714 MB
    assert resolve_negatives(_config(eval_score_budget_mb=64), 96_000) == 8192
    lines = [r.getMessage() for r in caplog.records if "softmax_negatives: auto" in r.getMessage()]
    assert len(lines) == 5 and "full softmax" in lines[0] and "K = 8192" in lines[1] and "5,711 MB" in lines[2]


@pytest.mark.parametrize("overrides", [{"loss_type": "BPR"}, {"remedy": "directspec"}, {"remedy": "adap_tau"},
                                       {"remedy": "resn", "resn_link": "sigmoid"}, {"popprior_baseline": True}])
def test_auto_stays_full_where_sampled_softmax_cannot_apply(overrides):
    assert resolve_negatives(_config(**overrides), 731_000) == 0
    assert resolve_negatives(_config(remedy="resn", resn_link="identity"), 731_000) == 8192
    assert resolve_negatives(_config(), 731_000, model_refusal="its score is not a dot product") == 0
    assert resolve_negatives({"softmax_negatives": 17}, 10) == 17  # a number is itself


@pytest.mark.parametrize("budget, sampled", [(1024, False), (0.001, True)])
def test_a_model_resolves_auto_from_its_item_count(tiny_data, budget, sampled):
    config = Config(model="SASRec", dataset="tiny", config_dict=tiny_config(
        tiny_data, fast_loader=False, softmax_negatives="auto", eval_score_budget_mb=budget))
    pipe = build_pipeline(config, log=False)
    objective = pipe.model.training_objective
    assert isinstance(objective, SampledSoftmax) == sampled
    if sampled:
        assert objective.negatives == AUTO_NEGATIVES


@pytest.mark.parametrize("value, match", [("autoo", "softmax_negatives must be an integer"),
                                          (-3, "softmax_negatives must be >= 0"), (True, "must be an integer")])
def test_bad_values_are_one_line_errors(tiny_data, value, match):
    with pytest.raises(PopPriorError, match=match):
        Config(model="SASRec", dataset="tiny", config_dict=tiny_config(tiny_data, softmax_negatives=value))


def test_auto_is_the_default_of_the_large_logs_and_composes_with_the_remedies(tmp_path):
    for dataset in ("tianchi", "alibaba"):
        assert Config(model="SASRec", dataset=dataset, config_dict={"gpu_id": ""})["softmax_negatives"] == "auto"
    assert Config(model="SASRec", dataset="synthetic", config_dict={"gpu_id": ""})["softmax_negatives"] == 0
    # auto does not trip the checks that refuse an explicit K with these losses
    for extra in ({"remedy": "directspec", "prior_tau": 0.0}, {"loss_type": "BPR", "train_neg_sample_args": {
            "distribution": "uniform", "sample_num": 1}}, {"popprior_baseline": True}):
        Config(model="SASRec", dataset="tianchi", config_dict={"gpu_id": "", **extra})


@pytest.mark.parametrize("budget, sampled", [(1024, False), (0.001, True)])
def test_every_compare_arm_resolves_auto_alike(tmp_path, budget, sampled):
    """The standard arm is the plugin's class at tau = 0 under auto (RecBole's own class could not follow a
    sampled choice), and it makes the same choice as the separated arm."""
    settings = synthetic_settings(tmp_path, softmax_negatives="auto", eval_score_budget_mb=budget)
    probe = Config(model="SASRec", dataset="synthetic", config_dict=settings)
    defaults = Config(model="SASRec", dataset="synthetic", config_dict={"gpu_id": ""}).final_config_dict
    choices = []
    for name in ("standard", "separated"):
        spec = resolve_arm(ARMS[name], probe.final_config_dict)
        config = arm_config("SASRec", "synthetic", None, settings, seed=None, baseline=spec.baseline,
                            run_dir=tmp_path / name, overrides=arm_overrides(spec, ARMS, defaults))
        model = build_pipeline(config, log=False).model
        choices.append((spec.baseline, type(model.training_objective).__name__,
                        getattr(model.training_objective, "negatives", 0)))
    assert choices[0] == (False, *choices[1][1:])
    assert (choices[1][1] == "SampledSoftmax") == sampled
