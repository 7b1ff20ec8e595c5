"""The exact optimal reward-vs-KL frontier of the built-in task (``eval/optimal_frontier``).

For a prompt x with topic k, the policy that maximises E_π[R] − KL(π‖p)/λ... equivalently the best
expected true reward at a KL budget, is the exponential tilt (Gibbs) of the reference p:

    π_λ(y|x) = p(y|x) · exp(λ R(x, y)) / Z_λ(x),      R = Σ_t r(k, y_{t-1}, y_t)
    E_{π_λ}[R] = d log Z_λ / dλ,                       KL(π_λ‖p) = λ E_{π_λ}[R] − log Z_λ

and over a prompt set the optimum spends the budget with one λ for every prompt (the Lagrangian is
concave), so the frontier is the curve {(mean KL, mean reward)} over λ ≥ 0 averaged over the prompts.

Here p is the task's generating process p0 (``tisdpo/tasks/synthetic/process.py``), which the SFT
reference is trained to imitate. Z_λ is computed exactly by a backward recursion over (positions left,
previous word), which gives every response length L at once (p0 draws L uniformly), with the sparse variant's
decisive positions as a sequential hypergeometric draw (d decisive words among L positions, uniform:
at position t with j decisive words left, the next word is decisive with probability j/(L−t)).
No sampling, no approximation on p0: float64 with per-step rescaling.

**The one approximation** is p0 in place of the run's actual reference (the SFT model): runs
measure KL to the SFT model. :func:`reference_gap` measures it: the Monte-Carlo KL(SFT‖p0) on the
reference's own samples (``eval/reference_process_kl``; the KL axis moves by about that much) and
the reference's reward against the frontier at KL 0 (``eval/reference_reward_gap``).
"""
from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np

from tisdpo.tasks.synthetic.rewards import CATEGORIES

__all__ = ["DEFAULT_LAMBDAS", "frontier_at", "optimal_frontier", "process_logprob", "topic_frontier"]

#: tilts λ (inverse temperatures) the frontier is evaluated at: dense, so that linear interpolation between
#: its points (the frontier is concave in KL) is below the exact curve by a negligible amount (results.json
#: keeps every 4th point: about 100, each λ step ×1.1)
DEFAULT_LAMBDAS = np.concatenate([[0.0], np.geomspace(1e-3, 60.0, 400)])


def _tables(task, k: int, system: str | None = None):
    """(rows, rewards, lengths, d): ``rows`` = {"all"} or {"decisive", "filler"} transition tables
    [V+1, V] of p0 for topic k; ``rewards`` [V+1, V] (contextual or broadcast); the lengths; d."""
    proc, rew, c = task.process, task.rewards, task.config
    p = proc.probs[system][k]  # [V+1, V], prev = V: the start
    V = p.shape[1]
    if rew.contextual is not None:
        r = rew.contextual[k]
    else:
        r = np.broadcast_to(rew.reward[k][None, :], (V + 1, V))
    d = int(c.decisive_tokens)
    if d:
        decisive = np.isin(rew.category[k], (CATEGORIES.index("good"), CATEGORIES.index("harmful")))[None, :]
        rows = {}
        for name, keep in (("decisive", decisive), ("filler", ~decisive)):
            q = p * keep
            rows[name] = q / q.sum(-1, keepdims=True)
    else:
        rows = {"all": p}
    lengths = np.arange(c.min_response_length, c.max_response_length + 1)
    return rows, np.asarray(r, dtype=np.float64), lengths, d


