"""The exact optimal reward-vs-KL frontier (tisdpo/eval/optimal_frontier.py) against brute force.

On a task small enough to enumerate every response, p0's probabilities (process_logprob) sum to 1 and
the tilted policy's log Z, expected reward, KL and length equal the recursion's, for the plain task,
the sparse-credit variant (decisive positions) and the negator variant (contextual rewards).
"""
from __future__ import annotations

import itertools
import math

import numpy as np
import pytest

from tisdpo.eval.optimal_frontier import frontier_at, optimal_frontier, process_logprob, topic_frontier
from tisdpo.tasks import SyntheticTask

SMALL = dict(n_topics=2, n_neutral=3, n_good_per_topic=1, n_harmful_per_topic=1, n_harmful_shared=1,
             min_response_length=1, max_response_length=3)


@pytest.mark.parametrize("variant", [{}, {"decisive_tokens": 1}, {"context_negators": 1}])
def test_recursion_equals_enumeration(variant):
    task = SyntheticTask(**SMALL, **variant)
    words = task.response_words
    for k in range(task.config.n_topics):
        seqs = [list(s) for L in range(1, 4) for s in itertools.product(words, repeat=L)]
        logp = np.array([process_logprob(task, k, s) for s in seqs])
        reward = np.array([task.sequence_reward(k, s) for s in seqs])
        length = np.array([len(s) for s in seqs], dtype=float)
        assert np.exp(logp).sum() == pytest.approx(1.0, abs=1e-9)
        lambdas = [0.0, 0.3, 1.5, 6.0]
        exact = topic_frontier(task, k, lambdas)
        keep = np.isfinite(logp)
        for i, lam in enumerate(lambdas):
            w = logp[keep] + lam * reward[keep]
            log_z = np.logaddexp.reduce(w)
            pi = np.exp(w - log_z)
            assert exact["log_z"][i] == pytest.approx(log_z, abs=1e-9)
            assert exact["reward"][i] == pytest.approx(float(pi @ reward[keep]), abs=1e-9)
            assert exact["length"][i] == pytest.approx(float(pi @ length[keep]), abs=1e-9)
            kl = float(pi @ (w - log_z - logp[keep]))
            assert exact["kl"][i] == pytest.approx(max(kl, 0.0), abs=1e-9)


def test_default_task_frontier_matches_the_issue():
    """Issue #22's DP over the default task: best 0.78/1.39/3.90/7.23/10.59/14.0 at KL 0.1/0.2/1/3/6/10."""
    task = SyntheticTask()
    frontier = optimal_frontier(task)
    got = frontier_at(frontier, [0.1, 0.2, 1, 3, 6, 10])
    np.testing.assert_allclose(got, [0.78, 1.39, 3.90, 7.23, 10.59, 14.0], atol=0.02)
    # concave and increasing; KL 0 is p0's own reward; beyond the last point: NaN
    kl = np.array([p["kl"] for p in frontier])
    r = np.array([p["true_reward"] for p in frontier])
    assert kl[0] == pytest.approx(0.0, abs=1e-12) and np.all(np.diff(r) >= -1e-9)
    slopes = np.diff(r) / np.maximum(np.diff(kl), 1e-12)
    assert np.all(np.diff(slopes[np.diff(kl) > 1e-6]) <= 1e-6)
    assert r[0] == pytest.approx(task.category_mix(n=4000)["mean_reward"], abs=0.1)
    assert math.isnan(frontier_at(frontier, kl[-1] + 1.0)[0])


def test_topic_mix_weights_the_frontier():
    task = SyntheticTask(**SMALL)
    only0 = optimal_frontier(task, topics=[0, 0, 0], lambdas=[0.0, 1.0])
    t0 = topic_frontier(task, 0, [0.0, 1.0])
    assert only0[1]["true_reward"] == pytest.approx(t0["reward"][1])
    mixed = optimal_frontier(task, topics=[0, 1], lambdas=[0.0, 1.0])
    t1 = topic_frontier(task, 1, [0.0, 1.0])
    assert mixed[1]["kl"] == pytest.approx((t0["kl"][1] + t1["kl"][1]) / 2)
