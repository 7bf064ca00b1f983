"""Serving at another beta with no retraining (docs/DESIGN.md §1; recbole_popprior/serving.py)."""

from __future__ import annotations

import torch

from recbole_popprior.compare import arm_config
from recbole_popprior.quick_start import build_pipeline
from recbole_popprior.serving import serving_beta, sweep_beta
from conftest import numpy_log_prior as _numpy_log_prior, synthetic_settings as _settings


def test_beta_sweep_shifts_scores_by_exactly_beta_minus_tau_log_prior(tmp_path) -> None:
    settings = _settings(tmp_path, prior_tau=0.5, epochs=1)
    config = arm_config("SASRec", "synthetic", None, settings, seed=None, baseline=False,
                        run_dir=tmp_path / "run")
    pipe = build_pipeline(config, log=False)
    pipe.trainer.fit(pipe.train_data, None, saved=False, show_progress=False)
    model, tau = pipe.model, 0.5
    train = pipe.train_data.dataset
    log_prior = torch.as_tensor(_numpy_log_prior(train.inter_feat[train.iid_field].numpy(), train.item_num))
    interaction = next(iter(pipe.test_data))[0]
    model.eval()
    with torch.no_grad():
        normal = model.full_sort_predict(interaction).double()
        for beta in (-1.0, 0.0, 0.5, 2.0):
            with serving_beta(model, beta):
                scores = model.full_sort_predict(interaction).double()
            if beta == tau:
                assert torch.equal(scores, normal)
            shift = (scores - normal)[:, 1:]
            expected = ((beta - tau) * log_prior[1:]).expand_as(shift)
            torch.testing.assert_close(shift, expected, rtol=0, atol=1e-5)
    assert model.prior_beta is None  # restored

    # the sweep's evaluation at beta = tau is exactly the normal serving path's
    normal_result = pipe.trainer.evaluate(pipe.test_data, load_best_model=False)
    rows = sweep_beta(pipe.trainer, pipe.test_data, [0.0, tau, -1.0])
    assert [r["beta"] for r in rows] == [0.0, tau, -1.0]
    assert rows[1] == {"beta": tau, **{k: float(v) for k, v in normal_result.items()}}
    assert rows[0]["averagepopularity@10"] != rows[1]["averagepopularity@10"]
