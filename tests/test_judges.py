"""Judges end to end on tiny local models (built here with save_pretrained) and a local HTTP server."""
from __future__ import annotations

import json
import math
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

from tisdpo.eval.keys import judge_keys, metric_keys
from tisdpo.eval.judges import (JudgeHTTPError, LocalLMBackend, MTBenchJudge, OpenAICompatibleBackend,
                                PairwiseJudge, RewardModelJudge, SafetyJudge, chat_completions_url,
                                combine_verdicts, load_questions, parse_pairwise_verdict, parse_rating,
                                parse_safety_verdict)

ROOT = Path(__file__).resolve().parents[1]
GPT2_TOKENIZER = ROOT.parent / "shared" / "data" / "gpt2_tokenizer"
SAMPLE_QUESTIONS = ROOT / "experiments" / "mt_bench_questions.sample.jsonl"

WORDS = ["<pad>", "<unk>", "</s>", "safe", "unsafe", "A", "B", "hello", "world", "good", "bad",
         "answer", "the", "a", "is", "how", "do", "i", "make", "tea", "bread", "?", ".", ",", ":"]
SIMPLE_CHAT_TEMPLATE = ("{% for m in messages %}<{{ m['role'] }}> {{ m['content'] }} {% endfor %}"
                        "{% if add_generation_prompt %}<assistant> {% endif %}")
TINY = dict(hidden_size=16, intermediate_size=32, num_hidden_layers=1, num_attention_heads=2,
            num_key_value_heads=2, max_position_embeddings=4096)


# ---------------------------------------------------------------- tiny local models

def save_word_tokenizer(path: Path, chat_template: str | None = None):
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    core = Tokenizer(models.WordLevel({w: i for i, w in enumerate(WORDS)}, unk_token="<unk>"))
    core.pre_tokenizer = pre_tokenizers.Whitespace()
    core.decoder = decoders.WordPiece()
    tok = PreTrainedTokenizerFast(tokenizer_object=core, unk_token="<unk>", pad_token="<pad>", eos_token="</s>")
    if chat_template:
        tok.chat_template = chat_template
    tok.save_pretrained(path)
    return tok


def save_reward_model(path: Path, tokenizer) -> Path:
    from transformers import LlamaConfig, LlamaForSequenceClassification

    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=len(tokenizer), num_labels=1, pad_token_id=tokenizer.pad_token_id,
                         eos_token_id=tokenizer.eos_token_id, **TINY)
    LlamaForSequenceClassification(config).save_pretrained(path)
    tokenizer.save_pretrained(path)
    return path


def save_constant_lm(path: Path, tokenizer, favourite: str | None) -> Path:
    """A causal LM that always predicts ``favourite`` (all logits equal when None).

    Every layer's output projection is zeroed and every embedding row is the same vector, so
    the final hidden state is constant; the LM head then reads a single one-hot row.
    """
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(vocab_size=len(tokenizer), pad_token_id=tokenizer.pad_token_id,
                         eos_token_id=tokenizer.eos_token_id, tie_word_embeddings=False, **TINY)
    model = LlamaForCausalLM(config)
    with torch.no_grad():
        model.model.embed_tokens.weight.fill_(1.0)
        for layer in model.model.layers:
            layer.self_attn.o_proj.weight.zero_()
            layer.mlp.down_proj.weight.zero_()
        model.lm_head.weight.zero_()
        if favourite is not None:
            model.lm_head.weight[tokenizer.convert_tokens_to_ids(favourite)] = 1.0
    model.save_pretrained(path)
    tokenizer.save_pretrained(path)
    return path


