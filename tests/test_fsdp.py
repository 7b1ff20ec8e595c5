"""Real 2-process FSDP on the CPU (gloo), through conf/trainer/fsdp_cpu.yaml: Lightning's FSDP
machinery with the same wrap unit, sharded reference, norm clipping and consolidation as
trainer=fsdp on GPUs (tisdpo/runtime/sharded.py says what the CPU strategy changes).

- TDPO (the reference runs every step, sharded by train.reference_placement=auto): per-step loss
  and the consolidated weights after N steps match a single-process run with the same global batch.
- The whole pipeline (`python run.py trainer=fsdp_cpu method=tisdpo_d`): SFT and the estimator
  models trained with the run's strategy on both ranks, rank 0 scoring, evaluating the gathered
  policy and exporting it.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.multiprocessing as mp
from omegaconf import OmegaConf

from tests.conftest import ROOT, TINY, compose_config
from tests.test_ddp import OPTIM, PER_DEVICE, STEPS, WORLD, StepLosses, _free_port, _setup, ddp_order
from tisdpo.models.loading import frozen_copy
from tisdpo.models.sharding import is_sharded
from tisdpo.modules.preference import PreferenceModule
from tisdpo.runtime.fit import build_trainer, save_trained
from tisdpo.stages.loaders import preference_loader
from tisdpo.losses.registry import bind_loss
from tisdpo.runtime.sharded import ShardedReference, reference_placement

pytestmark = pytest.mark.skipif(not torch.distributed.is_available() or not torch.distributed.is_gloo_available(),
                                reason="torch.distributed with gloo is not available")


def _fit(trainer_name: str, batch_size: int, out_dir: Path, order: list[int] | None = None):
    """STEPS steps of TDPO; returns this rank's per-step losses and example indices, and whether it saved."""
    tokenizer, examples, policy = _setup()
    if order is not None:
        examples = [examples[i] for i in order]
    cfg = compose_config([f"trainer={trainer_name}", "loss=tdpo"], tiny=False)
    reference = frozen_copy(policy)
    module = PreferenceModule(policy, reference, bind_loss(cfg.loss), OmegaConf.create(OPTIM),
                              total_steps=STEPS, pad_token_id=tokenizer.pad_token_id)

    losses = StepLosses()
    placement = reference_placement(cfg, reference)
    trainer = build_trainer(cfg.trainer, model=policy, max_steps=STEPS, logger=False,
                            callbacks=[losses, *placement], enable_checkpointing=False,
                            enable_progress_bar=False, limit_val_batches=0, inference_mode=False)
    trainer.fit(module, preference_loader(examples, tokenizer, batch_size, shuffle=False, seed=0))
    sharded = {"policy": is_sharded(module.policy), "reference": is_sharded(module.reference),
               "placement": [type(c).__name__ for c in placement]}
    saved = save_trained(trainer, module.policy, out_dir / "policy")  # collective under FSDP
    return (losses.values, losses.indices), saved, sharded, trainer.world_size


def _worker(rank: int, port: int, out_dir: str) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), WORLD_SIZE=str(WORLD), RANK=str(rank),
                      LOCAL_RANK=str(rank), NODE_RANK="0", WANDB_MODE="disabled", PL_GLOBAL_SEED="0")
    torch.set_num_threads(1)
    (losses, indices), saved, sharded, world = _fit("fsdp_cpu", PER_DEVICE, Path(out_dir))
    torch.save({"losses": losses, "indices": indices, "saved": saved, "sharded": sharded, "world": world},
               Path(out_dir) / f"rank{rank}.pt")


