"""Score -> weight transforms and the TI-DPO prior / mixing, against hand computations."""
import math

import pytest
import torch

from tisdpo.weights import (TRANSFORMS, at_bound, clamp_linear, exp_clamp, gaussian_prior,
                            mix_importance, random_weights, rank_linear, uniform_weights)

from tisdpo.weights.transforms import SIGNED_TRANSFORMS

E = math.exp


def close(x, values, atol=1e-6):
    assert torch.allclose(x, torch.tensor(values, dtype=x.dtype), atol=atol, rtol=0), x


def test_exp_clamp_by_hand():
    r = torch.tensor([0.2, -1.0, 0.8])
    close(exp_clamp(r, sign=1), [E(0.2), E(-0.5), E(0.5)])
    close(exp_clamp(r, sign=-1), [E(-0.2), E(0.5), E(-0.5)])
    # clamp first (to [-0.3, 0.6]), then multiply by sign·μ; k scales
    close(exp_clamp(r, sign=-1, k=2.0, mu=0.5, lower=-0.3, upper=0.6),
          [2 * E(-0.1), 2 * E(0.15), 2 * E(-0.3)])


def test_exp_clamp_mask_and_rescale():
    r = torch.tensor([[0.2, -1.0, 0.8, 9.0], [0.1, 0.0, 0.0, 0.0]])
    m = torch.tensor([[1, 1, 1, 0], [1, 0, 0, 0]])
    w = exp_clamp(r, m, sign=1, k=3.0)
    close(w[0], [3 * E(0.2), 3 * E(-0.5), 3 * E(0.5), 0.0])
    w = exp_clamp(r, m, sign=1, k=3.0, rescale_mean_one=True)
    mean = (E(0.2) + E(-0.5) + E(0.5)) / 3
    close(w[0], [E(0.2) / mean, E(-0.5) / mean, E(0.5) / mean, 0.0])
    close(w[1], [1.0, 0.0, 0.0, 0.0])
    assert torch.allclose(w.sum(-1) / m.sum(-1), torch.ones(2))


def test_rank_linear_by_hand():
    r = torch.tensor([[3.0, 1.0, 2.0, 2.0, 7.0], [5.0, 0.0, 0.0, 0.0, 0.0]])
    m = torch.tensor([[1, 1, 1, 1, 0], [1, 0, 0, 0, 0]])
    w = rank_linear(r, m, sign=1, ties="average")
    # ranks [3, 0, 1.5, 1.5] of 4 -> 0.7 + 0.6 * rank / 3; a 1-token response -> 1.0
    close(w, [[1.3, 0.7, 1.0, 1.0, 0.0], [1.0, 0.0, 0.0, 0.0, 0.0]])
    close(rank_linear(r, m, sign=-1, ties="average")[0], [0.7, 1.3, 1.0, 1.0, 0.0])
    close(rank_linear(torch.tensor([1.0, 1.0, 1.0]), sign=1, low=0.5, high=2.0, ties="average"), [1.25] * 3)
    # default ties="ordinal" (released code: stable sort, the earlier of two tied tokens ranks lower):
    # ranks [3, 0, 1, 2]
    close(rank_linear(r, m, sign=1), [[1.3, 0.7, 0.9, 1.1, 0.0], [1.0, 0.0, 0.0, 0.0, 0.0]])
    with pytest.raises(ValueError, match="ties"):
        rank_linear(r, m, sign=1, ties="dense")


def _released_rank_based(nums, min_scale=0.7, max_scale=1.3):
    """The released code's rank_based_transform, re-derived: stable ascending sort, evenly spaced values."""
    order = sorted(range(len(nums)), key=lambda k: nums[k])
    out = [0.0] * len(nums)
    for i, k in enumerate(order):
        out[k] = 1.0 if len(nums) == 1 else min_scale + i / (len(nums) - 1) * (max_scale - min_scale)
    return out


def test_rank_linear_matches_the_released_transform_on_both_sides():
    """Released: score = log pi-(y_t) - log pi+(y_t); chosen negated (= our r), rejected as is (= -r),
    then ranked ascending. Ours: rank sign*r. Same weights, ties included (scores rounded to 0.1)."""
    g = torch.Generator().manual_seed(0)
    for n in (1, 2, 5, 17):
        r = (torch.randn(n, generator=g) * 3).round(decimals=1)
        released_score = (-r).tolist()  # log pi- - log pi+
        chosen = _released_rank_based([-x for x in released_score])
        rejected = _released_rank_based(released_score)
        close(rank_linear(r, sign=1), chosen, atol=1e-5)
        close(rank_linear(r, sign=-1), rejected, atol=1e-5)


