"""Judges for real runs; each is built from config (``_target_``) and returns flat metrics.

- ``RewardModelJudge`` (alias ``ScoreModelJudge``): a reward or cost model -> ``eval/<name>``; safe-rlhf
  score models (PKU's beaver-7b-v1.0-cost/-reward: the TIS-DPO paper's Harm/Help) or any
  ``AutoModelForSequenceClassification``.
- ``SafetyJudge``: a Llama-Guard-style classifier -> ``eval/safe_rate`` (+ unparsed count).
- ``PairwiseJudge``: position-swapped A/B judging -> ``eval/win_rate_vs_<baseline>``, with
  ``OpenAICompatibleBackend`` (HTTP) or ``LocalLMBackend`` (a local causal LM).
- ``MTBenchJudge``: MT-Bench single-answer grading -> ``eval/mt_bench``, ``_turn1``, ``_turn2``.
"""
from .common import JudgeResult
from .http import JudgeHTTPError, OpenAICompatibleBackend, chat_completions_url, post_json
from .local_lm import LocalCausalLM, LocalLMBackend
from .mt_bench import MTBenchJudge, load_questions, parse_rating
from .pairwise import PairwiseJudge, combine_verdicts, parse_pairwise_verdict
from .reward_model import RewardModelJudge
from .score_model import SafeRLHFScoreModel, load_score_model
from .safety import SafetyJudge, parse_safety_verdict

__all__ = [
    "JudgeResult", "JudgeHTTPError", "OpenAICompatibleBackend", "chat_completions_url", "post_json",
    "LocalCausalLM", "LocalLMBackend", "MTBenchJudge", "load_questions", "parse_rating",
    "PairwiseJudge", "combine_verdicts", "parse_pairwise_verdict", "RewardModelJudge",
    "SafetyJudge", "parse_safety_verdict", "ScoreModelJudge", "SafeRLHFScoreModel", "load_score_model",
]

ScoreModelJudge = RewardModelJudge
