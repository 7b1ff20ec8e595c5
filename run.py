"""Entry point: `python run.py [group=choice ...] [key=value ...]`, or `-m` for a sweep.

Composes conf/config.yaml with the overrides, then runs the pipeline
(data -> SFT -> token weights -> preference training -> evaluation -> results.json).
"""
import sys

import hydra
from omegaconf import DictConfig

import tisdpo.resolvers  # noqa: F401  (registers ${slug:...} used in conf/hydra)


@hydra.main(version_base="1.3", config_path="conf", config_name="config")
def main(cfg: DictConfig) -> float | None:
    # Imported late: `--help` and `--cfg` stay instant. A failure leaves failed.json in the run dir
    # (then propagates: Hydra marks the job failed and a sweep's other jobs still run); a signal
    # (SIGTERM, Ctrl+C) checkpoints, records "interrupted" and exits with 128 + its number.
    from tisdpo.runtime.failures import run_recorded

    results = run_recorded(cfg, run_pipeline)
    # The returned value is what Hydra sweepers (e.g. Optuna) optimise.
    return results.get("val/rewards/accuracies")


def run_pipeline(cfg: DictConfig) -> dict:
    # The runner imports torch and Lightning: only once the config has been checked (a typo answers at once).
    from tisdpo.stages.runner import run

    return run(cfg)


def reject_pipeline_trainer_keys(args: list[str]) -> None:
    """Before Hydra composes: `trainer.max_steps=5` would fail its struct check with no hint (and
    `+trainer.max_steps=5` be silently overwritten by train.max_steps); a run dir that cannot be
    written would be a traceback from Hydra. One line, exit status 2."""
    from tisdpo.runtime.config_guard import command_line_problem
    from tisdpo.runtime.validate import override_problem

    problem = override_problem(args) or command_line_problem(args)
    if problem:
        print(f"config error: {problem}", file=sys.stderr)
        raise SystemExit(2)


if __name__ == "__main__":
    reject_pipeline_trainer_keys(sys.argv[1:])
    main()
