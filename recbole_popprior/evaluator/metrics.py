"""RecBole metrics for popularity-aligned score energy and embedding diagnostics.

They measure the LEARNED dot product only (no ``beta * log p_hat`` term), on the
evaluation contexts (DESIGN.md §3-4), for the plugin's models and for RecBole's own
baselines alike. They need the plugin's trainer (:mod:`recbole_popprior.trainer`), whose
collector (:class:`~recbole_popprior.evaluator.collector.PopPriorCollector`) gathers the
contexts. Registered in RecBole's registry when the plugin is imported.

=================  ===========================================================================
Metric             Result keys
=================  ===========================================================================
PopEnergy          ``pop_total`` (T, centred energy), ``pop_e_dir``, ``pop_e_shared``,
                   ``pop_e_specific``, ``pop_dir_frac`` (E_dir/T), ``pop_shared_frac``
                   (E_shared/E_dir), ``pop_contexts`` (m)
PopPermutation     ``pop_p_value``, ``pop_null_mean``, ``pop_null_q95``: item-label permutation
                   test of ``pop_dir_frac``; ``pop_p_value_shared``, ``pop_null_mean_shared``,
                   ``pop_null_q95_shared``: the same draws' test of the context-shared energy
                   ``pop_e_shared / pop_total`` (DESIGN §3.1; ``energy_permutations`` draws).
                   Only at the final test evaluation unless ``energy_permutation_stage`` is
                   ``valid``/``always``; the keys are absent where it does not run.
PopSubspace        ``subspace_rank``, ``subspace_frac``, ``subspace_frac@1..3``: share of T in
                   the popularity subspace of the windowed priors (``energy_subspace``
                   threshold). Windows: the model's ``log_prior_windows``, else ``prior_windows``
                   windows of the training targets by ``prior_window_by``.
EmbeddingSpectrum  ``emb_r1``, ``emb_erank``, ``emb_mean_cos``, ``emb_pc1_corr``
                   (``|corr(PC1, log p_hat)|``), ``emb_balance_err`` (NaN without factors)
PopBandRecall      ``headrecall@K``, ``midrecall@K``, ``tailrecall@K`` for every K in ``topk``:
                   Recall@K on target items of the 20/60/20 popularity bands (training counts;
                   ties broken by item id, lower id = more popular)
=================  ===========================================================================

Settings (``properties/overall.yaml``): ``energy_permutations`` (2000),
``energy_permutation_stage`` (``test``), ``energy_max_contexts`` (None: all; else the first N
contexts in evaluation order, which RecBole's evaluation loader keeps fixed), ``energy_subspace``
(0.95), ``energy_seed``.
"""

from __future__ import annotations

import math
from typing import Any

from recbole.evaluator import register
from recbole.evaluator.base_metric import AbstractMetric
from recbole.utils import EvaluatorType

from recbole_popprior.evaluator.collector import (EMBEDDING_KEY, ENERGY_KEY, PERMUTATION_KEY,
                                                  SUBSPACE_KEY, TARGETS_KEY)
from recbole_popprior.evaluator.diagnostics import band_recall, popularity_bands


def _value(x: Any) -> float:
    """Six significant digits: energy fractions like 0.001 must not round to 0.0."""
    x = float(x)
    return x if not math.isfinite(x) else float(f"{x:.6g}")


class _PopPriorMetric(AbstractMetric):
    metric_type = EvaluatorType.RANKING
    smaller = False


class PopEnergy(_PopPriorMetric):
    """Popularity-direction energy of the learned scores (DESIGN §3)."""

    ddp_key_prefixes = ("pop_",)  # computed from statistics summed over workers: already global

    metric_need = [ENERGY_KEY]

    def calculate_metric(self, dataobject) -> dict[str, float]:
        res = dataobject.get(ENERGY_KEY).energy()
        return {"pop_total": _value(res["total"]), "pop_e_dir": _value(res["dir"]),
                "pop_e_shared": _value(res["shared"]), "pop_e_specific": _value(res["specific"]),
                "pop_dir_frac": _value(res["dir_frac"]), "pop_shared_frac": _value(res["shared_frac"]),
                "pop_contexts": res["m"]}


