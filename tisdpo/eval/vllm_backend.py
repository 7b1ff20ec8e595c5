"""vLLM as a sampling backend: the same samples' contract as ``sample_responses``, ~10x faster.

At paper scale, sampling with Hugging Face ``generate`` (2,000 prompts x 256 tokens) takes 15-25
minutes per temperature on one GPU; vLLM's paged attention and continuous batching take 1-2.
``eval.generation.backend=vllm`` (evaluation samples and MT-Bench answers) and
``dataset.generation.backend=vllm`` (the RLCD pairs) select it; ``hf`` stays the default.

The contract is :func:`tisdpo.eval.generation.sample_responses`' own, so callers do not change:
prompts are tokenised by *our* tokenizer with ``add_special_tokens=True`` and handed to vLLM as
token ids (``TokensPrompt``), one sample per prompt; the new tokens come back cut at the first EOS
(EOS excluded, the same :func:`~tisdpo.eval.generation.cut_at_eos`), with a ``finished`` flag.
Sampling parameters map one to one: ``temperature`` (<= 0: greedy, vLLM's ``temperature=0.0``),
``top_p``, ``top_k`` (only when set: unset disables it on both sides), ``max_new_tokens`` ->
``max_tokens``, EOS -> ``stop_token_ids`` (the exact set the HF path stops on: the model's
generation config and the tokenizer's EOS), ``skip_special_tokens=True``. vLLM draws its own
random numbers, so its samples are not the HF path's samples, only samples from the same
distribution; they are reproducible from ``seed`` (a seed per prompt, see :func:`prompt_seeds`).

vLLM reads a model *directory* (the exported policy ``<run dir>/policy/``, the SFT artifact, or
the base model) and shares the GPU with this process: ``gpu_memory_utilization`` is the share of
the GPU's memory vLLM takes (weights plus KV cache), so whatever else is on the GPU must fit in
the rest. Move the training copy of the policy (and the reference) off the GPU before the engine
starts (the eval stage does), and close the engine (:meth:`VLLMEngine.close`, or leave the
:func:`open_sampler` block) before loading the judges.

``vllm`` is an optional extra (``pip install -e '.[vllm]'``, CUDA only): it is imported when an
engine starts, never at module import.
"""
from __future__ import annotations

import contextlib
import gc
import hashlib
import logging
from pathlib import Path
from typing import Any, Iterable, Iterator, Sequence

import torch
from transformers import AutoConfig, GenerationConfig

from tisdpo.eval.generation import cut_at_eos, eos_token_ids
from tisdpo.errors import UserError

log = logging.getLogger(__name__)

BACKENDS = ("hf", "vllm")
# The engine options of eval.generation (conf/eval/judges.yaml) and dataset.generation.
ENGINE_DEFAULTS: dict[str, Any] = {"gpu_memory_utilization": 0.5, "tensor_parallel_size": 1, "dtype": "auto"}
INSTALL_HINT = "pip install -e '.[vllm]'"


def import_vllm(option: str = "eval.generation.backend"):
    """The ``vllm`` module, or a one-line :class:`UserError` naming the option and the install command."""
    try:
        import vllm
    except ImportError as error:
        raise UserError(f"{option}=vllm needs the vllm package, which is not installed: {INSTALL_HINT} "
                        f"(CUDA only; {option}=hf samples without it) [{error}]") from None
    return vllm


def model_eos_ids(model_dir: str | Path) -> Any:
    """The ``eos_token_id`` of the model directory's generation config, as ``from_pretrained`` would set
    ``model.generation_config`` (generation_config.json, else the model config); None if neither says."""
    try:
        config = GenerationConfig.from_pretrained(str(model_dir))
    except (OSError, ValueError):
        try:
            config = GenerationConfig.from_model_config(AutoConfig.from_pretrained(str(model_dir)))
        except (OSError, ValueError):
            return None
    return config.eos_token_id


def prompt_seeds(seed: int, n: int) -> list[int]:
    """One 32-bit sampling seed per prompt, derived from ``seed`` and the prompt's position.

    vLLM seeds each request separately; one shared seed would give every prompt the same random
    stream (samples correlated across prompts), so each prompt gets its own, reproducibly."""
    return [int.from_bytes(hashlib.blake2b(f"{int(seed)}:{i}".encode(), digest_size=4).digest(), "little")
            for i in range(n)]


