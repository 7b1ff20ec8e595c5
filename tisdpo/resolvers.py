"""OmegaConf resolvers used by the configs; registered once on import (run.py imports this)."""
import re

from omegaconf import OmegaConf


def slug(text: str) -> str:
    """A label made safe for a directory name: 'w/o η' -> 'w-o_η', 'TIS-DPO(D)' -> 'TIS-DPO(D)'."""
    return re.sub(r"[^\w().+-]+", "_", str(text).replace("/", "-")).strip("_") or "run"


if not OmegaConf.has_resolver("slug"):
    OmegaConf.register_new_resolver("slug", slug)
