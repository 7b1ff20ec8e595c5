"""Exact resume: which checkpoint, which run dir, and the state a checkpoint needs beyond the weights.

A Lightning checkpoint holds the weights, the optimiser, the LR schedule and the loop counters.
For a resumed run to end with the same parameters as an uninterrupted one it also needs:

* the position in the data: :class:`ResumableDataLoader` saves (through Lightning's stateful
  dataloader protocol) the shuffling generator's state at the start of the current epoch and the
  number of batches already consumed; on resume it restores the generator, so the epoch's
  permutation is the same, and skips the consumed batches (indices only: nothing is collated);
* the global RNG streams (python, numpy, torch, CUDA): :class:`RNGStateCallback` saves them with
  the checkpoint and restores them when training restarts; validation runs on a forked stream, so
  where validation falls does not change training randomness (TI-DPO samples during validation).

Run dirs (see README "Resume"): ``resume=true`` continues the checkpoint of the current run dir
(Hydra makes a new dir per run, so pair it with ``hydra.run.dir=<previous run dir>`` or re-run the
same sweep dir); ``resume=<run dir>`` continues that run in place: outputs and new checkpoints go
to that dir. Either way the composed config must match the one the run started with
(``run_config.json``), apart from keys that cannot change the trained weights.

Pipeline stages (SFT, estimator models) checkpoint into their artifact's stable build dir
(``cache.py``): a killed build resumes there on the next request.
"""
from __future__ import annotations

import json
import logging
import os
import random
import zipfile
from pathlib import Path
from typing import Any, Iterator

import torch
from lightning.pytorch.callbacks import Callback, ModelCheckpoint
from torch.utils.data import DataLoader

log = logging.getLogger(__name__)

RUN_CONFIG = "run_config.json"
CHECKPOINT_DIR = "checkpoints"
LAST = "last.ckpt"
# Config keys that may differ between a run and its resumption: they cannot change the weights.
RESUME_IGNORED = ("resume", "paths", "hydra", "logger", "eval", "cache", "label", "project",
                  "trainer.enable_progress_bar", "trainer.log_every_n_steps", "checkpoint", "train.num_workers")


# ---------------------------------------------------------------------------------------
# data order
# ---------------------------------------------------------------------------------------
class _SkipFirst:
    """An index sampler whose first iteration that is actually advanced skips ``skip`` batches.

    Lazy on purpose: a multi-worker DataLoader iterator calls ``iter()`` twice before it reads one
    index; the skip (and the shuffling draw behind it) belongs to the iteration that is used.
    Persistent-worker iterators re-iterate this object every epoch: later iterations are whole."""

    def __init__(self, base, skip: int):
        self.base, self.skip = base, skip

    def __iter__(self) -> Iterator:
        iterator = iter(self.base)
        if self.skip:
            skip, self.skip = self.skip, 0
            for _ in range(skip):
                if next(iterator, _END) is _END:
                    return
        yield from iterator

    def __len__(self) -> int:
        return len(self.base)


_END = object()


class _Counting:
    def __init__(self, iterator, owner: "ResumableDataLoader"):
        self._iterator, self._owner = iterator, owner

    def __iter__(self):
        return self

    def __next__(self):
        batch = next(self._iterator)
        self._owner._consumed += 1
        return batch

    def __len__(self) -> int:
        return len(self._iterator)


