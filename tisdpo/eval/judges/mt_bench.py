"""MT-Bench single-answer grading (1-10 per turn) of answers from a policy's generate function.

MT-Bench (Zheng et al. 2023): 80 two-turn questions in 8 categories; the model answers both turns
(up to 1024 new tokens each, sampled at FastChat's per-category temperature: 0.7 for writing and
roleplay, 0.1 for stem and humanities, greedy for extraction, math, coding and reasoning), and a
strong LLM judge (GPT-4 in the TIS-DPO paper) rates each turn 1-10; the score is the mean over all
rated turns. Questions come from FastChat's ``question.jsonl`` ({question_id, category, turns[,
reference]}) or the hub dataset ``HuggingFaceH4/mt_bench_prompts`` ({prompt_id, category, prompt,
reference}).
"""
from __future__ import annotations

import json
import logging
import re
from pathlib import Path
from typing import Any, Callable, Sequence

from .cache import backend_identity, cache_key, open_cache
from .common import JudgeResult, mean_or_nan, parallel_map, sanitize_name

log = logging.getLogger(__name__)

Conversation = list[dict[str, str]]
# generate_fn(conversations, temperature=..., max_new_tokens=...) -> one answer per conversation;
# temperature 0 means greedy decoding.
GenerateFn = Callable[..., list[str]]

# FastChat llm_judge/common.py temperature_config: the sampling temperature of each category's answers.
CATEGORY_TEMPERATURES: dict[str, float] = {
    "writing": 0.7, "roleplay": 0.7, "extraction": 0.0, "math": 0.0, "coding": 0.0,
    "reasoning": 0.0, "stem": 0.1, "humanities": 0.1, "arena-hard-200": 0.0,
}
# The summary metrics (tisdpo.eval.keys declares them); per-category means come on top.
METRIC_KEYS = ("eval/mt_bench", "eval/mt_bench_turn1", "eval/mt_bench_turn2", "eval/mt_bench_unparsed",
               "eval/mt_bench_n")

SYSTEM_PROMPT = "You are a helpful assistant."

_INSTRUCTION = ("Please act as an impartial judge and rate the quality of the AI assistant's answer "
                "to the user question shown below. Consider helpfulness, relevance, accuracy, depth, "
                "creativity and level of detail. {extra}Start with a short explanation and be as "
                "objective as possible. Then rate the answer on a scale of 1 to 10, strictly in this "
                "format: \"Rating: [[5]]\".")
_REFERENCE_EXTRA = ("A reference answer is given: compare the assistant's answer with it and "
                    "point out and correct mistakes. ")
_SECOND_TURN_EXTRA = "Focus on the assistant's answer to the second user question. "

_RATING = (re.compile(r"\[\[\s*(\d+(?:\.\d+)?)\s*\]\]"), re.compile(r"\[\s*(\d+(?:\.\d+)?)\s*\]"))


def parse_rating(text: str) -> float | None:
    """The rating in "Rating: [[x]]" (falls back to "[x]"); None unless 1 <= x <= 10."""
    for pattern in _RATING:
        match = pattern.search(str(text))
        if match:
            value = float(match.group(1))
            return value if 1.0 <= value <= 10.0 else None
    return None


def _normalise_question(raw: dict[str, Any], where: str) -> dict[str, Any]:
    """FastChat's schema; the hub dataset's names (prompt_id, prompt) are mapped onto it."""
    question = dict(raw)
    if "turns" not in question and "prompt" in question:
        question["turns"] = question.pop("prompt")
    if "question_id" not in question and "prompt_id" in question:
        question["question_id"] = question.pop("prompt_id")
    missing = [k for k in ("question_id", "category", "turns") if k not in question]
    if missing:
        raise ValueError(f"{where}: missing {missing}")
    turns = question["turns"]
    if isinstance(turns, tuple):
        turns = question["turns"] = list(turns)
    if not isinstance(turns, list) or not 1 <= len(turns) <= 2 or not all(isinstance(t, str) for t in turns):
        raise ValueError(f"{where}: 'turns' must be a list of 1 or 2 strings")
    reference = question.get("reference")
    # The hub copy gives an empty list (or empty strings) where a question has no reference answer.
    question["reference"] = list(reference) if isinstance(reference, (list, tuple)) and any(reference) else []
    return question


def _looks_like_hub_id(name: str) -> bool:
    return (re.fullmatch(r"[A-Za-z0-9][\w.\-]*/[\w.\-]+", name) is not None
            and not name.endswith((".jsonl", ".json")))


