"""MT-Bench single-answer grading (1-10 per turn) of answers from a policy's generate function."""
from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any, Callable, Sequence

from .common import JudgeResult, mean_or_nan, parallel_map, sanitize_name

Conversation = list[dict[str, str]]
GenerateFn = Callable[[list[Conversation]], list[str]]

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


def load_questions(path: str | Path) -> list[dict[str, Any]]:
    """MT-Bench ``question.jsonl``: one {question_id, category, turns[, reference]} per line."""
    path = Path(path).expanduser()
    if not path.is_file():
        raise FileNotFoundError(f"question_file={str(path)!r}: no such file")
    questions = []
    for line_no, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
        if not line.strip():
            continue
        try:
            question = json.loads(line)
        except ValueError as error:
            raise ValueError(f"{path}:{line_no}: not JSON ({error})") from error
        missing = [k for k in ("question_id", "category", "turns") if k not in question]
        if missing:
            raise ValueError(f"{path}:{line_no}: missing {missing}")
        turns = question["turns"]
        if not isinstance(turns, list) or not 1 <= len(turns) <= 2 or not all(isinstance(t, str) for t in turns):
            raise ValueError(f"{path}:{line_no}: 'turns' must be a list of 1 or 2 strings")
        questions.append(question)
    if not questions:
        raise ValueError(f"question_file={str(path)!r} holds no questions")
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

    ``evaluate(generate_fn)``: ``generate_fn`` gets a list of conversations (lists of
    {role, content} messages ending with a user turn) and returns one answer per conversation;
    all first turns are asked in one call, then all second turns.
    """

    def __init__(self, backend: Any, question_file: str, categories: Sequence[str] | None = None,
                 max_questions: int | None = None, max_tokens: int = 1024, max_workers: int = 1):
        self.backend = backend
        self.question_file = question_file
        self.categories = list(categories) if categories else None
        self.max_questions = max_questions
        self.max_tokens = int(max_tokens)
        self.max_workers = int(max_workers)

    def questions(self) -> list[dict[str, Any]]:
        questions = load_questions(self.question_file)
        if self.categories:
            questions = [q for q in questions if q["category"] in self.categories]
            if not questions:
                raise ValueError(f"categories={self.categories} match no question in {self.question_file}")
        return questions[: self.max_questions] if self.max_questions else questions

    def answer(self, generate_fn: GenerateFn, questions: list[dict[str, Any]]) -> dict[Any, list[str]]:
        """{question_id: [answer turn 1, (answer turn 2)]} from the policy."""
        first = [[{"role": "user", "content": q["turns"][0]}] for q in questions]
        first_answers = _checked(generate_fn(first), len(first))
        answers = {q["question_id"]: [a] for q, a in zip(questions, first_answers)}
        two_turn = [q for q in questions if len(q["turns"]) == 2]
        if two_turn:
            second = [[{"role": "user", "content": q["turns"][0]},
                       {"role": "assistant", "content": answers[q["question_id"]][0]},
                       {"role": "user", "content": q["turns"][1]}] for q in two_turn]
            for q, a in zip(two_turn, _checked(generate_fn(second), len(second))):
                answers[q["question_id"]].append(a)
        return answers

    def _grade_one(self, job: tuple[dict[str, Any], list[str], int]) -> dict[str, Any]:
        question, answers, turn = job
        output = self.backend.complete(grading_messages(question, answers, turn), max_tokens=self.max_tokens)
        return {"question_id": question["question_id"], "category": question["category"], "turn": turn,
                "answer": answers[turn - 1], "judge_output": output, "rating": parse_rating(output)}

    def grade(self, questions: list[dict[str, Any]], answers: dict[Any, list[str]]) -> JudgeResult:
        jobs = [(q, answers[q["question_id"]], turn) for q in questions
                for turn in range(1, len(q["turns"]) + 1)]
        samples = parallel_map(self._grade_one, jobs, self.max_workers)
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
        return self.grade(questions, self.answer(generate_fn, questions))

    def __call__(self, generate_fn: GenerateFn) -> dict[str, float]:
        return self.evaluate(generate_fn).metrics


def _checked(answers: Sequence[str], expected: int) -> list[str]:
    answers = list(answers)
    if len(answers) != expected:
        raise ValueError(f"generate_fn returned {len(answers)} answers for {expected} conversations")
    return [str(a) for a in answers]