@pytest.mark.parametrize("ties", ["ordinal", "average"])
def test_rank_linear_mean_is_one_per_response_whatever_the_scores(ties):
    g = torch.Generator().manual_seed(1)
    r = (torch.randn(6, 20, generator=g) * 9).round()  # large scores with many ties
    m = torch.arange(20)[None, :] < torch.tensor([1, 2, 5, 11, 19, 20])[:, None]
    for sign in (1, -1):
        w = rank_linear(r, m, sign=sign, ties=ties)
        assert torch.allclose(w.sum(-1) / m.sum(-1), torch.ones(6), atol=1e-6)
        assert w[m].min() >= 0.7 - 1e-6 and w[m].max() <= 1.3 + 1e-6


def test_at_bound_exp_clamp_saturation_and_rank_extremes():
    r = torch.tensor([[-2.0, -0.5, 0.1, 0.49, 0.6, 9.0], [0.0, 0.0, 0.0, 0.0, 0.0, 0.0]])
    m = torch.tensor([[1, 1, 1, 1, 1, 1], [1, 1, 1, 0, 0, 0]]).bool()
    hit = at_bound(r, m, name="exp_clamp", sign=1, lower=-0.5, upper=0.5)
    assert hit[0].tolist() == [True, True, False, False, True, True] and not hit[1].any()
    assert at_bound(r, m, name="clamp_linear", sign=-1, bound=1.5)[0].tolist() == [True, False, False, False, False, True]
    # rank: the lowest and the highest token of each response; a 1-token response sits in the middle
    hit = at_bound(r, m, name="rank_linear", sign=1, low=0.7, high=1.3, ties="ordinal")
    assert hit[0].tolist() == [True, False, False, False, False, True] and hit[1].sum() == 2
    assert not at_bound(torch.tensor([3.0]), name="rank_linear", sign=1).any()
    with pytest.raises(ValueError, match="transform.name"):
        at_bound(r, m, name="softmax", sign=1)


def test_clamp_linear_by_hand():
    r = torch.tensor([0.0, 3.0, -0.75, -2.0])
    close(clamp_linear(r, sign=1), [1.0, 1.3, 0.85, 0.7])
    close(clamp_linear(r, sign=-1), [1.0, 0.7, 1.15, 1.3])
    close(clamp_linear(r, sign=1, bound=1.0, low=0.0, high=2.0), [1.0, 2.0, 0.25, 0.0])


@pytest.mark.parametrize("name", sorted(TRANSFORMS))
def test_sign_convention(name):
    """π⁺-preferred tokens (r > 0) weigh more on the chosen side; π⁻-preferred (r < 0) on the
    rejected side."""
    r = torch.tensor([-0.4, 0.0, 0.4])
    chosen, rejected = TRANSFORMS[name](r, sign=1), TRANSFORMS[name](r, sign=-1)
    assert chosen[2] > chosen[1] > chosen[0]
    assert rejected[0] > rejected[1] > rejected[2]


@pytest.mark.parametrize("name", sorted(TRANSFORMS))
def test_masked_zero_shapes_and_bad_sign(name):
    r = torch.randn(3, 6)
    m = torch.rand(3, 6) > 0.3
    w = TRANSFORMS[name](r, m, sign=1)
    assert w.shape == r.shape and torch.all(w[~m] == 0)
    assert torch.all(w[m] > 0) or name in SIGNED_TRANSFORMS  # signed_linear may go <= 0 by design
    assert TRANSFORMS[name](r[0], sign=-1).shape == (6,)
    with pytest.raises(ValueError, match="sign"):
        TRANSFORMS[name](r, m, sign=0)
    with pytest.raises(ValueError, match="mask"):
        TRANSFORMS[name](r, m[:, :-1], sign=1)


# ---- TI-DPO prior and mixing ----

def test_gaussian_prior_by_hand():
    p = gaussian_prior([4])[0]  # mu = 1.5, sigma = 1
    raw = [E(-0.5 * (t - 1.5) ** 2) for t in range(4)]
    close(p, [x / sum(raw) for x in raw])


