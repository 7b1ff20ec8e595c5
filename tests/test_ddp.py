"""Real 2-process DDP on the CPU (gloo), through conf/trainer/ddp_cpu.yaml and the Lightning Trainer:
the per-step loss and the parameters after N steps match a single-process run with the same
global batch (2 ranks x 4 pairs = 1 process x 8 pairs)."""
from __future__ import annotations

import os
import socket
from pathlib import Path

import lightning as L
import pytest
import torch
import torch.multiprocessing as mp
from lightning.pytorch.callbacks import Callback
from omegaconf import OmegaConf

from tests.conftest import compose_config
from tisdpo.models.loading import build_model, frozen_copy
from tisdpo.modules.preference import PreferenceModule
from tisdpo.runtime.fit import build_trainer
from tisdpo.stages.loaders import preference_loader, tokenize_pairs
from tisdpo.losses.registry import bind_loss
from tisdpo.tasks.synthetic import SyntheticTask, SyntheticTaskConfig

STEPS, PER_DEVICE, WORLD = 3, 4, 2
TINY_MODEL = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2,
                  num_key_value_heads=2, max_position_embeddings=64)
OPTIM = {"lr": 1e-3, "warmup_steps": 0, "schedule": "constant",
         "optimizer": {"_target_": "torch.optim.AdamW", "_partial_": True, "lr": 1e-3, "weight_decay": 0.0}}


def _setup():
    task = SyntheticTask(SyntheticTaskConfig(n_sft=16, n_train_pairs=WORLD * PER_DEVICE * STEPS, n_test_pairs=4))
    tokenizer = task.tokenizer()
    cfg = compose_config([], tiny=False)
    examples, _ = tokenize_pairs(task.preference_pairs("train"), tokenizer, cfg.dataset, "train")
    examples = examples[: WORLD * PER_DEVICE * STEPS]
    policy = build_model(config=TINY_MODEL, tokenizer=tokenizer, seed=0)
    return tokenizer, examples, policy


class StepLosses(Callback):
    """Each training step's loss and example indices on this rank."""

    def __init__(self):
        self.values: list[float] = []
        self.indices: list[list[int]] = []

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        self.values.append(float(outputs["loss"]))
        self.indices.append(batch["index"].tolist())


def ddp_order(n: int) -> list[int]:
    """The example order whose consecutive 8-pair batches are DDP's global batches.

    Lightning always shuffles a training loader under DDP, with DistributedSampler(seed=PL_GLOBAL_SEED);
    rank r takes every WORLD-th index of that permutation, PER_DEVICE at a time.
    """
    from torch.utils.data import DistributedSampler

    shards = [list(DistributedSampler(range(n), num_replicas=WORLD, rank=r, shuffle=True, seed=0)) for r in range(WORLD)]
    return [i for k in range(STEPS) for r in range(WORLD) for i in shards[r][k * PER_DEVICE: (k + 1) * PER_DEVICE]]


def _fit(trainer_name: str, batch_size: int, order: list[int] | None = None):
    """Train STEPS steps of DPO; returns (this rank's per-step losses and example indices, final weights, world size)."""
    tokenizer, examples, policy = _setup()
    if order is not None:
        examples = [examples[i] for i in order]
    cfg = compose_config([f"trainer={trainer_name}", "loss=dpo"], tiny=False)
    module = PreferenceModule(policy, frozen_copy(policy), bind_loss(cfg.loss), OmegaConf.create(OPTIM),
                              total_steps=STEPS, pad_token_id=tokenizer.pad_token_id)

    losses = StepLosses()
    trainer = build_trainer(cfg.trainer, max_steps=STEPS, logger=False, callbacks=[losses], enable_checkpointing=False,
                            enable_progress_bar=False, limit_val_batches=0, inference_mode=False)
    trainer.fit(module, preference_loader(examples, tokenizer, batch_size, shuffle=False, seed=0))
    state = {k: v.detach().clone() for k, v in module.policy.state_dict().items()}
    L.seed_everything(0, verbose=False)
    return (losses.values, losses.indices), state, trainer.world_size


