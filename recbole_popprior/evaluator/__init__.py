"""The evaluator: popularity-aligned score energy and embedding diagnostics (docs/DESIGN.md §3-4).

Importing this package registers the plugin's metrics (``PopEnergy``, ``PopPermutation``,
``PopSubspace``, ``EmbeddingSpectrum``, ``PopBandRecall``) in RecBole's registry.
"""

from recbole_popprior.evaluator.diagnostics import (band_recall, embedding_diagnostics,
                                                    popularity_bands)
from recbole_popprior.evaluator.energy import (ContextStats, ScoreStats, energy_from_stats,
                                               matched_reduction, permuted_directions,
                                               popularity_energy)
from recbole_popprior.evaluator.metrics import register_metrics

register_metrics()

__all__ = ["ContextStats", "ScoreStats", "energy_from_stats", "matched_reduction",
           "permuted_directions", "popularity_energy", "embedding_diagnostics",
           "popularity_bands", "band_recall", "register_metrics"]
