"""Entry point: `python run.py [group=choice ...] [key=value ...]`, or `-m` for a sweep.

Composes conf/config.yaml with the overrides, then runs the pipeline
(data -> SFT -> token weights -> preference training -> evaluation -> results.json).
"""
import hydra
from omegaconf import DictConfig

import tisdpo.resolvers  # noqa: F401  (registers ${slug:...} used in conf/hydra)


@hydra.main(version_base="1.3", config_path="conf", config_name="config")
def main(cfg: DictConfig) -> float | None:
    # Imported late: `--help` and `--cfg` stay instant. A failure leaves failed.json in the run dir
    # (then propagates: Hydra marks the job failed and a sweep's other jobs still run).
    from tisdpo.pipeline.failures import run_recorded

    results = run_recorded(cfg)
    # The returned value is what Hydra sweepers (e.g. Optuna) optimise.
    return results.get("val/rewards/accuracies")


if __name__ == "__main__":
    main()