def topic_frontier(task, k: int, lambdas: Sequence[float] = DEFAULT_LAMBDAS) -> dict[str, np.ndarray]:
    """For topic k and every λ: ``log_z``, ``reward`` (E_{π_λ}[R]), ``kl`` (KL(π_λ‖p0)) and
    ``length`` (E_{π_λ}[L], EOS excluded), exactly (module docstring)."""
    lam = np.asarray(lambdas, dtype=np.float64)
    rows, r, lengths, d = _tables(task, k)
    n, V = len(lam), r.shape[1]
    # tilted transitions and their reward-weighted copies, per λ: [n, V+1, V]
    tilt = np.exp(lam[:, None, None] * r[None])
    A = {name: q[None] * tilt for name, q in rows.items()}
    AR = {name: a * r[None] for name, a in A.items()}
    # Backward over the number m of positions left: B_m[j, prev] = Σ over the last m words of their
    # tilted probability with j decisive words still to place (it does not depend on L, so one pass
    # up to the longest length gives Z_L = B_L[d, start] for every L); G_m the same sum weighted by
    # the reward of those m words. Rescaled per step (one scalar per λ), scales kept in log space.
    B = np.zeros((n, d + 1, V))
    B[:, 0] = 1.0
    G = np.zeros((n, d + 1, V))
    log_scale = np.zeros(n)
    log_zs, g_over_z = {}, {}
    for m in range(1, int(lengths[-1]) + 1):
        newB = np.zeros((n, d + 1, V + 1))
        newG = np.zeros((n, d + 1, V + 1))
        for j in range(d + 1):
            moves = [("all", j, 1.0)] if not d else [("decisive", j - 1, j / m), ("filler", j, 1.0 - j / m)]
            for name, j2, prob in moves:
                if prob <= 0 or j2 < 0:
                    continue
                b, g = B[:, j2, :, None], G[:, j2, :, None]       # [n, V, 1]
                newB[:, j] += prob * (A[name] @ b)[..., 0]
                newG[:, j] += prob * ((A[name] @ g) + (AR[name] @ b))[..., 0]
        scale = newB.reshape(n, -1).max(-1)
        scale = np.where(scale > 0, scale, 1.0)
        log_scale += np.log(scale)
        if m in set(int(x) for x in lengths):
            z = newB[:, d, V] / scale
            log_zs[m] = log_scale + np.log(z)
            g_over_z[m] = newG[:, d, V] / newB[:, d, V]
        B, G = newB[..., :V] / scale[:, None, None], newG[..., :V] / scale[:, None, None]
    log_zs = [log_zs[int(L)] for L in lengths]
    g_over_z = [g_over_z[int(L)] for L in lengths]
    log_zl = np.stack(log_zs, 1)                      # [n, nL]
    mean_r_l = np.stack(g_over_z, 1)                  # E[R | L] under π_λ
    log_pl = -math.log(len(lengths))                  # p0's length: uniform
    m = log_zl.max(1, keepdims=True)
    w = np.exp(log_zl - m)                            # posterior over L ∝ p(L) Z_L
    log_z = log_pl + m[:, 0] + np.log(w.sum(1))
    post = w / w.sum(1, keepdims=True)
    reward = (post * mean_r_l).sum(1)
    kl = np.maximum(lam * reward - log_z, 0.0)
    return {"lambda": lam, "log_z": log_z, "reward": reward, "kl": kl,
            "length": (post * lengths[None].astype(np.float64)).sum(1)}


def optimal_frontier(task, topics: Sequence[int] | None = None,
                     lambdas: Sequence[float] = DEFAULT_LAMBDAS) -> list[dict[str, float]]:
    """The best expected true reward at each KL to p0, averaged over prompts with ``topics`` (one
    entry per prompt; None: every topic equally): ``[{kl, true_reward, length, lambda}]`` sorted
    by KL, the first at KL 0 (p0's own reward)."""
    K = task.config.n_topics
    counts = np.bincount(np.asarray(list(topics), dtype=np.int64), minlength=K) if topics is not None else np.ones(K)
    share = counts / counts.sum()
    per = {k: topic_frontier(task, k, lambdas) for k in range(K) if share[k] > 0}
    kl = sum(share[k] * f["kl"] for k, f in per.items())
    reward = sum(share[k] * f["reward"] for k, f in per.items())
    length = sum(share[k] * f["length"] for k, f in per.items())
    lam = np.asarray(lambdas, dtype=np.float64)
    order = np.argsort(kl, kind="stable")
    return [{"kl": float(kl[i]), "true_reward": float(reward[i]), "length": float(length[i]),
             "lambda": float(lam[i])} for i in order]


def frontier_at(frontier: Sequence[dict], kl: float | Sequence[float], key: str = "true_reward") -> np.ndarray:
    """The frontier's ``key`` at ``kl`` by linear interpolation between its points (below the
    concave exact curve by a negligible amount at the default λ grid); NaN beyond its last KL."""
    xs = np.array([p["kl"] for p in frontier], dtype=np.float64)
    ys = np.array([p[key] for p in frontier], dtype=np.float64)
    at = np.atleast_1d(np.asarray(kl, dtype=np.float64))
    out = np.interp(np.clip(at, 0.0, None), xs, ys)
    out[at > xs[-1]] = np.nan
    return out


def process_logprob(task, topic: int, words: Sequence[str]) -> float:
    """log p0(y | topic) of a whole response (its length and every word): −inf outside p0's support
    (a length outside [min, max], a word outside the response vocabulary, the wrong number of
    decisive words in the sparse variant)."""
    rows, _, lengths, d = _tables(task, topic)
    L = len(words)
    if L < lengths[0] or L > lengths[-1]:
        return -math.inf
    idx = task.vocabulary.word_to_index
    V = task.process.p0.shape[-1]
    out = -math.log(len(lengths))
    prev = V
    seq = []
    for w in words:
        if w not in idx:
            return -math.inf
        seq.append(idx[w])
    if d:
        decisive = np.isin(task.rewards.category[topic], (CATEGORIES.index("good"), CATEGORIES.index("harmful")))
        flags = decisive[seq]
        if int(flags.sum()) != d:
            return -math.inf
        out -= math.log(math.comb(L, d))
        for j, f in zip(seq, flags):
            q = rows["decisive" if f else "filler"][prev, j]
            out += math.log(q) if q > 0 else -math.inf
            prev = j
        return out
    for j in seq:
        q = rows["all"][prev, j]
        out += math.log(q) if q > 0 else -math.inf
        prev = j
    return out
