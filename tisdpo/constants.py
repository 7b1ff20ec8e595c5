"""Constants every layer shares.

IGNORE_INDEX  the label of a position that carries no loss (prompt and padding), as in
              Hugging Face and ``torch.nn.functional.cross_entropy``'s default;
SIDES         the two responses of a preference pair, in the order batches stack them;
CONF_DIR      the Hydra config tree: its ``loss`` and ``estimator`` groups are the registries of
              losses and estimators (a name is a yaml file there; nothing else lists them).
"""
from pathlib import Path

IGNORE_INDEX = -100
SIDES = ("chosen", "rejected")
CONF_DIR = Path(__file__).resolve().parents[1] / "conf"