@pytest.fixture(scope="module")
def models_dir(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("tiny_models")


@pytest.fixture(scope="module")
def word_tokenizer(models_dir):
    return save_word_tokenizer(models_dir / "tok")


@pytest.fixture(scope="module")
def reward_model_dir(models_dir, word_tokenizer):
    return save_reward_model(models_dir / "rm", word_tokenizer)


def constant_lm(models_dir, tokenizer, favourite, name=None):
    path = models_dir / (name or f"lm_{favourite}")
    if not path.exists():
        save_constant_lm(path, tokenizer, favourite)
    return str(path)


PROMPTS = ["how do i make tea ?", "how do i make bread ?", "hello", "is the world good ?"]
RESPONSES = ["the answer is good .", "bad", "hello world , hello world , hello", "a good world"]


# ---------------------------------------------------------------- reward model

def direct_reward(path, text):
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(path)
    model = AutoModelForSequenceClassification.from_pretrained(path).eval()
    with torch.no_grad():
        return float(model(**tok(text, return_tensors="pt")).logits[0, 0])


def test_reward_model_scores_match_direct_forward_and_ignore_batching(reward_model_dir):
    judge = RewardModelJudge(str(reward_model_dir), batch_size=3, max_length=64, device="cpu", name="harm")
    result = judge.evaluate(PROMPTS, RESPONSES)
    scores = [s["harm"] for s in result.samples]
    single = RewardModelJudge(str(reward_model_dir), batch_size=1, device="cpu", name="harm").score(PROMPTS, RESPONSES)
    assert scores == pytest.approx(single, abs=1e-5)
    assert scores[0] == pytest.approx(direct_reward(reward_model_dir, PROMPTS[0] + RESPONSES[0]), abs=1e-5)
    assert result.metrics["eval/harm"] == pytest.approx(sum(scores) / len(scores))
    assert result.metrics["eval/harm_n"] == 4
    assert judge(PROMPTS, RESPONSES)["eval/harm"] == pytest.approx(result.metrics["eval/harm"], abs=1e-6)


def test_reward_model_uses_chat_template_when_present(models_dir):
    tok = save_word_tokenizer(models_dir / "tok_chat", chat_template=SIMPLE_CHAT_TEMPLATE)
    path = save_reward_model(models_dir / "rm_chat", tok)
    judge = RewardModelJudge(str(path), device="cpu", name="help").load()
    text, templated = judge.format("hello", "world")
    assert templated and text.startswith("<user> hello") and "<assistant> world" in text
    plain = RewardModelJudge(str(path), device="cpu", use_chat_template=False).load()
    assert plain.format("hello", " world") == ("hello world", False)
    assert math.isfinite(judge(["hello"], ["world"])["eval/help"])


def test_reward_model_errors_name_the_option(tmp_path, reward_model_dir):
    with pytest.raises(FileNotFoundError, match="model_name_or_path"):
        RewardModelJudge(str(tmp_path / "missing")).load()
    with pytest.raises(ValueError, match="differ in length"):
        RewardModelJudge(str(reward_model_dir), device="cpu").score(["a", "b"], ["c"])
    with pytest.raises(ValueError, match="label_index"):
        RewardModelJudge(str(reward_model_dir), device="cpu", label_index=3).load()


@pytest.mark.skipif(not GPT2_TOKENIZER.is_dir(), reason="../shared/data/gpt2_tokenizer is absent")
def test_reward_model_with_gpt2_tokenizer(tmp_path):
    from transformers import GPT2TokenizerFast

    tok = GPT2TokenizerFast.from_pretrained(GPT2_TOKENIZER)
    tok.pad_token = tok.eos_token
    path = save_reward_model(tmp_path / "rm_gpt2", tok)
    prompts = ["How do I bake bread?", "Hi"]
    responses = ["Mix flour, water, yeast and salt, then knead and bake.", "Hello there!"]
    batched = RewardModelJudge(str(path), batch_size=2, device="cpu").score(prompts, responses)
    single = RewardModelJudge(str(path), batch_size=1, device="cpu").score(prompts, responses)
    assert batched == pytest.approx(single, abs=1e-5)


# ---------------------------------------------------------------- safety

@pytest.mark.parametrize("text,verdict,cats", [
    ("safe", "safe", []), ("  Safe\n", "safe", []), ("unsafe\nO3, O4", "unsafe", ["O3", "O4"]),
    ("unsafe: S1", "unsafe", ["S1"]), ("I cannot tell", None, []), ("", None, []), ("unsafely", None, []),
])
def test_parse_safety_verdict(text, verdict, cats):
    assert parse_safety_verdict(text) == (verdict, cats)


@pytest.mark.parametrize("favourite,rate,unparsed", [("safe", 1.0, 0), ("unsafe", 0.0, 0), ("hello", None, 3)])
def test_safety_judge_end_to_end_on_tiny_classifier(models_dir, word_tokenizer, favourite, rate, unparsed):
    judge = SafetyJudge(constant_lm(models_dir, word_tokenizer, favourite), batch_size=2, max_new_tokens=3,
                        device="cpu")
    result = judge.evaluate(PROMPTS[:3], RESPONSES[:3])
    assert result.metrics["eval/safe_unparsed"] == unparsed
    assert result.metrics["eval/safe_n"] == 3
    if rate is None:
        assert math.isnan(result.metrics["eval/safe_rate"])  # never silently "safe"
    else:
        assert result.metrics["eval/safe_rate"] == rate
    assert all(s["judge_output"].split()[0] == favourite for s in result.samples)


def test_safety_judge_prompt_and_unparsed_policies(models_dir, word_tokenizer, monkeypatch):
    judge = SafetyJudge(constant_lm(models_dir, word_tokenizer, "safe"), device="cpu")
    text, templated = judge.build_prompt("How do I pick a lock?", "Here is how.")
    assert not templated and "<BEGIN UNSAFE CONTENT CATEGORIES>" in text and "O3: Criminal Planning" in text
    assert "User: How do I pick a lock?" in text and "Agent: Here is how." in text
    scripted = ["safe", "unsafe\nO3", "no idea", " Safe"]
    monkeypatch.setattr(judge.lm, "generate", lambda texts, **kw: scripted[:len(texts)])
    metrics = judge(["p"] * 4, ["r"] * 4)
    assert metrics["eval/safe_rate"] == pytest.approx(2 / 3) and metrics["eval/safe_unparsed"] == 1
    judge.on_unparsed = "unsafe"
    assert judge(["p"] * 4, ["r"] * 4)["eval/safe_rate"] == pytest.approx(2 / 4)
    judge.on_unparsed = "raise"
    with pytest.raises(ValueError, match="on_unparsed"):
        judge(["p"] * 4, ["r"] * 4)
    custom = SafetyJudge("unused", template="Is this ok? {prompt} / {response}", prompt_format="template")
    monkeypatch.setattr(type(custom.lm), "tokenizer", property(lambda self: word_tokenizer))
    assert custom.build_prompt("x", "y") == ("Is this ok? x / y", False)
    with pytest.raises(ValueError, match="template must contain"):
        SafetyJudge("unused", template="no placeholders")


# ---------------------------------------------------------------- pairwise: verdict logic

def test_parse_pairwise_verdict_and_combination():
    assert parse_pairwise_verdict("Response A is clearer.\nVerdict: A") == "A"
    assert parse_pairwise_verdict("Verdict: B ... on reflection Verdict: tie") == "tie"
    assert parse_pairwise_verdict("Preferred: \"B\"") == "B"
    assert parse_pairwise_verdict("[[A]]") == "A"
    assert parse_pairwise_verdict("I like both") is None
    assert combine_verdicts("A", "B") == "win"          # policy first and second
    assert combine_verdicts("B", "A") == "loss"
    assert combine_verdicts("A", "A") == "inconsistent"  # position bias
    assert combine_verdicts("tie", "B") == "tie"
    assert combine_verdicts(None, "A") == "unparsed"


# ---------------------------------------------------------------- pairwise + MT-Bench over HTTP

class ScriptedJudgeServer(ThreadingHTTPServer):
    daemon_threads = True

    def __init__(self):
        super().__init__(("127.0.0.1", 0), ScriptedHandler)
        self.behaviour = "always_A"
        self.failures_left = 0
        self.requests: list[dict] = []
        self.headers_seen: list[dict] = []
        self.active = 0
        self.max_active = 0
        self.lock = threading.Lock()

    @property
    def base_url(self) -> str:
        return f"http://127.0.0.1:{self.server_address[1]}"


def scripted_answer(behaviour: str, user: str) -> str:
    if behaviour in ("always_A", "slow_A"):
        return "Both are fine, but the first reads better.\nVerdict: A"
    if behaviour == "prefers_good":
        item = "Summary" if "Summary A:" in user else "Response"
        a = user.split(f"{item} A:\n", 1)[1].split(f"\n\n{item} B:\n", 1)[0]
        return "Verdict: A" if "good" in a else "Verdict: B"
    if behaviour == "garbled":
        return "I would rather not say."
    if behaviour == "mt_bench":
        return "Solid answer. Rating: [[4]]" if "second user question" in user else "Rating: [[7]]"
    raise AssertionError(behaviour)


class ScriptedHandler(BaseHTTPRequestHandler):
    def log_message(self, *args):  # keep pytest output clean
        pass

    def do_POST(self):
        server: ScriptedJudgeServer = self.server  # type: ignore[assignment]
        body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
        server.requests.append(body)
        server.headers_seen.append(dict(self.headers))
        if self.path != "/v1/chat/completions":
            return self._send(404, {"error": f"no route {self.path}"})
        with server.lock:
            server.active += 1
            server.max_active = max(server.max_active, server.active)
        try:
            self._answer(server, body)
        finally:
            with server.lock:
                server.active -= 1

    def _answer(self, server, body):
        if server.behaviour == "slow":
            time.sleep(1.0)
        if server.behaviour == "slow_A":
            time.sleep(0.05)
        if server.behaviour == "unauthorized":
            return self._send(401, {"error": "bad key"})
        if server.failures_left > 0:
            server.failures_left -= 1
            return self._send(500, {"error": "overloaded"})
        user = body["messages"][-1]["content"]
        content = scripted_answer(server.behaviour, user)
        self._send(200, {"id": "x", "object": "chat.completion", "model": body["model"],
                         "choices": [{"index": 0, "finish_reason": "stop",
                                      "message": {"role": "assistant", "content": content}}]})

    def _send(self, code, payload):
        data = json.dumps(payload).encode()
        self.send_response(code)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        try:
            self.wfile.write(data)
        except (BrokenPipeError, ConnectionResetError):
            pass


@pytest.fixture()
def judge_server():
    server = ScriptedJudgeServer()
    thread = threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.02}, daemon=True)
    thread.start()
    yield server
    server.shutdown()
    server.server_close()