class ResumableDataLoader(DataLoader):
    """A DataLoader whose position inside an epoch survives a restart.

    Lightning saves ``state_dict()`` in every checkpoint of a fit and calls ``load_state_dict`` before
    it iterates the loader on resume (``FitLoop._load_combined_loader_states``). Sized loaders are
    not prefetched by Lightning, so the batches this loader has handed out are exactly the batches
    trained on. Works with the default shuffling (``generator``) and with any sampler that is
    deterministic given ``set_epoch`` (e.g. ``LengthGroupedSampler``).
    """

    _consumed = 0  # batches handed out in the current epoch
    _skip = 0  # batches to skip on the next iteration (set by load_state_dict)
    _pending_skip = 0  # the skip, while the iterator is being created
    _epoch_start_state: torch.Tensor | None = None  # the shuffling generator's state when the epoch began

    def __init__(self, dataset, *args: Any, shuffle: bool | None = None, sampler=None, generator=None, **kwargs: Any):
        if shuffle and sampler is None and not args:
            # The permutation draws from its own generator: DataLoader also draws a worker base seed
            # from `generator` each time it creates an iterator, and how often it does so differs
            # between a resumed and an uninterrupted run (persistent workers).
            own = torch.Generator()
            own.set_state(generator.get_state() if generator is not None else torch.Generator().manual_seed(0).get_state())
            sampler, shuffle = torch.utils.data.RandomSampler(dataset, generator=own), None
        super().__init__(dataset, *args, shuffle=shuffle, sampler=sampler, generator=generator, **kwargs)

    @property
    def _shuffle_generator(self) -> torch.Generator | None:
        return getattr(self.sampler, "generator", None)

    @property
    def _index_sampler(self):
        base = super()._index_sampler
        return _SkipFirst(base, self._pending_skip) if self._pending_skip else base

    def __iter__(self):
        generator = self._shuffle_generator
        self._epoch_start_state = generator.get_state() if generator is not None else None
        self._consumed, self._pending_skip, self._skip = self._skip, self._skip, 0
        try:
            return _Counting(super().__iter__(), self)
        finally:
            self._pending_skip = 0

    def state_dict(self) -> dict[str, Any]:
        length = len(self)
        if self._consumed >= length:  # the epoch is over: the next one starts from the current state
            generator = self._shuffle_generator
            return {"generator_state": generator.get_state() if generator is not None else None, "consumed": 0,
                    "length": length}
        return {"generator_state": self._epoch_start_state, "consumed": self._consumed, "length": length}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if state.get("length") != len(self):
            log.warning("resume: the training data has %s batches per epoch, the checkpoint %s; restarting the "
                        "epoch from its first batch (data order not exact)", len(self), state.get("length"))
            return
        if state.get("generator_state") is not None and self._shuffle_generator is not None:
            self._shuffle_generator.set_state(state["generator_state"])
        self._skip = int(state.get("consumed", 0))
        if self._skip:
            log.info("resume: skipping the %d batches of this epoch already trained on", self._skip)


# ---------------------------------------------------------------------------------------
# RNG streams
# ---------------------------------------------------------------------------------------
def rng_states() -> dict[str, Any]:
    import numpy as np

    # Plain python values and tensors only: Lightning loads checkpoints with weights_only=True.
    kind, keys, pos, has_gauss, gauss = np.random.get_state()
    states = {"python": random.getstate(), "numpy": (kind, torch.from_numpy(keys.astype("int64")), int(pos), int(has_gauss),
                                                     float(gauss)), "torch": torch.get_rng_state()}
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        states["cuda"] = torch.cuda.get_rng_state_all()
    return states


def set_rng_states(states: dict[str, Any]) -> None:
    import numpy as np

    random.setstate(states["python"])
    kind, keys, pos, has_gauss, gauss = states["numpy"]
    np.random.set_state((kind, keys.numpy().astype("uint32"), pos, has_gauss, gauss))
    torch.set_rng_state(states["torch"])
    if "cuda" in states and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(states["cuda"])


class RNGStateCallback(Callback):
    """Global RNG states in the checkpoint, restored at the start of resumed training; validation
    runs on a forked stream so that it never shifts the training stream."""

    def __init__(self):
        self._pending: dict[str, Any] | None = None
        self._outside_validation: dict[str, Any] | None = None

    @property
    def state_key(self) -> str:
        return "RNGStateCallback"

    def state_dict(self) -> dict[str, Any]:
        # Saved mid-validation (a checkpoint callback on validation end) the stream to resume is
        # the one validation forked from.
        return {"rng": self._outside_validation or rng_states()}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self._pending = state_dict.get("rng")

    def on_train_start(self, trainer, pl_module) -> None:
        if self._pending is not None:
            set_rng_states(self._pending)
            self._pending = None

    def on_validation_start(self, trainer, pl_module) -> None:
        self._outside_validation = rng_states()

    def on_validation_end(self, trainer, pl_module) -> None:
        if self._outside_validation is not None:
            set_rng_states(self._outside_validation)
            self._outside_validation = None