def sampling_params(vllm, *, temperature: float, top_k: int | None, top_p: float | None, max_new_tokens: int,
                    seed: int | None, eos_ids: Iterable[int]):
    """``vllm.SamplingParams`` for one sample of one prompt, matching the HF path's ``generate`` kwargs."""
    greedy = temperature is None or temperature <= 0
    kwargs: dict[str, Any] = dict(
        n=1, max_tokens=int(max_new_tokens), skip_special_tokens=True,
        # Stop exactly where the HF path stops: on our EOS set, and not on an EOS vLLM reads from
        # the model directory by itself (ignore_eos leaves stop_token_ids in force).
        stop_token_ids=sorted(int(i) for i in eos_ids), ignore_eos=True,
    )
    if greedy:
        kwargs["temperature"] = 0.0  # vLLM's greedy decoding; top_p/top_k/seed do not apply
        return vllm.SamplingParams(**kwargs)
    kwargs.update(temperature=float(temperature), seed=seed)
    if top_p is not None:
        kwargs["top_p"] = float(top_p)
    if top_k:  # unset or 0: no top-k filter (vLLM's default disables it in every version)
        kwargs["top_k"] = int(top_k)
    return vllm.SamplingParams(**kwargs)


class VLLMEngine:
    """A vLLM engine on a model directory, started on first use and reused for every call (start-up
    loads the weights and captures CUDA graphs: about a minute), closed by :meth:`close`.

    Pass it to :func:`tisdpo.eval.generation.sample_responses` in place of a model: it samples
    itself (:meth:`sample_responses`). ``eos_token_ids``: the ids to stop on (default: the model
    directory's generation config and the tokenizer's EOS, what the HF path would use).
    ``option``: the config option that chose vLLM, for error messages."""

    def __init__(self, model_dir: str | Path, *, tokenizer_path: str | None = None, dtype: str = "auto",
                 seed: int = 0, gpu_memory_utilization: float = 0.5, tensor_parallel_size: int = 1,
                 eos_token_ids: Iterable[int] | None = None, option: str = "eval.generation.backend"):
        self.model_dir, self.tokenizer_path, self.option = str(model_dir), tokenizer_path, option
        self.engine_kwargs = dict(dtype=str(dtype), seed=int(seed), gpu_memory_utilization=float(gpu_memory_utilization),
                                  tensor_parallel_size=int(tensor_parallel_size))
        self.eos_ids = None if eos_token_ids is None else {int(i) for i in eos_token_ids}
        self._vllm = None
        self._llm = None

    def llm(self):
        """The ``vllm.LLM``, started on first use."""
        if self._llm is None:
            self._vllm = import_vllm(self.option)
            extra = {"tokenizer": self.tokenizer_path} if self.tokenizer_path else {}
            log.info("vLLM: starting an engine on %s (%s)", self.model_dir, self.engine_kwargs)
            self._llm = self._vllm.LLM(model=self.model_dir, **self.engine_kwargs, **extra)
        return self._llm

    def stop_ids(self, tokenizer) -> set[int]:
        if self.eos_ids is None:
            self.eos_ids = eos_token_ids(tokenizer, model_eos_ids(self.model_dir))
        return self.eos_ids

    def sample_responses(self, tokenizer, prompts: Sequence[str], **sampling):
        """:func:`sample_responses_vllm` with this engine."""
        return sample_responses_vllm(self, tokenizer, prompts, **sampling)

    def close(self) -> None:
        """Shut the engine down and give its GPU memory back (the judges load next)."""
        if self._llm is None:
            return
        self._llm = None  # the only reference: the engine goes with it
        _release_gpu(self._vllm)
        log.info("vLLM: engine on %s closed", self.model_dir)


def _release_gpu(vllm) -> None:
    """vLLM keeps its parallel state (and, before v1, its workers) after the LLM object is gone:
    tear those down too, then let torch return the cached blocks."""
    with contextlib.suppress(ImportError, AttributeError, AssertionError, RuntimeError):
        from vllm.distributed import destroy_distributed_environment, destroy_model_parallel

        destroy_model_parallel()
        destroy_distributed_environment()
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