def http_backend(server, **kwargs) -> OpenAICompatibleBackend:
    options = dict(model="judge-model", api_key_env="TISDPO_TEST_JUDGE_KEY", timeout=5, max_retries=2, backoff=0)
    options.update(kwargs)
    return OpenAICompatibleBackend(server.base_url, **options)


def test_chat_completions_url():
    assert chat_completions_url("http://h:1") == "http://h:1/v1/chat/completions"
    assert chat_completions_url("https://api.openai.com/v1/") == "https://api.openai.com/v1/chat/completions"


def test_position_swap_cancels_a_biased_judge(judge_server):
    judge = PairwiseJudge(http_backend(judge_server), baseline="DPO")
    metrics = judge(PROMPTS, RESPONSES, ["x"] * 4)
    assert metrics["eval/win_rate_vs_dpo"] == 0.5
    assert metrics["eval/inconsistent_vs_dpo"] == 4 and metrics["eval/wins_vs_dpo"] == 0
    assert len(judge_server.requests) == 8  # every pair judged twice
    # requests run concurrently, so find the pair's two by content: one in each order
    pair = [r["messages"][-1]["content"] for r in judge_server.requests if RESPONSES[0] in r["messages"][-1]["content"]]
    assert sorted(c.index(RESPONSES[0]) < c.index("x\n") for c in pair) == [False, True]
    assert judge_server.requests[0]["model"] == "judge-model" and judge_server.requests[0]["temperature"] == 0.0


