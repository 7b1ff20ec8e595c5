"""Exact resume: a run killed with SIGKILL (a real subprocess) and resumed ends where an uninterrupted
run ends -- same parameters and loss (CPU fp32, 1e-6) -- for preference training and for a stage of
the TIS-DPO pipeline (the estimator's model pair, checkpointed inside its artifact's build dir).

Run as a script, this file is the process that gets killed:
``python tests/test_resume.py <trainer number> <global step> <overrides...>`` runs the pipeline and
SIGKILLs itself in the middle of optimizer step <global step>+1 of the <trainer number>-th Lightning
Trainer the process builds (0-based).
"""
from __future__ import annotations

import logging
import os
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import lightning as L
import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]


def kill_run(tmp_path: Path, trainer: int, step: int, overrides: list[str]) -> subprocess.CompletedProcess:
    env = {**os.environ, "WANDB_MODE": "disabled", "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    cmd = [sys.executable, str(Path(__file__)), str(trainer), str(step), *overrides]
    done = subprocess.run(cmd, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == -signal.SIGKILL, f"expected SIGKILL, got {done.returncode}: {done.stderr[-3000:]}"
    return done


def run_in_process(overrides: list[str]):
    from tests.conftest import compose_config
    from tisdpo.stages.runner import run

    return run(compose_config(overrides))


def paths(run_dir: Path, cache: Path) -> list[str]:
    return [f"paths.root_dir={run_dir.parent}", f"paths.output_dir={run_dir}", f"cache.dir={cache}"]


def tensors(state: dict) -> dict[str, torch.Tensor]:
    return {k: v for k, v in state.items() if isinstance(v, torch.Tensor)}


def assert_same_tensors(a: dict, b: dict, atol: float = 1e-6) -> float:
    a, b = tensors(a), tensors(b)
    assert a.keys() == b.keys() and a
    worst = max(float((a[k].double() - b[k].double()).abs().max()) for k in a)
    assert worst <= atol, f"max |difference| {worst}"
    return worst


def load_ckpt(path: Path) -> dict:
    return torch.load(path, map_location="cpu", weights_only=False)


# ---------------------------------------------------------------------------------------
# the data order and RNG streams, at every kind of kill point (toy module: fast)
# ---------------------------------------------------------------------------------------
class Toy(L.LightningModule):
    def __init__(self):
        super().__init__()
        self.lin = torch.nn.Linear(1, 1)
        self.seen: list[tuple[int, list[int]]] = []

    def training_step(self, batch, batch_idx):
        self.seen.append((self.global_step, batch.tolist()))
        noise = torch.rand(())  # the global RNG stream (dropout, TI-DPO sampling) must resume too
        return ((self.lin(batch.float()[:, None]) - noise) ** 2).mean()

    def validation_step(self, batch, batch_idx):
        torch.rand(5)  # validation draws from the global stream: it must not shift training's

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.01)


def fit_toy(ckpt_dir: Path, ckpt_path: str | None = None, workers: int = 0) -> Toy:
    from torch.utils.data import DataLoader

    from tisdpo.runtime.callbacks import RNGStateCallback
    from tisdpo.stages.loaders import ResumableDataLoader

    L.seed_everything(0, verbose=False)
    module = Toy()
    train = ResumableDataLoader(list(range(10)), batch_size=2, shuffle=True, drop_last=True, num_workers=workers,
                                persistent_workers=workers > 0, generator=torch.Generator().manual_seed(0))
    callbacks = [L.pytorch.callbacks.ModelCheckpoint(dirpath=ckpt_dir, every_n_train_steps=1, save_top_k=-1),
                 RNGStateCallback()]
    trainer = L.Trainer(max_steps=13, logger=False, enable_progress_bar=False, enable_model_summary=False,
                        callbacks=callbacks, val_check_interval=3, check_val_every_n_epoch=None, num_sanity_val_steps=0)
    trainer.fit(module, train, DataLoader(list(range(4)), batch_size=2), ckpt_path=ckpt_path)
    return module


@pytest.mark.parametrize("workers", [0, 2])
def test_resumed_fit_sees_the_same_batches_and_random_numbers(tmp_path, workers):
    # 5 batches per epoch, validation every 3 steps: kill points mid-epoch, at an epoch's end, in epoch 2.
    full = fit_toy(tmp_path / "full", workers=workers)
    for k in (3, 5, 7) if workers else (2, 3, 5, 7, 10):
        checkpoint = next((tmp_path / "full").glob(f"*step={k}.ckpt"))
        resumed = fit_toy(tmp_path / f"from{k}", str(checkpoint), workers=workers)
        assert resumed.seen == full.seen[k:], f"data order after resuming at step {k}"
        assert torch.equal(resumed.lin.weight, full.lin.weight) and torch.equal(resumed.lin.bias, full.lin.bias)


# ---------------------------------------------------------------------------------------
# the pipeline, killed for real
# ---------------------------------------------------------------------------------------
# 40 pairs / batch 8 = 5 batches per epoch: 9 steps cross an epoch; validation every 4 steps.
TRAIN = ["eval=none", "dataset.task.n_train_pairs=40", "train.max_steps=9", "checkpoint.every_n_steps=3",
         "train.val_every_n_steps=4"]


def test_killed_training_resumes_to_the_same_parameters_and_loss(tmp_path):
    cache = tmp_path / "cache"
    straight, killed = tmp_path / "straight", tmp_path / "killed"
    expected = run_in_process(TRAIN + paths(straight, cache))  # also builds the SFT model the others reuse

    # Trainer 0 of the killed process is preference training (SFT comes from the cache). It dies in
    # the middle of step 6: steps 4-5 are lost, the last checkpoint holds step 3.
    kill_run(tmp_path, trainer=0, step=5, overrides=TRAIN + paths(killed, cache))
    assert not (killed / "results.json").exists()
    assert load_ckpt(killed / "checkpoints" / "last.ckpt")["global_step"] == 3

    # `python run.py ... resume=<run dir>`: Hydra gives this process a new dir; the run continues in place.
    elsewhere = tmp_path / "new_hydra_dir"
    resumed = run_in_process(TRAIN + paths(elsewhere, cache) + [f"resume={killed}"])
    assert (killed / "results.json").is_file() and not (elsewhere / "results.json").exists()
    final_a, final_b = load_ckpt(straight / "checkpoints" / "last.ckpt"), load_ckpt(killed / "checkpoints" / "last.ckpt")
    assert final_a["global_step"] == final_b["global_step"] == 9
    worst = assert_same_tensors(final_a["state_dict"], final_b["state_dict"])
    assert_same_tensors(final_a["optimizer_states"][0]["state"][0], final_b["optimizer_states"][0]["state"][0])
    print(f"killed at step 6, resumed from step 3: max |param difference| {worst:.3g}, "
          f"val/loss {resumed['val/loss']:.8f} vs {expected['val/loss']:.8f}")
    for key in ("val/loss", "val/rewards/accuracies", "val/rewards/margins", "val/logps/chosen", "train/steps"):
        assert resumed[key] == pytest.approx(expected[key], abs=1e-6), key

    # resume=true on the finished run (its dir given as the run dir): nothing to redo, same results.
    again = run_in_process(TRAIN + paths(killed, cache) + ["resume=true"])
    assert again["val/loss"] == resumed["val/loss"]


ESTIMATOR = ["loss=tisdpo", "estimator=dpo_pair", "estimator.max_steps=6", "checkpoint.stage_every_n_steps=2",
             "eval=none", "train.max_steps=2", "dataset.task.n_train_pairs=40"]


def test_killed_estimator_stage_resumes_to_the_same_artifact(tmp_path, caplog):
    cache_a, cache_b = tmp_path / "cache_a", tmp_path / "cache_b"
    run_in_process(ESTIMATOR + paths(tmp_path / "straight", cache_a))
    shutil.copytree(cache_a / "sft", cache_b / "sft")  # the SFT model is not what this test is about

    # Trainers of the killed process: 0 = pi+, 1 = pi- (DPO on swapped pairs). pi- dies in step 4.
    kill_run(tmp_path, trainer=1, step=3, overrides=ESTIMATOR + paths(tmp_path / "killed", cache_b))
    [build] = (cache_b / "estimator").glob(".build-*")
    assert (build / "_resume" / "positive.done").is_file() and (build / "positive" / "config.json").is_file()
    assert load_ckpt(build / "_resume" / "negative" / "last.ckpt")["global_step"] == 2
    assert not [p for p in (cache_b / "estimator").iterdir() if not p.name.startswith(".") and p.suffix != ".lock"]

    # The next run that needs the artifact resumes the build (no flag needed: the cache key finds it).
    with caplog.at_level(logging.WARNING, logger="tisdpo.runtime.cache"):
        results = run_in_process(ESTIMATOR + paths(tmp_path / "again", cache_b))
    assert "resuming the interrupted build" in caplog.text
    estimator_events = [e for e in results["stages"] if e["stage"] == "estimator"]
    assert estimator_events[0].get("resumed_build") is True

    [a] = [p for p in (cache_a / "estimator").iterdir() if p.is_dir() and not p.name.startswith(".")]
    b = cache_b / "estimator" / a.name
    assert b.is_dir() and not (b / "_resume").exists() and not list((cache_b / "estimator").glob(".build-*"))
    from safetensors.torch import load_file

    for side in ("positive", "negative"):
        worst = assert_same_tensors(load_file(a / side / "model.safetensors"), load_file(b / side / "model.safetensors"))
        print(f"estimator pi {side}: max |param difference| {worst:.3g}")
    [scores_a] = (cache_a / "scores").glob("*/scores.pt")
    [scores_b] = (cache_b / "scores").glob("*/scores.pt")
    sa, sb = torch.load(scores_a), torch.load(scores_b)
    for side in ("chosen", "rejected"):
        assert max(float((x - y).abs().max()) for x, y in zip(sa[side], sb[side])) <= 1e-6


# ---------------------------------------------------------------------------------------
# which checkpoint, which dir, which config
# ---------------------------------------------------------------------------------------
def test_unreadable_last_checkpoint_falls_back_to_the_newest_readable(tmp_path):
    from tisdpo.runtime.checkpoints import find_checkpoint

    ckpts = tmp_path / "checkpoints"
    ckpts.mkdir()
    for step in (3, 6):
        torch.save({"global_step": step}, ckpts / f"epoch=0-step={step}.ckpt")
    (ckpts / "last.ckpt").write_bytes((ckpts / "epoch=0-step=6.ckpt").read_bytes()[:100])  # killed mid-write
    assert find_checkpoint(ckpts).name == "epoch=0-step=6.ckpt"
    (ckpts / "epoch=0-step=6.ckpt").write_bytes(b"")
    assert find_checkpoint(ckpts).name == "epoch=0-step=3.ckpt"
    assert find_checkpoint(tmp_path / "absent") is None


def test_resume_with_a_different_config_is_one_clear_error(tmp_path):
    from tests.conftest import compose_config
    from tisdpo.runtime.run_dir import begin_run, prepare_run_dir
    from tisdpo.runtime.validate import ConfigError
    from omegaconf import OmegaConf

    def start(*overrides):
        cfg = compose_config(list(overrides), tmp_path)
        out = prepare_run_dir(cfg)
        return begin_run(cfg, out, OmegaConf.to_container(cfg, resolve=True))

    start("loss=ipo")
    start("loss=ipo", "resume=true", "eval=none", "logger=csv")  # eval, logger, paths may change
    with pytest.raises(ConfigError, match=r"loss.name: 'ipo' -> 'dpo'.*overrides.yaml"):
        start("resume=true")
    cfg = compose_config([f"resume={tmp_path / 'nowhere'}"], tmp_path)
    from tisdpo.runtime.validate import validate_config

    with pytest.raises(ConfigError, match="no such run dir"):
        validate_config(cfg)


def test_resume_true_in_a_fresh_dir_says_where_to_point_it(tmp_path, caplog):
    from tests.conftest import compose_config
    from tisdpo.runtime.run_dir import train_checkpoint

    cfg = compose_config(["resume=true"], tmp_path)
    with caplog.at_level(logging.WARNING):
        assert train_checkpoint(cfg, tmp_path) is None
    assert "hydra.run.dir=<the previous run dir>, or resume=<the previous run dir>" in caplog.text


# ---------------------------------------------------------------------------------------
# the process that gets killed
# ---------------------------------------------------------------------------------------
def _killed_main(trainer_number: int, step: int, overrides: list[str]) -> None:
    import tisdpo.runtime.fit as fit
    from tests.conftest import compose_config
    from tisdpo.stages.runner import run

    class KillMidStep(L.Callback):
        def on_before_optimizer_step(self, trainer, pl_module, optimizer):
            if trainer.global_step == step:  # backward of step+1 done, its update not applied
                os.kill(os.getpid(), signal.SIGKILL)

    original, built = fit.build_trainer, []

    def build_trainer(trainer_cfg, **kwargs):
        if len(built) == trainer_number:
            kwargs["callbacks"] = [*(kwargs.get("callbacks") or []), KillMidStep()]
        built.append(1)
        return original(trainer_cfg, **kwargs)

    fit.build_trainer = build_trainer  # every stage builds its trainer through fit.fit_stage
    torch.set_num_threads(1)
    run(compose_config(overrides))
    sys.exit(f"not killed: {len(built)} trainers built, the kill was for trainer {trainer_number} at step {step}")


if __name__ == "__main__":
    sys.path.insert(0, str(ROOT))
    _killed_main(int(sys.argv[1]), int(sys.argv[2]), sys.argv[3:])
