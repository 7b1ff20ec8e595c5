"""Built-in tasks (generated data with known ground truth)."""

from tisdpo.tasks.synthetic import SyntheticTask, SyntheticTaskConfig

__all__ = ["SyntheticTask", "SyntheticTaskConfig"]