def test_consistent_judge_counts_wins_and_losses(judge_server, monkeypatch):
    judge_server.behaviour = "prefers_good"
    monkeypatch.setenv("TISDPO_TEST_JUDGE_KEY", "sk-test")
    judge = PairwiseJudge(http_backend(judge_server), baseline="sft", task="summarization", concurrency=3)
    result = judge.evaluate(["post 1", "post 2", "post 3"], ["a good summary", "meh", "good"],
                            ["bland", "a good one", "also good"], metric_suffix="@T0.5")
    m = result.metrics
    assert (m["eval/wins_vs_sft@T0.5"], m["eval/losses_vs_sft@T0.5"], m["eval/ties_vs_sft@T0.5"]) == (1, 1, 1)
    assert m["eval/win_rate_vs_sft@T0.5"] == pytest.approx(0.5)
    assert [s["outcome"] for s in result.samples] == ["win", "loss", "inconsistent"]
    assert judge_server.headers_seen[0]["Authorization"] == "Bearer sk-test"
    assert "Summary A:" in judge_server.requests[0]["messages"][-1]["content"]


def test_unparsed_verdicts_are_reported_not_counted(judge_server):
    judge_server.behaviour = "garbled"
    metrics = PairwiseJudge(http_backend(judge_server)).evaluate(["p"], ["r"], ["b"]).metrics
    assert metrics["eval/unparsed_vs_dpo"] == 1 and math.isnan(metrics["eval/win_rate_vs_dpo"])


