"""Constants every layer shares.

IGNORE_INDEX  the label of a position that carries no loss (prompt and padding), as in
              Hugging Face and ``torch.nn.functional.cross_entropy``'s default;
SIDES         the two responses of a preference pair, in the order batches stack them.
"""
IGNORE_INDEX = -100
SIDES = ("chosen", "rejected")