# ---------------------------------------------------------------------------------------
# checkpoints
# ---------------------------------------------------------------------------------------
def readable_checkpoint(path: Path) -> bool:
    """A complete torch.save file (a zip archive with its central directory): a truncated or
    half-written file fails this without loading the tensors."""
    try:
        if path.stat().st_size == 0:
            return False
        with zipfile.ZipFile(path) as archive:
            return bool(archive.namelist())
    except (OSError, zipfile.BadZipFile):
        return False


def _step_of(path: Path) -> int:
    for part in path.stem.split("-"):
        if part.startswith("step="):
            try:
                return int(part.split("=", 1)[1].split("_")[0])
            except ValueError:
                return -1
    return -1


def find_checkpoint(directory: Path) -> Path | None:
    """The checkpoint to resume from in ``directory``: ``last.ckpt``, or else the newest readable
    ``...step=N.ckpt``; an unreadable file is skipped with a warning."""
    directory = Path(directory)
    if not directory.is_dir():
        return None
    candidates = [directory / LAST] if (directory / LAST).is_file() else []
    candidates += sorted((p for p in directory.glob("*.ckpt") if p.name != LAST), key=_step_of, reverse=True)
    for candidate in candidates:
        if readable_checkpoint(candidate):
            return candidate
        log.warning("resume: checkpoint %s is unreadable (partial or corrupt); trying an older one", candidate)
    return None


# ---------------------------------------------------------------------------------------
# run dirs and configs
# ---------------------------------------------------------------------------------------
def resume_target(cfg) -> Path | None:
    """The run dir ``resume`` points at, or None for resume=false/true."""
    resume = cfg.get("resume")
    if resume in (None, False, True) or str(resume).lower() in ("false", "true", "none", "null", ""):
        return None
    path = Path(str(resume)).expanduser()
    return path.parent.parent if path.suffix == ".ckpt" else path


def resume_requested(cfg) -> bool:
    resume = cfg.get("resume")
    return bool(resume) and str(resume).lower() not in ("false", "none", "null", "")


def prepare_run_dir(cfg) -> Path:
    """The run dir this job writes to: ``paths.output_dir``, or the run ``resume=<dir>`` continues
    (``cfg.paths.output_dir`` is repointed there, so loggers follow)."""
    target = resume_target(cfg)
    if target is not None:
        current = Path(str(cfg.paths.output_dir))
        if current.resolve() != target.resolve():
            log.info("resume=%s: continuing that run in place (this process's own dir %s keeps only its log)",
                     target, current)
        cfg.paths.output_dir = str(target)
    output_dir = Path(str(cfg.paths.output_dir))
    output_dir.mkdir(parents=True, exist_ok=True)
    return output_dir


def _flatten(tree: Any, prefix: str = "") -> dict[str, Any]:
    if isinstance(tree, dict):
        out: dict[str, Any] = {}
        for key, value in tree.items():
            out.update(_flatten(value, f"{prefix}{key}."))
        return out or {prefix.rstrip("."): {}}
    return {prefix.rstrip("."): tree}


def _ignored(key: str) -> bool:
    return any(key == k or key.startswith(k + ".") for k in RESUME_IGNORED)


def config_differences(before: dict, now: dict) -> list[str]:
    a, b = _flatten(before), _flatten(now)
    keys = sorted(k for k in set(a) | set(b) if not _ignored(k) and a.get(k, "<absent>") != b.get(k, "<absent>"))
    return [f"{k}: {a.get(k, '<absent>')!r} -> {b.get(k, '<absent>')!r}" for k in keys]


