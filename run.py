"""Entry point: `python run.py [group=choice ...] [key=value ...]`, or `-m` for a sweep.

Composes conf/config.yaml with the overrides, then runs the pipeline
(data -> SFT -> token weights -> preference training -> evaluation -> results.json).
"""
import hydra
from omegaconf import DictConfig

import tisdpo.resolvers  # noqa: F401  (registers ${slug:...} used in conf/hydra)


@hydra.main(version_base="1.3", config_path="conf", config_name="config")
def main(cfg: DictConfig) -> float | None:
    from tisdpo.pipeline.runner import run  # imported late: `--help` and `--cfg` stay instant

    results = run(cfg)
    # The returned value is what Hydra sweepers (e.g. Optuna) optimise.
    return results.get("val/rewards/accuracies")


if __name__ == "__main__":
    main()