def _worker(rank: int, port: int, out_dir: str) -> None:
    # Launched the way torchrun would: Lightning sees LOCAL_RANK and joins instead of spawning.
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), WORLD_SIZE=str(WORLD), RANK=str(rank),
                      LOCAL_RANK=str(rank), NODE_RANK="0", WANDB_MODE="disabled", PL_GLOBAL_SEED="0")
    torch.set_num_threads(1)
    (losses, indices), state, world = _fit("ddp_cpu", PER_DEVICE)
    torch.save({"losses": losses, "indices": indices, "state": state, "world": world}, Path(out_dir) / f"rank{rank}.pt")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.skipif(not torch.distributed.is_available() or not torch.distributed.is_gloo_available(),
                    reason="torch.distributed with gloo is not available")
def test_two_process_ddp_matches_single_process(tmp_path):
    cfg = compose_config(["trainer=ddp_cpu"], tiny=False)
    assert cfg.trainer.strategy == "ddp" and cfg.trainer.devices == 2 and cfg.trainer.accelerator == "cpu"

    # fork where there is one: the workers start with everything imported (spawn re-imports torch,
    # Lightning and transformers in each); one intra-op thread each, so no OpenMP pool crosses the fork
    method = "fork" if "fork" in mp.get_all_start_methods() else "spawn"
    mp.start_processes(_worker, args=(_free_port(), str(tmp_path)), nprocs=WORLD, join=True, start_method=method)
    ranks = [torch.load(tmp_path / f"rank{r}.pt") for r in range(WORLD)]
    assert all(r["world"] == WORLD for r in ranks)
    # DDP all-reduced the gradients: both ranks hold the same weights
    for key, value in ranks[0]["state"].items():
        assert torch.equal(value, ranks[1]["state"][key]), key

    n = WORLD * PER_DEVICE * STEPS
    (single_losses, single_indices), single_state, world = _fit("cpu", WORLD * PER_DEVICE, order=ddp_order(n))
    assert world == 1 and len(single_losses) == STEPS
    for step in range(STEPS):  # the same pairs in every global step
        assert sorted(ranks[0]["indices"][step] + ranks[1]["indices"][step]) == sorted(single_indices[step])
    # equal-size shards: the global-batch loss is the mean of the two ranks' losses
    ddp_losses = [sum(r["losses"][i] for r in ranks) / WORLD for i in range(STEPS)]
    assert ddp_losses == pytest.approx(single_losses, abs=1e-5)
    assert ranks[0]["losses"] != pytest.approx(ranks[1]["losses"], abs=1e-4)  # the ranks saw different pairs
    moved = 0.0
    initial = _setup()[2].state_dict()
    for key, value in single_state.items():
        assert torch.allclose(ranks[0]["state"][key], value, atol=1e-5), key
        moved = max(moved, (value - initial[key]).abs().max().item())
    assert moved > 1e-4  # training changed the weights: the comparison is not vacuous


@pytest.mark.parametrize("launcher, target", [
    ("joblib_local", "hydra_plugins.hydra_joblib_launcher.joblib_launcher.JoblibLauncher"),
    ("slurm", "hydra_plugins.hydra_submitit_launcher.submitit_launcher.SlurmLauncher"),
])
def test_sweep_launcher_configs_compose(launcher, target):
    pytest.importorskip(target.rsplit(".", 2)[0])
    from hydra import compose, initialize_config_dir

    from tests.conftest import CONF

    with initialize_config_dir(config_dir=str(CONF), version_base="1.3"):
        cfg = compose("config", overrides=[f"hydra/launcher={launcher}"], return_hydra_config=True)
    node = cfg.hydra.launcher
    assert node._target_ == target
    if launcher == "slurm":
        assert node.tasks_per_node == node.gpus_per_node == 1 and node.timeout_min == 1440
    else:
        assert int(node.n_jobs) >= 1 and node.backend == "loky"