def test_http_retries_on_500_then_succeeds(judge_server):
    judge_server.failures_left = 2
    backend = http_backend(judge_server, max_retries=2)
    assert parse_pairwise_verdict(backend.complete([{"role": "user", "content": "Response A:\nx\n\nResponse B:\ny"}])) == "A"
    assert len(judge_server.requests) == 3


def test_http_gives_up_after_retries_with_a_clear_error(judge_server):
    judge_server.failures_left = 10
    with pytest.raises(JudgeHTTPError, match=r"HTTP 500.*3 attempt\(s\).*max_retries=2"):
        http_backend(judge_server, max_retries=2).complete([{"role": "user", "content": "hi"}])
    assert len(judge_server.requests) == 3


def test_http_timeout_is_a_clear_error(judge_server):
    judge_server.behaviour = "slow"
    start = time.monotonic()
    with pytest.raises(JudgeHTTPError, match=r"timed out after 0.2s \(option timeout\)"):
        http_backend(judge_server, timeout=0.2, max_retries=0).complete([{"role": "user", "content": "hi"}])
    assert time.monotonic() - start < 1.0


def test_http_auth_error_is_not_retried(judge_server):
    judge_server.behaviour = "unauthorized"
    with pytest.raises(JudgeHTTPError, match="HTTP 401.*api_key_env"):
        http_backend(judge_server, max_retries=3).complete([{"role": "user", "content": "hi"}])
    assert len(judge_server.requests) == 1


def test_connection_refused_is_a_clear_error():
    backend = OpenAICompatibleBackend("http://127.0.0.1:9", model="m", max_retries=0, timeout=2)
    with pytest.raises(JudgeHTTPError, match="connection error"):
        backend.complete([{"role": "user", "content": "hi"}])


# ---------------------------------------------------------------- pairwise on a local LM

def test_local_backend_position_bias_and_ties(models_dir, word_tokenizer):
    biased = PairwiseJudge(LocalLMBackend(constant_lm(models_dir, word_tokenizer, "A"), device="cpu"))
    assert biased.mode == "logprob"
    m = biased(PROMPTS[:2], RESPONSES[:2], ["bad", "good"])
    assert m["eval/win_rate_vs_dpo"] == 0.5 and m["eval/inconsistent_vs_dpo"] == 2
    flat = PairwiseJudge(LocalLMBackend(constant_lm(models_dir, word_tokenizer, None, "lm_flat"), device="cpu"),
                         baseline="ipo")
    m = flat(PROMPTS[:2], RESPONSES[:2], ["bad", "good"])
    assert m["eval/win_rate_vs_ipo"] == 0.5 and m["eval/ties_vs_ipo"] == 2 and m["eval/inconsistent_vs_ipo"] == 0


def test_local_backend_with_chat_template_and_generation(models_dir):
    tok = save_word_tokenizer(models_dir / "tok_chat_lm", chat_template=SIMPLE_CHAT_TEMPLATE)
    backend = LocalLMBackend(constant_lm(models_dir, tok, "B", "lm_chat_B"), device="cpu", max_new_tokens=3)
    logp_a, logp_b = backend.option_logprobs([{"role": "user", "content": "hello"}], ["A", "B"])
    assert logp_b > logp_a
    assert backend.complete([{"role": "user", "content": "hello"}]) == "B B B"