def sample_responses_vllm(engine: VLLMEngine, tokenizer, prompts: Sequence[str], *, temperature: float = 1.0,
                          top_k: int | None = None, top_p: float | None = None, max_new_tokens: int = 32,
                          batch_size: int = 64, seed: int = 0, return_finished: bool = False):
    """:func:`tisdpo.eval.generation.sample_responses` on a vLLM engine: one sample per prompt, the new
    tokens cut at the first EOS (EOS excluded), in prompt order; ``(responses, finished)`` with
    ``return_finished``. ``temperature <= 0`` is greedy. ``batch_size`` is not used: vLLM batches
    continuously, so every prompt is submitted at once."""
    del batch_size
    if not prompts:
        return ([], []) if return_finished else []
    llm = engine.llm()
    vllm = engine._vllm
    eos_ids = engine.stop_ids(tokenizer)
    prompt_ids = tokenizer(list(prompts), add_special_tokens=True)["input_ids"]
    requests = [vllm.TokensPrompt(prompt_token_ids=list(ids)) for ids in prompt_ids]
    params = [sampling_params(vllm, temperature=temperature, top_k=top_k, top_p=top_p, max_new_tokens=max_new_tokens,
                              seed=s, eos_ids=eos_ids) for s in prompt_seeds(seed, len(requests))]
    outputs = llm.generate(requests, params, use_tqdm=False)
    if len(outputs) != len(requests):
        raise RuntimeError(f"vLLM returned {len(outputs)} outputs for {len(requests)} prompts")
    responses: list[list[int]] = []
    finished: list[bool] = []
    for output in outputs:  # LLM.generate returns the outputs in the order of its inputs
        completion = output.outputs[0]
        tokens, done = cut_at_eos(completion.token_ids, eos_ids)
        # a stop token vLLM left out of token_ids still ended the response
        responses.append(tokens)
        finished.append(done or completion.finish_reason == "stop")
    if return_finished:
        return responses, finished
    return responses


@contextlib.contextmanager
def open_sampler(backend: str, model, *, model_dir: str | Path | None, tokenizer, seed: int = 0,
                 option: str = "eval.generation.backend", eos_token_ids: Iterable[int] | None = None,
                 tokenizer_path: str | None = None, **engine_options) -> Iterator[Any]:
    """What :func:`~tisdpo.eval.generation.sample_responses` samples with, as its ``model`` argument:
    ``model`` itself (backend ``hf``), or a :class:`VLLMEngine` on ``model_dir`` (``vllm``), closed
    on leaving the block so the GPU is free for what comes next. ``engine_options``: those of
    :data:`ENGINE_DEFAULTS` (None: the default)."""
    if backend == "hf":
        yield model
        return
    if backend != "vllm":
        raise UserError(f"{option}={backend!r} is not one of {', '.join(BACKENDS)}")
    local = model_dir is not None and str(model_dir).startswith((".", "/", "~"))  # else a hub id
    if model_dir is None or (local and not Path(str(model_dir)).expanduser().is_dir()):
        raise UserError(f"{option}=vllm reads a model directory, and there is none ({model_dir})")
    options = {k: (v if v is not None else ENGINE_DEFAULTS[k]) for k, v in {**ENGINE_DEFAULTS, **engine_options}.items()}
    unknown = sorted(set(options) - set(ENGINE_DEFAULTS))
    if unknown:
        raise UserError(f"{option}=vllm: unknown engine option(s) {unknown}; valid: {sorted(ENGINE_DEFAULTS)}")
    engine = VLLMEngine(model_dir, tokenizer_path=tokenizer_path, seed=seed, eos_token_ids=eos_token_ids,
                        option=option, **options)
    try:
        yield engine
    finally:
        engine.close()


__all__ = ["BACKENDS", "ENGINE_DEFAULTS", "VLLMEngine", "import_vllm", "open_sampler", "prompt_seeds",
           "sample_responses_vllm", "sampling_params"]