def check_run_config(output_dir: Path, config_dict: dict, resuming: bool) -> None:
    """Record the run's config (first start), or check a resumption against it."""
    from tisdpo.pipeline.validate import ConfigError

    path = output_dir / RUN_CONFIG
    if path.is_file() and resuming:
        differences = config_differences(json.loads(path.read_text()), json.loads(json.dumps(config_dict, default=str)))
        if differences:
            shown = "; ".join(differences[:8]) + (f"; ... ({len(differences)} in all)" if len(differences) > 8 else "")
            raise ConfigError(
                f"resume: the config differs from the one {output_dir} started with ({shown}); pass the same overrides "
                f"(see {output_dir / '.hydra' / 'overrides.yaml'}) or start a new run"
            )
        return
    tmp = path.with_suffix(".json.tmp")
    tmp.write_text(json.dumps(config_dict, indent=2, default=str))
    os.replace(tmp, path)


def archive_previous_failure(output_dir: Path) -> None:
    """A resumed run moves the failure marker of the attempt it continues aside (kept for the record):
    a marker left in place would make reports count the finished run as failed."""
    marker = output_dir / "failed.json"
    if marker.is_file():
        n = 1
        while (output_dir / f"failed.previous-{n}.json").exists():
            n += 1
        marker.rename(output_dir / f"failed.previous-{n}.json")
        log.info("resume: the previous attempt's failure is kept as %s", f"failed.previous-{n}.json")


def train_checkpoint(cfg, output_dir: Path) -> str | None:
    """The checkpoint the preference training stage resumes from, if any."""
    if not resume_requested(cfg):
        return None
    given = Path(str(cfg.get("resume"))).expanduser()
    if given.suffix == ".ckpt" and given.is_file():  # resume=<a checkpoint file>: exactly that one
        log.info("resuming training from %s", given)
        return str(given)
    found = find_checkpoint(output_dir / CHECKPOINT_DIR)
    if found is None:
        if resume_target(cfg) is None:
            log.warning("resume=true, but %s holds no checkpoint: starting from scratch (Hydra makes a new dir per "
                        "run: pass hydra.run.dir=<the previous run dir>, or resume=<the previous run dir>)",
                        output_dir / CHECKPOINT_DIR)
        else:
            log.warning("resume=%s: the run has no readable checkpoint yet: training starts from scratch", output_dir)
        return None
    log.info("resuming training from %s", found)
    return str(found)


# ---------------------------------------------------------------------------------------
# pipeline stages (inside an artifact's build dir)
# ---------------------------------------------------------------------------------------
def stage_every_n_steps(cfg) -> int:
    """How often a pipeline stage (SFT, estimator models) checkpoints: ``checkpoint.stage_every_n_steps``
    (default: ``checkpoint.every_n_steps``); 0 turns stage checkpoints off."""
    node = cfg.get("checkpoint") or {}
    value = node.get("stage_every_n_steps")
    return int(value if value is not None else node.get("every_n_steps") or 0)


def stage_checkpointing(work_dir: Path | None, every_n_steps: int) -> tuple[list[Callback], str | None]:
    """Callbacks that checkpoint a stage's training into ``work_dir`` every N steps, and the
    checkpoint to resume from (None: start). ``work_dir=None`` or N <= 0: no checkpoints."""
    if work_dir is None or every_n_steps <= 0:
        return [], None
    work_dir = Path(work_dir)
    resume_from = find_checkpoint(work_dir)
    if resume_from is not None:
        log.info("stage: resuming an interrupted training from %s", resume_from)
    checkpoint = ModelCheckpoint(dirpath=work_dir, every_n_train_steps=every_n_steps, save_last=True, save_top_k=1,
                                 enable_version_counter=False)
    return [checkpoint, RNGStateCallback()], str(resume_from) if resume_from else None


def begin_run(cfg, output_dir: Path, config_dict: dict) -> dict | None:
    """Record (or, when resuming, check) the run's config; the stored results when a resumed run
    had already finished (a re-launched sweep skips its finished jobs), else None."""
    resuming = resume_requested(cfg)
    check_run_config(output_dir, config_dict, resuming)
    if not resuming:
        return None
    archive_previous_failure(output_dir)
    results_file = output_dir / "results.json"
    if results_file.is_file():
        try:
            results = json.loads(results_file.read_text())
        except ValueError:
            log.warning("resume: %s is unreadable; running the job again", results_file)
            return None
        log.info("resume: %s already finished (%s); nothing to do", output_dir, results_file)
        return results
    return None