def test_gaussian_prior_sums_symmetry_peak():
    lengths = [1, 2, 5, 8]
    p = gaussian_prior(lengths)
    assert p.shape == (4, 8)
    assert torch.allclose(p.sum(-1), torch.ones(4))
    for i, n in enumerate(lengths):
        v = p[i, :n]
        assert torch.allclose(v, v.flip(0))  # symmetric about the middle
        assert torch.all(p[i, n:] == 0)
        assert v.argmax() in ((n - 1) // 2, n // 2)  # peak in the middle
    assert p[0, 0] == 1.0


def test_gaussian_prior_counts_valid_tokens():
    left = torch.tensor([[0, 0, 1, 1, 1], [1, 1, 1, 0, 0]])
    p = gaussian_prior(left)
    assert torch.allclose(p[0, 2:], p[1, :3])
    assert torch.allclose(gaussian_prior([3, 3], max_len=5), p[[1, 1]])
    assert torch.all(gaussian_prior(torch.zeros(1, 4)) == 0)


def test_mix_importance():
    g = torch.Generator().manual_seed(0)
    imp = torch.rand(3, 6, generator=g)
    m = torch.tensor([[1] * 6, [1] * 4 + [0] * 2, [0, 1, 1, 1, 0, 0]])
    n = m.sum(-1, keepdim=True).float()
    i = imp * m / (imp * m).sum(-1, keepdim=True)
    p = gaussian_prior(m)
    w = mix_importance(imp, m, lam=0.7)
    assert torch.allclose(w, n * (0.7 * i + 0.3 * p), atol=1e-6)
    assert torch.allclose(w.sum(-1) / n[:, 0], torch.ones(3))  # mean weight 1
    assert torch.all(w[m == 0] == 0)
    assert torch.allclose(mix_importance(imp, m, lam=1.0), n * i, atol=1e-6)
    assert torch.allclose(mix_importance(imp, m, lam=0.0), n * p, atol=1e-6)


def test_mix_importance_zero_importance_falls_back_to_uniform():
    m = torch.tensor([[1, 1, 1, 0]])
    w = mix_importance(torch.zeros(1, 4), m, lam=1.0)
    close(w, [[1.0, 1.0, 1.0, 0.0]])
    w = mix_importance(torch.tensor([[float("nan"), 1.0, 1.0, 0.0]]), m, lam=0.5)
    assert torch.isfinite(w).all() and torch.allclose(w.sum(), torch.tensor(3.0))


def test_uniform_and_random_weights():
    m = torch.tensor([[1, 1, 0], [1, 0, 0]])
    assert torch.equal(uniform_weights(m), m.float())
    w1 = random_weights(m, torch.Generator().manual_seed(1))
    w2 = random_weights(m, torch.Generator().manual_seed(1))
    assert torch.equal(w1, w2) and torch.all(w1[m == 0] == 0)
    assert torch.all((w1[m == 1] >= 0.7) & (w1[m == 1] <= 1.3))


def test_signed_linear_goes_below_zero_by_hand():
    """Signed weights (issue #22, a deviation): clamp_linear's map onto [low, high] with low < 0."""
    from tisdpo.weights.transforms import signed_linear

    r = torch.tensor([-3.0, 0.0, 0.75, 3.0])
    close(signed_linear(r, sign=1), [-0.5, 1.0, 1.75, 2.5])          # defaults [-0.5, 2.5], r = 0 -> 1
    close(signed_linear(r, sign=-1), [2.5, 1.0, 0.25, -0.5])         # rejected: a good token is pushed up
    close(signed_linear(r, sign=1, bound=1.0, low=-1.0, high=1.0), [-1.0, 0.0, 0.75, 1.0])
    mask = torch.tensor([True, True, False, True])
    assert signed_linear(r, mask, sign=1)[2] == 0  # padding carries no weight
    assert at_bound(r, name="signed_linear", sign=1).tolist() == [True, False, False, True]


def test_only_the_signed_transform_may_go_below_zero():
    from omegaconf import OmegaConf

    from tisdpo.checks import ConfigError
    from tisdpo.weights.estimators.common import check_transform

    def node(name, **params):
        return OmegaConf.create({"estimator": {"transform": {"name": name, name: params}}})

    check_transform(node("signed_linear", bound=1.5, low=-0.5, high=2.5))
    with pytest.raises(ConfigError, match="non-negative"):
        check_transform(node("clamp_linear", bound=1.5, low=-0.5, high=2.5))
    with pytest.raises(ConfigError, match="non-negative"):
        check_transform(node("rank_linear", low=-0.1, high=1.3))
    with pytest.raises(ConfigError, match="low=3"):
        check_transform(node("signed_linear", bound=1.5, low=3, high=2.5))