class PopPermutation(_PopPriorMetric):
    """Item-label permutation tests of ``pop_dir_frac`` and of ``E_shared / T`` (DESIGN §3.1)."""

    ddp_key_prefixes = ("pop_",)  # computed from statistics summed over workers: already global

    metric_need = [ENERGY_KEY, PERMUTATION_KEY]

    def calculate_metric(self, dataobject) -> dict[str, float]:
        res = dataobject.get(PERMUTATION_KEY).energy()
        if "p_value" not in res:
            return {}
        return {"pop_p_value": _value(res["p_value"]), "pop_null_mean": _value(res["null_mean"]),
                "pop_null_q95": _value(res["null_q95"]),
                "pop_p_value_shared": _value(res["p_value_shared"]),
                "pop_null_mean_shared": _value(res["null_mean_shared"]),
                "pop_null_q95_shared": _value(res["null_q95_shared"])}


class PopSubspace(_PopPriorMetric):
    """Share of centred energy in the popularity subspace of the windowed priors (DESIGN §3)."""

    ddp_key_prefixes = ("subspace_",)  # computed from statistics summed over workers: already global

    metric_need = [ENERGY_KEY, SUBSPACE_KEY]

    def calculate_metric(self, dataobject) -> dict[str, float]:
        res = dataobject.get(SUBSPACE_KEY).energy()
        out = {"subspace_rank": int(res["subspace_rank"]), "subspace_frac": _value(res["subspace_frac"])}
        out.update({f"subspace_frac@{r}": _value(res[f"subspace_frac@{r}"]) for r in (1, 2, 3)})
        return out


class EmbeddingSpectrum(_PopPriorMetric):
    """Item-embedding spectrum, isotropy, popularity alignment and balance (DESIGN §4)."""

    ddp_key_prefixes = ("emb_",)  # computed from statistics summed over workers: already global

    metric_need = [EMBEDDING_KEY]

    def calculate_metric(self, dataobject) -> dict[str, float]:
        res = dataobject.get(EMBEDDING_KEY).embedding()
        return {"emb_r1": _value(res["R1"]), "emb_erank": _value(res["erank"]),
                "emb_mean_cos": _value(res["mean_cos"]), "emb_pc1_corr": _value(res["pc1_corr"]),
                "emb_balance_err": _value(res["balance_err"])}


class PopBandRecall(_PopPriorMetric):
    """Recall@K on head / middle / tail target items (20/60/20 by training count; DESIGN §4)."""

    metric_need = ["rec.items", "data.count_items", "data.num_items", TARGETS_KEY]

    def __init__(self, config) -> None:
        super().__init__(config)
        self.topk = config["topk"]

    def calculate_metric(self, dataobject) -> dict[str, float]:
        bands = popularity_bands(dataobject.get("data.count_items"), int(dataobject.get("data.num_items")))
        rows, items = dataobject.get(TARGETS_KEY)
        res = band_recall(dataobject.get("rec.items"), rows, items, bands, self.topk)
        return {key: _value(value) for key, value in res.items()}


METRICS = (PopEnergy, PopPermutation, PopSubspace, EmbeddingSpectrum, PopBandRecall)


def register_metrics() -> None:
    """Add the plugin's metrics to RecBole's registry, in place (idempotent).

    ``recbole.evaluator.register`` builds ``metrics_dict``, ``metric_information``,
    ``metric_types`` and ``smaller_metrics`` once at import; ``Config`` (metric_types,
    smaller_metrics), ``Register`` (metric_information) and ``Evaluator`` (metrics_dict) all
    hold references to those same objects, so in-place updates reach every lookup.
    """
    for cls in METRICS:
        name = cls.__name__.lower()
        register.metrics_dict[name] = cls
        register.metric_information[name] = cls.metric_need
        register.metric_types[name] = cls.metric_type
        if cls.smaller and name not in register.smaller_metrics:
            register.smaller_metrics.append(name)