def load_questions(path: str | Path, split: str = "train") -> list[dict[str, Any]]:
    """MT-Bench questions from a jsonl file (FastChat ``question.jsonl``: one {question_id,
    category, turns[, reference]} per line) or a hub dataset id (``HuggingFaceH4/mt_bench_prompts``)."""
    name = str(path)
    local = Path(name).expanduser()
    if not local.is_file():
        if _looks_like_hub_id(name) and not local.exists():
            from datasets import load_dataset

            rows = load_dataset(name, split=split)
            questions = [_normalise_question(row, f"{name}[{i}]") for i, row in enumerate(rows)]
            if not questions:
                raise ValueError(f"question_file={name!r} holds no questions")
            return questions
        raise FileNotFoundError(f"question_file={name!r}: no such file (give a question.jsonl or a hub dataset id)")
    questions = []
    for line_no, line in enumerate(local.read_text(encoding="utf-8").splitlines(), 1):
        if not line.strip():
            continue
        try:
            raw = json.loads(line)
        except ValueError as error:
            raise ValueError(f"{local}:{line_no}: not JSON ({error})") from error
        questions.append(_normalise_question(raw, f"{local}:{line_no}"))
    if not questions:
        raise ValueError(f"question_file={name!r} holds no questions")
    return questions


def grading_messages(question: dict[str, Any], answers: Sequence[str], turn: int) -> Conversation:
    """Judge prompt for ``turn`` (1 or 2) of ``question`` answered by ``answers``."""
    reference = question.get("reference") or []
    has_reference = len(reference) >= turn
    extra = (_REFERENCE_EXTRA if has_reference else "") + (_SECOND_TURN_EXTRA if turn == 2 else "")
    parts = [_INSTRUCTION.format(extra=extra)]
    if turn == 1:
        if has_reference:
            parts.append(f"[The Start of Reference Answer]\n{reference[0]}\n[The End of Reference Answer]")
        parts.append(f"[Question]\n{question['turns'][0]}")
        parts.append(f"[The Start of Assistant's Answer]\n{answers[0]}\n[The End of Assistant's Answer]")
    else:
        if has_reference:
            parts.append("<|The Start of Reference Answers|>\n"
                         f"### User:\n{question['turns'][0]}\n### Reference answer:\n{reference[0]}\n"
                         f"### User:\n{question['turns'][1]}\n### Reference answer:\n{reference[1]}\n"
                         "<|The End of Reference Answers|>")
        parts.append("<|The Start of Assistant A's Conversation with User|>\n"
                     f"### User:\n{question['turns'][0]}\n### Assistant A:\n{answers[0]}\n"
                     f"### User:\n{question['turns'][1]}\n### Assistant A:\n{answers[1]}\n"
                     "<|The End of Assistant A's Conversation with User|>")
    return [{"role": "system", "content": SYSTEM_PROMPT}, {"role": "user", "content": "\n\n".join(parts)}]