def test_ranks_share_each_artifact_through_the_cache(tmp_path, monkeypatch):
    """Under DDP/FSDP every stage trains with the run's strategy: a rank other than 0 joins a
    collective build (SFT, pi+/pi-) in rank 0's build dir, writes nothing, and waits for rank 0's
    seal; a non-collective build (scores, pairs) it only waits for. An uncached multi-process
    run is refused (its build paths would differ per rank)."""
    import threading

    from tisdpo.runtime.cache import ArtifactCache, launch_rank, stable_hash

    for env, rank in (({}, 0), ({"RANK": "3"}, 3), ({"LOCAL_RANK": "1"}, 1), ({"LOCAL_RANK": "0", "NODE_RANK": "2"}, 2),
                      ({"SLURM_PROCID": "5", "SLURM_NTASKS": "8"}, 5), ({"SLURM_PROCID": "0", "SLURM_NTASKS": "1"}, 0)):
        for variable in ("RANK", "LOCAL_RANK", "NODE_RANK", "SLURM_PROCID", "SLURM_NTASKS"):
            monkeypatch.delenv(variable, raising=False)
        for variable, value in env.items():
            monkeypatch.setenv(variable, value)
        assert launch_rank() == rank, env
    monkeypatch.delenv("SLURM_PROCID")
    monkeypatch.delenv("SLURM_NTASKS")

    cache, rank0 = ArtifactCache(tmp_path, rank_wait_s=30), ArtifactCache(tmp_path)
    key = {"stage": "sft", "seed": 0}
    joined: list[Path] = []

    def rank1_build(out: Path) -> None:  # a collective build on rank 1: takes part, writes nothing
        joined.append(out)

    def rank0_build(out: Path) -> None:
        (out / "model.bin").write_text("weights")

    monkeypatch.setenv("RANK", "1")
    final = tmp_path / "sft" / stable_hash(key)
    # rank 0 seals half a second later (a thread here: the rank is read once, at the start of get_or_build)
    sealer = threading.Timer(0.5, lambda: _seal_as_rank_zero(rank0, key, rank0_build))
    sealer.start()
    artifact = cache.get_or_build("sft", key, rank1_build, collective=True)
    sealer.join()
    assert joined == [final.parent / f".build-{stable_hash(key)}"]  # rank 0's build dir
    assert artifact.path == final and (final / "model.bin").read_text() == "weights"
    assert cache.events[-1]["rank"] == 1 and cache.events[-1]["reused"] is False

    # non-collective (scores): rank 1 never runs the build, it reads the sealed artifact
    never = lambda out: pytest.fail("rank 1 ran a non-collective build")  # noqa: E731
    assert cache.get_or_build("sft", key, never).path == final
    # rank 0 gone: refused instead of waiting forever
    with pytest.raises(TimeoutError, match="rank 1 waited"):
        ArtifactCache(tmp_path, rank_wait_s=0.5).get_or_build("scores", {"other": 1}, never)
    with pytest.raises(ValueError, match="cache.enabled=false with several processes"):
        ArtifactCache(tmp_path, enabled=False).get_or_build("sft", key, never)


def _seal_as_rank_zero(cache, key, build) -> None:
    """What rank 0 does: build under the lock and seal (RANK is process-wide here, so call the
    rank-0 path directly)."""
    from unittest import mock

    with mock.patch("tisdpo.runtime.cache.launch_rank", return_value=0):
        cache.get_or_build("sft", key, build, collective=True)


def test_fsdp_strategy_wraps_the_models_own_decoder_layers():
    """The wrap unit comes from the model's _no_split_modules (Llama, Mistral, Qwen alike), and
    activation checkpointing (train.gradient_checkpointing) wraps the same layers."""
    from lightning.pytorch.strategies import FSDPStrategy
    from torch.distributed.fsdp.wrap import ModuleWrapPolicy
    from transformers import MistralConfig, MistralForCausalLM
    from transformers.models.llama.modeling_llama import LlamaDecoderLayer
    from transformers.models.mistral.modeling_mistral import MistralDecoderLayer

    from tisdpo.runtime.fit import _strategy

    trainer_cfg = compose_config(["trainer=fsdp"], tiny=False).trainer
    llama = _setup()[2]
    strategy = _strategy(trainer_cfg.strategy, llama, activation_checkpointing=True)
    assert isinstance(strategy, FSDPStrategy)
    wrap = strategy.kwargs["auto_wrap_policy"]
    assert isinstance(wrap, ModuleWrapPolicy) and wrap._module_classes == {LlamaDecoderLayer}
    assert strategy._activation_checkpointing_kwargs  # the same layers are recomputed in backward
    mistral = MistralForCausalLM(MistralConfig(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                                               num_attention_heads=2, num_key_value_heads=2))
    assert _strategy(trainer_cfg.strategy, mistral, False).kwargs["auto_wrap_policy"]._module_classes == {MistralDecoderLayer}


