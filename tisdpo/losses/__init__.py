"""Preference losses: pure functions on per-token [B, T] tensors (see DESIGN "Loss contract").

    f(policy_chosen_logps, policy_rejected_logps, reference_chosen_logps,
      reference_rejected_logps, chosen_mask, rejected_mask, *, chosen_weights=None,
      rejected_weights=None, chosen_kl=None, rejected_kl=None, **hparams)
      -> (losses [B], chosen_rewards [B], rejected_rewards [B])

Each ``<name>.py`` holds one loss and its ``RECORD`` (``record.py``: which KL it needs, which token
weights it takes, its extra inputs and auxiliary terms, its checks); ``conf/loss/<name>.yaml`` is
the only list of names (``registry.py``). The names below are re-exported for convenience only.
"""
from __future__ import annotations

from .dpo import dpo_loss
from .ipo import ipo_loss
from .kto import kto_loss
from .record import POLICY_REF, REF_POLICY
from .tdpo import tdpo_loss
from .tidpo import tidpo_loss
from .tidpo_triplet import triplet_loss
from .tisdpo import tisdpo_loss

__all__ = ["REF_POLICY", "POLICY_REF", "dpo_loss", "ipo_loss", "kto_loss", "tdpo_loss", "tisdpo_loss",
           "tidpo_loss", "triplet_loss"]