class MTBenchJudge:
    """Grades 1- and 2-turn MT-Bench questions; reports ``eval/mt_bench`` (mean over all graded
    turns, as MT-Bench does), ``eval/mt_bench_turn1``/``_turn2``, per-category means
    ``eval/mt_bench/<category>``, and ``eval/mt_bench_unparsed`` (turns without a valid rating,
    left out of the means).

    ``evaluate(generate_fn)``: ``generate_fn(conversations, temperature=t, max_new_tokens=n)``
    gets a list of conversations (lists of {role, content} messages ending with a user turn) and
    returns one answer per conversation; first turns are asked before second turns, one call per
    temperature. ``answer_temperature``: ``category`` (FastChat's per-category temperatures) or
    a number for every question (0 = greedy); ``answer_max_new_tokens``: 1024 as in MT-Bench.
    ``expected_questions`` (80 for the benchmark) makes a short question file an error rather than
    a quietly different benchmark. Grading runs ``concurrency`` judge calls at once and, with
    ``cache_dir``, stores each judge answer in ``<cache_dir>/mt_bench.jsonl`` (keyed by the judge
    and the full grading prompt), so reruns do not pay twice.
    """

    def __init__(self, backend: Any, question_file: str, categories: Sequence[str] | None = None,
                 max_questions: int | None = None, max_tokens: int = 1024, concurrency: int = 8,
                 answer_temperature: float | str = "category", answer_max_new_tokens: int = 1024,
                 expected_questions: int | None = None, cache_dir: str | None = None):
        if isinstance(answer_temperature, str) and answer_temperature != "category":
            raise ValueError(f"answer_temperature must be 'category' or a number, got {answer_temperature!r}")
        self.backend = backend
        self.question_file = question_file
        self.categories = list(categories) if categories else None
        self.max_questions = max_questions
        self.max_tokens = int(max_tokens)
        self.concurrency = min(int(concurrency), int(getattr(backend, "max_concurrency", concurrency)))
        self.answer_temperature = answer_temperature
        self.answer_max_new_tokens = int(answer_max_new_tokens)
        self.expected_questions = expected_questions
        self.cache = open_cache(cache_dir, "mt_bench")

    def questions(self) -> list[dict[str, Any]]:
        questions = load_questions(self.question_file)
        if self.expected_questions is not None and len(questions) != int(self.expected_questions):
            raise ValueError(f"question_file={self.question_file!r} holds {len(questions)} questions, "
                             f"expected_questions={self.expected_questions} (MT-Bench has 80)")
        if self.categories:
            questions = [q for q in questions if q["category"] in self.categories]
            if not questions:
                raise ValueError(f"categories={self.categories} match no question in {self.question_file}")
        return questions[: self.max_questions] if self.max_questions else questions

    def temperature(self, question: dict[str, Any]) -> float:
        if self.answer_temperature == "category":
            return CATEGORY_TEMPERATURES.get(question["category"], 0.7)  # FastChat's default: 0.7
        return float(self.answer_temperature)

    def _ask(self, generate_fn: GenerateFn, items: list[tuple[dict[str, Any], Conversation]]) -> list[str]:
        """Answers for (question, conversation) items, one generate_fn call per temperature."""
        answers: list[str | None] = [None] * len(items)
        for temperature in sorted({self.temperature(q) for q, _ in items}):
            idx = [i for i, (q, _) in enumerate(items) if self.temperature(q) == temperature]
            out = _checked(generate_fn([items[i][1] for i in idx], temperature=temperature,
                                       max_new_tokens=self.answer_max_new_tokens), len(idx))
            for i, answer in zip(idx, out):
                answers[i] = answer
        return [str(a) for a in answers]

    def answer(self, generate_fn: GenerateFn, questions: list[dict[str, Any]]) -> dict[Any, list[str]]:
        """{question_id: [answer turn 1, (answer turn 2)]} from the policy."""
        first = [(q, [{"role": "user", "content": q["turns"][0]}]) for q in questions]
        answers = {q["question_id"]: [a] for q, a in zip(questions, self._ask(generate_fn, first))}
        two_turn = [q for q in questions if len(q["turns"]) == 2]
        if two_turn:
            second = [(q, [{"role": "user", "content": q["turns"][0]},
                           {"role": "assistant", "content": answers[q["question_id"]][0]},
                           {"role": "user", "content": q["turns"][1]}]) for q in two_turn]
            for q, a in zip(two_turn, self._ask(generate_fn, second)):
                answers[q["question_id"]].append(a)
        return answers

    def _complete(self, messages: Conversation) -> str:
        if self.cache is None:
            return self.backend.complete(messages, max_tokens=self.max_tokens)
        key = cache_key(judge=backend_identity(self.backend), messages=messages, max_tokens=self.max_tokens)
        output = self.cache.get(key)
        if output is None:
            output = self.backend.complete(messages, max_tokens=self.max_tokens)
            self.cache.put(key, output)
        return output

    def _grade_one(self, job: tuple[dict[str, Any], list[str], int]) -> dict[str, Any]:
        question, answers, turn = job
        output = self._complete(grading_messages(question, answers, turn))
        return {"question_id": question["question_id"], "category": question["category"], "turn": turn,
                "answer": answers[turn - 1], "judge_output": output, "rating": parse_rating(output)}

    def grade(self, questions: list[dict[str, Any]], answers: dict[Any, list[str]]) -> JudgeResult:
        jobs = [(q, answers[q["question_id"]], turn) for q in questions
                for turn in range(1, len(q["turns"]) + 1)]
        samples = parallel_map(self._grade_one, jobs, self.concurrency)
        rated = [s for s in samples if s["rating"] is not None]
        metrics = {
            "eval/mt_bench": mean_or_nan([s["rating"] for s in rated]),
            "eval/mt_bench_turn1": mean_or_nan([s["rating"] for s in rated if s["turn"] == 1]),
            "eval/mt_bench_turn2": mean_or_nan([s["rating"] for s in rated if s["turn"] == 2]),
            "eval/mt_bench_unparsed": float(len(samples) - len(rated)),
            "eval/mt_bench_n": float(len(samples)),
        }
        for category in sorted({s["category"] for s in samples}):
            key = f"eval/mt_bench/{sanitize_name(category, 'category')}"
            metrics[key] = mean_or_nan([s["rating"] for s in rated if s["category"] == category])
        return JudgeResult(metrics, samples)

    def evaluate(self, generate_fn: GenerateFn) -> JudgeResult:
        questions = self.questions()
        log.info("MT-Bench: %d questions from %s", len(questions), self.question_file)
        return self.grade(questions, self.answer(generate_fn, questions))

    def __call__(self, generate_fn: GenerateFn) -> dict[str, float]:
        return self.evaluate(generate_fn).metrics


def _checked(answers: Sequence[str], expected: int) -> list[str]:
    answers = list(answers)
    if len(answers) != expected:
        raise ValueError(f"generate_fn returned {len(answers)} answers for {expected} conversations")
    return [str(a) for a in answers]