def test_fsdp_clips_gradient_norm_through_the_sharded_root():
    """Lightning's FSDP precision plugin refuses norm clipping; the modules call FSDP's own clip_grad_norm_."""
    from types import SimpleNamespace
    from unittest import mock

    from lightning.pytorch.strategies import FSDPStrategy

    tokenizer, _, policy = _setup()
    cfg = compose_config(["loss=dpo"], tiny=False)
    module = PreferenceModule(policy, frozen_copy(policy), bind_loss(cfg.loss), OmegaConf.create(OPTIM),
                              pad_token_id=tokenizer.pad_token_id)
    root = mock.Mock()
    strategy = mock.Mock(spec=FSDPStrategy)
    type(strategy).__name__ = "FSDPStrategy"
    strategy.model = root
    module._trainer = SimpleNamespace(strategy=strategy)
    module.configure_gradient_clipping(mock.Mock(), 10.0, "norm")
    root.clip_grad_norm_.assert_called_once_with(10.0)


def test_global_batch_is_the_papers_whatever_the_device_count():
    from tisdpo.runtime.fit import accumulation, optimizer_steps, world_size

    cfg = compose_config(["experiment=tisdpo_pku_main", "scale=paper", "trainer=fsdp", "trainer.devices=8"], tiny=False)
    assert cfg.train.global_batch_size == 64 and world_size(cfg.trainer) == 8
    assert accumulation(8, 1, 64, world=8) == 1 and accumulation(8, 1, 64, world=1) == 8
    assert accumulation(4, 3, None, world=2) == 3  # no global batch: grad_accum as given
    with pytest.raises(ValueError, match="not a multiple"):
        accumulation(8, 1, 64, world=3)
    # one epoch of 74k pairs at 64 per step, as the released code trains
    assert optimizer_steps(None, 1, 74_000, 8, 8, 1) == 74_000 // 64
    assert optimizer_steps(None, 1, 74_000, 8, 1, 8) == 74_000 // 64
    assert optimizer_steps(30, 1, 74_000, 8, 1, 8) == 30  # max_steps wins


def test_run_py_under_two_process_ddp_writes_one_results_file(tmp_path):
    """The whole pipeline through `python run.py trainer=ddp_cpu`: Lightning re-launches run.py for
    rank 1 in the same run dir; only rank 0 evaluates and writes results.json."""
    import json
    import subprocess
    import sys

    from tests.conftest import ROOT, TINY

    run_dir = tmp_path / "run"
    env = {**os.environ, "WANDB_MODE": "disabled", "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    cmd = [sys.executable, str(ROOT / "run.py"), *TINY, "trainer=ddp_cpu", "train.max_steps=4",
           "train.batch_size=4", f"paths.root_dir={tmp_path}", f"cache.dir={tmp_path / 'cache'}",
           f"hydra.run.dir={run_dir}"]
    done = subprocess.run(cmd, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    results = json.loads((run_dir / "results.json").read_text())
    assert results["train/steps"] == 4 and results["config"]["trainer"]["strategy"] == "ddp"
    assert "eval/true_reward" in results
    output = done.stdout + done.stderr   # both ranks log to the console
    assert output.count("results.json (") == 1, "only rank 0 writes results.json"   # "wrote <path> (<secs>s)"
    assert "rank 1: training done; evaluation and results.json are rank 0's" in output