def test_two_process_fsdp_matches_single_process(tmp_path):
    from transformers import AutoModelForCausalLM

    cfg = compose_config(["trainer=fsdp_cpu"], tiny=False)
    assert cfg.trainer.devices == 2 and cfg.trainer.accelerator == "cpu"
    assert cfg.trainer.strategy._target_.endswith("CPUFSDPStrategy") and cfg.train.reference_placement == "auto"

    method = "fork" if "fork" in mp.get_all_start_methods() else "spawn"
    (tmp_path / "fsdp").mkdir()
    mp.start_processes(_worker, args=(_free_port(), str(tmp_path / "fsdp")), nprocs=WORLD, join=True, start_method=method)
    ranks = [torch.load(tmp_path / "fsdp" / f"rank{r}.pt") for r in range(WORLD)]
    assert all(r["world"] == WORLD for r in ranks)
    # the policy and the reference were both sharded (the reference by its own FSDP root)
    assert all(r["sharded"] == {"policy": True, "reference": True, "placement": ["ShardedReference"]} for r in ranks)
    assert [r["saved"] for r in ranks] == [True, False]  # rank 0 writes the gathered weights, rank 1 helps gather

    n = WORLD * PER_DEVICE * STEPS
    (single_losses, single_indices), saved, sharded, world = _fit("cpu", WORLD * PER_DEVICE, tmp_path / "single",
                                                                  order=ddp_order(n))
    assert saved and world == 1 and sharded["placement"] == [] and not sharded["policy"]
    for step in range(STEPS):  # the same pairs in every global step
        assert sorted(ranks[0]["indices"][step] + ranks[1]["indices"][step]) == sorted(single_indices[step])
    fsdp_losses = [sum(r["losses"][i] for r in ranks) / WORLD for i in range(STEPS)]
    assert fsdp_losses == pytest.approx(single_losses, abs=1e-5)

    gathered = AutoModelForCausalLM.from_pretrained(tmp_path / "fsdp" / "policy").state_dict()
    single = AutoModelForCausalLM.from_pretrained(tmp_path / "single" / "policy").state_dict()
    initial = _setup()[2].state_dict()
    assert gathered.keys() == single.keys()
    moved = 0.0
    for key, value in single.items():
        assert torch.allclose(gathered[key], value, atol=1e-5), key
        moved = max(moved, (value - initial[key]).abs().max().item())
    assert moved > 1e-4  # training changed the weights: the comparison is not vacuous


def test_reference_placement_options():
    from tisdpo.runtime.sharded import shards_reference

    policy = _setup()[2]
    assert shards_reference("auto", True) and not shards_reference("auto", False)
    assert not shards_reference("replicate", True)
    with pytest.raises(ValueError, match="needs an FSDP trainer"):
        shards_reference("shard", False)
    with pytest.raises(ValueError, match="reference_placement='everywhere'"):
        shards_reference("everywhere", True)
    fsdp = compose_config(["trainer=fsdp"], tiny=False)
    assert [type(c) for c in reference_placement(fsdp, frozen_copy(policy))] == [ShardedReference]
    assert reference_placement(fsdp, None) == []  # cached log-probs: no reference model to place
    replicate = compose_config(["trainer=fsdp", "train.reference_placement=replicate"], tiny=False)
    assert reference_placement(replicate, frozen_copy(policy)) == []
    assert reference_placement(compose_config(["trainer=ddp"], tiny=False), frozen_copy(policy)) == []


def test_gradient_checkpointing_reaches_every_stage_that_trains():
    """train.gradient_checkpointing applies to whatever fit_stage trains (SFT, pi+/pi-, the policy):
    the model's own checkpointing on one device; under FSDP the strategy's, per wrap unit."""
    from tisdpo.modules.sft import SFTModule
    from tisdpo.runtime.fit import fit_stage
    from tisdpo.stages.loaders import sft_loader, tokenize_sft

    tokenizer, _, model = _setup()
    cfg = compose_config(["trainer=cpu"], tiny=False)
    rows = [{"prompt": "a b", "response": "c d e"}] * 4
    examples = tokenize_sft(rows, tokenizer, cfg.dataset, 16)
    module = SFTModule(model, OmegaConf.create(OPTIM), total_steps=1)
    fit_stage(cfg.trainer, module, sft_loader(examples, tokenizer, 2, shuffle=False, seed=0), max_steps=1,
              model=model, gradient_checkpointing=True, enable_progress_bar=False)
    assert model.is_gradient_checkpointing and model.config.use_cache is False