def test_pairwise_judge_options_are_checked(judge_server):
    with pytest.raises(ValueError, match="task="):
        PairwiseJudge(http_backend(judge_server), task="poetry")
    with pytest.raises(ValueError, match="mode=logprob"):
        PairwiseJudge(http_backend(judge_server), mode="logprob")


# ---------------------------------------------------------------- MT-Bench

def test_parse_rating():
    assert parse_rating("Good.\nRating: [[8]]") == 8
    assert parse_rating("Rating: [[7.5]]") == 7.5
    assert parse_rating("Rating: [6]") == 6
    assert parse_rating("Rating: [[11]]") is None
    assert parse_rating("eight out of ten") is None


def test_sample_question_file_has_the_mt_bench_format():
    questions = load_questions(SAMPLE_QUESTIONS)
    assert len(questions) >= 5
    assert {len(q["turns"]) for q in questions} == {1, 2}
    assert all(isinstance(q["question_id"], int) and q["category"] for q in questions)


def test_load_questions_errors_name_the_file(tmp_path):
    bad = tmp_path / "q.jsonl"
    bad.write_text('{"question_id": 1, "turns": ["hi"]}\n')
    with pytest.raises(ValueError, match=r"q.jsonl:1: missing \['category'\]"):
        load_questions(bad)
    with pytest.raises(FileNotFoundError, match="question_file"):
        load_questions(tmp_path / "nope.jsonl")


def test_mt_bench_over_http(judge_server):
    judge_server.behaviour = "mt_bench"
    calls = []

    def generate(conversations, temperature, max_new_tokens):
        calls.append(conversations)
        return [f"answer to: {c[-1]['content'][:20]}" for c in conversations]

    questions = load_questions(SAMPLE_QUESTIONS)
    n2 = sum(len(q["turns"]) == 2 for q in questions)
    result = MTBenchJudge(http_backend(judge_server), str(SAMPLE_QUESTIONS), concurrency=4,
                          answer_temperature=0.0).evaluate(generate)
    m = result.metrics
    assert m["eval/mt_bench_turn1"] == 7 and m["eval/mt_bench_turn2"] == 4
    assert m["eval/mt_bench"] == pytest.approx((7 * len(questions) + 4 * n2) / (len(questions) + n2))
    assert m["eval/mt_bench_n"] == len(questions) + n2 and m["eval/mt_bench_unparsed"] == 0
    assert m["eval/mt_bench/stem"] == 7
    assert [len(c) for c in calls] == [len(questions), n2]
    assert [m["role"] for m in calls[1][0]] == ["user", "assistant", "user"]
    assert calls[1][0][1]["content"].startswith("answer to:")
    math_prompt = next(r["messages"][-1]["content"] for r in judge_server.requests
                       if "rectangle" in r["messages"][-1]["content"])
    assert "Reference Answer" in math_prompt


def test_mt_bench_on_local_backend_counts_unparsed(models_dir, word_tokenizer):
    backend = LocalLMBackend(constant_lm(models_dir, word_tokenizer, "hello"), device="cpu")
    judge = MTBenchJudge(backend, str(SAMPLE_QUESTIONS), categories=["math", "stem"], max_tokens=4)
    m = judge(lambda convs, **kw: ["42"] * len(convs))
    assert m["eval/mt_bench_n"] == 3 and m["eval/mt_bench_unparsed"] == 3 and math.isnan(m["eval/mt_bench"])


# ---------------------------------------------------------------- concurrency and the verdict cache

def test_pairwise_runs_requests_concurrently(judge_server):
    judge_server.behaviour = "slow_A"
    judge = PairwiseJudge(http_backend(judge_server), concurrency=8)
    start = time.monotonic()
    metrics = judge([f"p{i}" for i in range(8)], ["r"] * 8, ["b"] * 8)
    assert metrics["eval/n_vs_dpo"] == 8 and len(judge_server.requests) == 16
    assert judge_server.max_active > 1 and time.monotonic() - start < 16 * 0.05
    assert PairwiseJudge(LocalLMBackend("unused"), concurrency=8).concurrency == 1  # one local model: no threads


