"""``prior_source``: the training prior counted on the targets, or the synthetic generator's true marginal
(recbole_popprior/prior_source.py, docs/DESIGN.md §2)."""

from __future__ import annotations

import numpy as np
import pytest

from conftest import numpy_log_prior, synthetic_settings
from recbole_popprior.compare import arm_config, run_compare
from recbole_popprior.config import Config
from recbole_popprior.data.synthetic import load_truth, zipf_log_p
from recbole_popprior.errors import PopPriorError
from recbole_popprior.quick_start import build_pipeline


def _pipe(tmp_path, **overrides):
    config = arm_config("SASRec", "synthetic", None, synthetic_settings(tmp_path, **overrides), seed=None,
                        baseline=False, run_dir=tmp_path / "run")
    return build_pipeline(config, log=False)


def test_truth_is_the_generators_zipf_marginal_in_recboles_item_ids(tmp_path) -> None:
    pipe = _pipe(tmp_path, prior_source="truth")
    dataset, prior = pipe.dataset, pipe.model.log_prior.double().numpy()
    tokens = dataset.field2id_token[dataset.iid_field]
    raw = np.array([int(t) for t in tokens[1:]])  # RecBole's id -> the generator's item 1..n
    n = int(pipe.config["synthetic_items"])
    np.testing.assert_allclose(prior[1:], zipf_log_p(n, float(pipe.config["synthetic_zipf"]))[raw - 1], rtol=1e-6)
    np.testing.assert_allclose(prior[1:], load_truth(pipe.config).log_p[raw - 1], rtol=1e-6)
    assert prior[0] == -np.inf and pipe.model.prior_source == "truth"


def test_estimate_stays_the_smoothed_count_of_the_training_targets(tmp_path) -> None:
    pipe = _pipe(tmp_path)
    train = pipe.train_data.dataset
    expected = numpy_log_prior(train.inter_feat[train.iid_field].numpy(), train.item_num)
    np.testing.assert_allclose(pipe.model.log_prior.double().numpy()[1:], expected[1:], rtol=1e-6)
    assert pipe.model.prior_source == "estimate"


@pytest.mark.parametrize("overrides, words", [
    ({"prior_source": "truth", "prior_mode": "windowed"}, "use prior_mode: static"),
    ({"prior_source": True}, "write truth"),
    ({"prior_source": "estimat"}, "prior_source must be one of estimate, truth"),
])
def test_bad_prior_source_settings_are_one_line(tmp_path, overrides, words) -> None:
    with pytest.raises(PopPriorError, match=words):
        Config("SASRec", "synthetic", config_dict=synthetic_settings(tmp_path, **overrides))


def test_truth_needs_a_data_set_with_known_truth(tmp_path) -> None:
    with pytest.raises(PopPriorError, match="needs a data set with known truth"):
        Config("SASRec", "ml-100k", config_dict={"prior_source": "truth", "data_path": str(tmp_path)})


def test_compare_runs_with_the_true_prior(tmp_path) -> None:
    """The separated arm counts no prior of its own, so the check that arms counted the same one is skipped;
    the matched reduction is still measured along the standard arm's estimated l."""
    payload = run_compare("SASRec", "synthetic", config_dict=synthetic_settings(tmp_path, epochs=1,
                                                                                 prior_source="truth"),
                          seeds=1, output=tmp_path / "cmp")
    reduction = payload["per_seed"][0]["reductions"]["separated"]
    assert np.isfinite(reduction["R_dir"]) and 0.0 < reduction["R_dir"] <= 1.0
