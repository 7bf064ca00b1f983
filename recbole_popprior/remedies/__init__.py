"""Other published remedies for popularity-dominated or anisotropic embeddings (DESIGN.md §7).

Pure torch functions of what a training step has: the batch contexts ``H [B, d]``, the item
table ``E [n_items, d]`` (row 0 = padding, never scores), the target ids, and per-epoch state
where a method needs it. The model mixin calls them; none of them touches a model.

- :mod:`.directspec`  DirectSpec / DirectSpec+ spectrum-balancing filter (§7.1)
- :mod:`.adap_tau`    Adap-tau global and per-user temperatures (§7.2)
- :mod:`.ace`         ACE linear-autoencoder reshaping of a given item table (§7.3)
- :mod:`.resn`        ReSN spectral-norm penalty on the score matrix (§7.4)
"""

from recbole_popprior.remedies.ace import ace_init_table, ace_load_table, ace_reshape
from recbole_popprior.remedies.adap_tau import (AdapTauStats, adap_tau_active_users, adap_tau_batch_stats,
                                                adap_tau_global_temperature, adap_tau_loss, adap_tau_t0,
                                                adap_tau_temperatures, adap_tau_user_mean_loss)
from recbole_popprior.remedies.directspec import directspec_filter, directspec_logits, directspec_loss
from recbole_popprior.remedies.resn import resn_penalty, resn_penalty_from_scores

__all__ = [
    "AdapTauStats", "ace_init_table", "ace_load_table", "ace_reshape", "adap_tau_active_users",
    "adap_tau_batch_stats", "adap_tau_global_temperature", "adap_tau_loss", "adap_tau_t0",
    "adap_tau_temperatures", "adap_tau_user_mean_loss", "directspec_filter", "directspec_logits",
    "directspec_loss", "resn_penalty", "resn_penalty_from_scores",
]