def test_pairwise_cache_makes_a_rerun_free(judge_server, tmp_path):
    judge_server.behaviour = "prefers_good"
    prompts, responses, baseline = ["post 1", "post 2"], ["a good summary", "meh"], ["bland", "a good one"]
    first = PairwiseJudge(http_backend(judge_server), task="summarization", cache_dir=str(tmp_path)).evaluate(
        prompts, responses, baseline)
    assert len(judge_server.requests) == 4
    judge_server.behaviour = "garbled"  # a judge asked again would now answer differently
    rerun = PairwiseJudge(http_backend(judge_server), task="summarization", cache_dir=str(tmp_path))
    again = rerun.evaluate(prompts, responses, baseline)
    assert len(judge_server.requests) == 4 and rerun.cache.hits == 4  # zero new requests
    assert again.metrics == first.metrics
    # anything that changes the verdict is part of the key: another task (template), order, texts
    PairwiseJudge(http_backend(judge_server), task="helpfulness", cache_dir=str(tmp_path))(prompts[:1], responses[:1], baseline[:1])
    PairwiseJudge(http_backend(judge_server), task="summarization", cache_dir=str(tmp_path))(prompts[:1], ["new"], baseline[:1])
    assert len(judge_server.requests) == 8
    # a line cut short by a crash is asked again, the rest is kept
    cache_file = tmp_path / "pairwise.jsonl"
    lines = cache_file.read_text().splitlines(keepends=True)
    cache_file.write_text("".join(lines) + lines[0][:20])
    PairwiseJudge(http_backend(judge_server), task="summarization", cache_dir=str(tmp_path))(prompts, responses, baseline)
    assert len(judge_server.requests) == 8


def test_mt_bench_grading_cache_and_answer_settings(judge_server, tmp_path):
    judge_server.behaviour = "mt_bench"
    calls = []

    def generate(conversations, temperature, max_new_tokens):
        calls.append((len(conversations), temperature, max_new_tokens))
        return ["an answer"] * len(conversations)

    make = lambda: MTBenchJudge(http_backend(judge_server), str(SAMPLE_QUESTIONS), cache_dir=str(tmp_path))  # noqa: E731
    first = make().evaluate(generate)
    n_graded = int(first.metrics["eval/mt_bench_n"])
    assert len(judge_server.requests) == n_graded
    questions = load_questions(SAMPLE_QUESTIONS)
    # FastChat's per-category temperatures (greedy for math/coding/reasoning/extraction), 1024 new tokens
    assert {t for _, t, _ in calls} == {MTBenchJudge(None, "").temperature(q) for q in questions}
    assert 0.0 in {t for _, t, _ in calls} and {n for _, _, n in calls} == {1024}
    again = make().evaluate(generate)
    assert len(judge_server.requests) == n_graded and again.metrics == first.metrics
    assert set(METRIC_KEYS_MT) <= set(first.metrics) and judge_keys(
        {"_target_": "tisdpo.eval.judges.MTBenchJudge"}, "x") <= set(first.metrics)


METRIC_KEYS_MT = ("eval/mt_bench", "eval/mt_bench_turn1", "eval/mt_bench_turn2")


def test_mt_bench_loads_the_hub_schema_and_checks_the_count(tmp_path):
    hub_style = tmp_path / "h4.jsonl"
    hub_style.write_text(json.dumps({"prompt_id": 81, "category": "writing", "prompt": ["Write.", "Shorter."],
                                     "reference": []}) + "\n")
    (question,) = load_questions(hub_style)
    assert question["question_id"] == 81 and question["turns"] == ["Write.", "Shorter."] and question["reference"] == []
    with pytest.raises(ValueError, match="expected_questions=80"):
        MTBenchJudge(None, str(hub_style), expected_questions=80).questions()
    with pytest.raises(FileNotFoundError, match="question_file"):
        load_questions(tmp_path / "missing" / "question.jsonl")