def test_run_py_under_two_process_fsdp(tmp_path):
    """The whole pipeline sharded over two processes: SFT and pi+/pi- train on both ranks (the cache
    has rank 1 join those builds and wait for rank 0's seal), the reference is sharded, rank 0
    evaluates the policy gathered from both ranks and exports it; activation checkpointing on."""
    from transformers import AutoModelForCausalLM

    run_dir = tmp_path / "run"
    env = {**os.environ, "WANDB_MODE": "disabled", "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    cmd = [sys.executable, str(ROOT / "run.py"), *TINY, "trainer=fsdp_cpu", "method=tisdpo_d", "train.max_steps=4",
           "train.batch_size=4", "estimator.max_steps=4", "eval.every_n_steps=2",
           "train.gradient_checkpointing=true",  # FSDP's activation checkpointing of the decoder layers, every stage f"paths.root_dir={tmp_path}",
           f"cache.dir={tmp_path / 'cache'}", f"hydra.run.dir={run_dir}"]
    done = subprocess.run(cmd, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    output = done.stdout + done.stderr
    results = json.loads((run_dir / "results.json").read_text())
    assert results["train/steps"] == 4 and "eval/true_reward" in results
    # the dense default schedule (issue 22): steps 0, 1, 2, 4, ... then every eval.every_n_steps
    assert [p["step"] for p in results["eval/curve"]] == [0, 1, 2, 4]
    built = {e["stage"]: e for e in results["stages"]}
    assert built["sft"]["reused"] is False and built["estimator"]["reused"] is False
    # rank 1 trained SFT and pi+/pi- with rank 0, then read what rank 0 sealed (the scores it waits
    # for, or finds sealed, depending on timing)
    for stage in ("sft", "estimator"):
        assert f"stage {stage:<10} rank 1: read rank 0's artifact" in output, stage
    assert output.count("reference: sharded over 2 processes") >= 4  # pi+, pi- and the policy, on both ranks
    assert "policy consolidated from 2 FSDP ranks" in output
    exported = AutoModelForCausalLM.from_pretrained(run_dir / "policy")
    [sft_dir] = [p for p in (tmp_path / "cache" / "sft").iterdir() if p.is_dir() and not p.name.startswith(".")]
    sft = AutoModelForCausalLM.from_pretrained(sft_dir)
    changed = [k for k, v in exported.state_dict().items() if not torch.equal(v, sft.state_dict()[k])]
    assert changed  # the export is the trained policy, not the SFT model it started from


def test_fsdp_run_resumes_from_its_sharded_checkpoint(tmp_path):
    """A sharded checkpoint (a directory per step, FSDP's own format) resumes a run that lost its
    last steps: TDPO (its reference sharded too) ends with the same validation loss as the
    uninterrupted run."""
    import shutil

    env = {**os.environ, "WANDB_MODE": "disabled", "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    common = [sys.executable, str(ROOT / "run.py"), *TINY, "trainer=fsdp_cpu", "method=tdpo", "train.max_steps=6",
              "train.batch_size=4", "checkpoint.every_n_steps=2", "train.val_every_n_steps=2", "checkpoint.keep_all=true",
              "eval.enabled=false", f"paths.root_dir={tmp_path}", f"cache.dir={tmp_path / 'cache'}"]
    first = tmp_path / "first"
    done = subprocess.run([*common, f"hydra.run.dir={first}"], cwd=tmp_path, env=env, capture_output=True, text=True,
                          timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    assert (first / "checkpoints" / "epoch=0-step=4.ckpt").is_dir()  # sharded: a directory of shards

    cut = tmp_path / "cut"  # the same run, as if killed after the step-4 checkpoint
    shutil.copytree(first, cut)
    for path in [cut / "results.json", *(cut / "checkpoints").glob("epoch=0-step=6.ckpt*"),
                 *(cut / "checkpoints").glob("last.ckpt*")]:
        shutil.rmtree(path) if path.is_dir() else path.unlink()
    done = subprocess.run([*common, f"resume={cut}", f"hydra.run.dir={tmp_path / 'resumer'}"], cwd=tmp_path, env=env,
                          capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    assert "resuming training from" in done.stdout + done.stderr and "step=4.ckpt" in done.stdout + done.stderr
    resumed, full = (json.loads((d / "results.json").read_text()) for d in (cut, first))
    assert resumed["train/steps"] == full["train/steps"] == 6
    assert resumed["val/loss"] == pytest.approx(full["val/loss"], abs=1e-6)