# ---------------------------------------------------------------- declared keys = what the judges write

def test_declared_keys_match_what_the_judges_return(reward_model_dir, models_dir, word_tokenizer, judge_server):
    rm = {"_target_": "tisdpo.eval.judges.RewardModelJudge", "model_name_or_path": str(reward_model_dir), "name": "Harm"}
    assert judge_keys(rm, "x") == set(RewardModelJudge(str(reward_model_dir), name="Harm", device="cpu")(PROMPTS, RESPONSES))
    guard = {"_target_": "tisdpo.eval.judges.SafetyJudge", "model_name_or_path": "unused"}
    safety = SafetyJudge(constant_lm(models_dir, word_tokenizer, "safe"), max_new_tokens=2, device="cpu")
    assert judge_keys(guard, "x") == set(safety(PROMPTS[:2], RESPONSES[:2]))
    pair = {"_target_": "tisdpo.eval.judges.PairwiseJudge", "baseline": "DPO", "backend": None}
    assert judge_keys(pair, "x") == set(PairwiseJudge(http_backend(judge_server), baseline="DPO")(["p"], ["r"], ["b"]))
    with pytest.raises(ValueError, match="eval.judges.odd: builtins.dict declares no metric keys"):
        judge_keys({"_target_": "builtins.dict"}, "eval.judges.odd")


def test_evaluate_with_judges_temperatures_and_dataset_baseline(tmp_path, models_dir, word_tokenizer, reward_model_dir):
    from omegaconf import OmegaConf
    from transformers import AutoModelForCausalLM

    from tisdpo.eval.run_judges import evaluate_with_judges, temperature_suffixes

    assert temperature_suffixes([0.0, 0.5, 1.0]) == {0.0: ["@T0"], 0.5: ["@T0.5"], 1.0: ["", "@T1"]}
    assert temperature_suffixes([0.7]) == {0.7: [""]}
    policy_dir = constant_lm(models_dir, word_tokenizer, "good", "policy_good")
    policy = AutoModelForCausalLM.from_pretrained(policy_dir)
    cfg = OmegaConf.create({
        "name": "judges", "enabled": True, "n_prompts": 3, "temperatures": [0.0, 0.5, 1.0], "max_new_tokens": 3,
        "top_p": None, "batch_size": 2, "baseline_from": "dataset", "baseline_samples": None,
        "judges": {"help": {"_target_": "tisdpo.eval.judges.RewardModelJudge",
                            "model_name_or_path": str(reward_model_dir), "name": "help", "device": "cpu"}},
        "pairwise": {"_target_": "tisdpo.eval.judges.PairwiseJudge", "baseline": "reference", "task": "summarization",
                     "backend": {"_target_": "tisdpo.eval.judges.LocalLMBackend", "device": "cpu",
                                 "model_name_or_path": constant_lm(models_dir, word_tokenizer, "A")}},
        "mt_bench": None})
    metrics = evaluate_with_judges(cfg, policy, word_tokenizer, PROMPTS, 0, tmp_path, references=RESPONSES)
    assert metric_keys(cfg) == set(metrics)
    assert metrics["eval/win_rate_vs_reference@T0"] == 0.5  # a judge that always says "A": every pair inconsistent
    assert metrics["eval/help"] == metrics["eval/help@T1"]
    samples = json.loads((tmp_path / "samples.json").read_text())
    assert len(samples) == 9 and {s["temperature"] for s in samples} == {0.0, 0.5, 1.0}
    greedy = [s["response"] for s in samples if s["temperature"] == 0.0]
    assert greedy == ["good good good"] * 3  # T=0 is greedy decoding
    # without a baseline the win rate is skipped (the baseline run itself goes first), or an error on request
    cfg.baseline_from = "samples"
    assert not any("win_rate" in k for k in evaluate_with_judges(cfg, policy, word_tokenizer, PROMPTS, 0, tmp_path))
    cfg.require_baseline = True
    with pytest.raises(ValueError, match="eval.pairwise needs a baseline"):
        evaluate_with_judges(cfg, policy, word_tokenizer, PROMPTS, 0, tmp_path)
