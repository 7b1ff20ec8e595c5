"""Preference losses against independent float64 loop computations, plus invariants."""
import math

import pytest
import torch

from omegaconf import OmegaConf

from tisdpo.constants import CONF_DIR
from tisdpo.losses import (POLICY_REF, REF_POLICY, dpo_loss, ipo_loss, kto_loss, tdpo_loss, tidpo_loss,
                           tisdpo_loss, triplet_loss)
from tisdpo.losses.registry import kl_direction
from tisdpo.registry import group_names, loss_record


def loss_node(name: str, **hparams):
    """conf/loss/<name>.yaml's loss node (a _global_ file keeps it under `loss`), with overrides."""
    node = OmegaConf.load(CONF_DIR / "loss" / f"{name}.yaml")
    node = node.get("loss", node)
    return OmegaConf.merge(node, hparams)


# Every registered loss that takes the pair contract (not an online method such as GRPO): the generic
# contract tests run on each.
LOSSES = {name: loss_record(loss_node(name)).fn for name in group_names("loss") if loss_record(loss_node(name)).pairwise}

ATOL = 1e-6
B, TW, TL = 4, 5, 7


def logsig(x):
    return -math.log1p(math.exp(-x)) if x >= 0 else x - math.log1p(math.exp(x))


def sig(x):
    return math.exp(logsig(x))


def mask(b, t, g, left=False):
    """Random 0/1 mask with at least one valid token per row; optional left padding."""
    m = torch.zeros(b, t, dtype=torch.float64)
    for i in range(b):
        n = int(torch.randint(1, t + 1, (1,), generator=g))
        if left:
            m[i, t - n:] = 1
        else:
            m[i, :n] = 1
    return m


@pytest.fixture
def batch():
    g = torch.Generator().manual_seed(0)

    def rnd(t, scale=2.0):
        return -scale * torch.rand(B, t, generator=g, dtype=torch.float64)

    return dict(
        policy_chosen_logps=rnd(TW), policy_rejected_logps=rnd(TL),
        reference_chosen_logps=rnd(TW), reference_rejected_logps=rnd(TL),
        chosen_mask=mask(B, TW, g), rejected_mask=mask(B, TL, g, left=True),
        chosen_weights=0.5 + torch.rand(B, TW, generator=g, dtype=torch.float64),
        rejected_weights=0.5 + torch.rand(B, TL, generator=g, dtype=torch.float64),
        chosen_kl=torch.rand(B, TW, generator=g, dtype=torch.float64),
        rejected_kl=torch.rand(B, TL, generator=g, dtype=torch.float64),
    )


POSITIONAL = ["policy_chosen_logps", "policy_rejected_logps", "reference_chosen_logps",
              "reference_rejected_logps", "chosen_mask", "rejected_mask"]


def call(fn, batch, **kw):
    args = [batch[k] for k in POSITIONAL]
    extra = {k: batch[k] for k in batch if k not in POSITIONAL}
    return fn(*args, **extra, **kw)


# ---- independent per-example references (plain Python floats, float64) ----

def S(batch, side, i, weighted=False):
    pol, ref = batch[f"policy_{side}_logps"][i].detach(), batch[f"reference_{side}_logps"][i]
    m, w = batch[f"{side}_mask"][i], batch[f"{side}_weights"][i]
    return sum(float(m[t]) * (float(w[t]) if weighted else 1.0) * (float(pol[t]) - float(ref[t]))
               for t in range(len(pol)))


def K(batch, side, i, weighted=False):
    kl, m, w = batch[f"{side}_kl"][i], batch[f"{side}_mask"][i], batch[f"{side}_weights"][i]
    return sum(float(m[t]) * (float(w[t]) if weighted else 1.0) * float(kl[t])
               for t in range(len(kl)))


def close(tensor, values):
    assert torch.allclose(tensor, torch.tensor(values, dtype=tensor.dtype), atol=ATOL, rtol=0)


# ---- each loss against its reference ----

@pytest.mark.parametrize("beta,eps", [(0.1, 0.0), (0.5, 0.0), (0.3, 0.2)])
def test_dpo(batch, beta, eps):
    losses, cr, rr = call(dpo_loss, batch, beta=beta, label_smoothing=eps)
    ref = []
    for i in range(B):
        h = beta * (S(batch, "chosen", i) - S(batch, "rejected", i))
        ref.append(-(1 - eps) * logsig(h) - eps * logsig(-h))
    close(losses, ref)
    close(cr, [beta * S(batch, "chosen", i) for i in range(B)])
    close(rr, [beta * S(batch, "rejected", i) for i in range(B)])


def test_cdpo_symmetry(batch):
    """L_ε(chosen, rejected) = L_{1−ε}(rejected, chosen); ε=½ is blind to the label."""
    swapped = dict(batch)
    for a, b in [("policy_chosen_logps", "policy_rejected_logps"),
                 ("reference_chosen_logps", "reference_rejected_logps"),
                 ("chosen_mask", "rejected_mask"), ("chosen_weights", "rejected_weights"),
                 ("chosen_kl", "rejected_kl")]:
        swapped[a], swapped[b] = batch[b], batch[a]
    l1, _, _ = call(dpo_loss, batch, beta=0.4, label_smoothing=0.2)
    l2, _, _ = call(dpo_loss, swapped, beta=0.4, label_smoothing=0.8)
    assert torch.allclose(l1, l2, atol=1e-12)
    h1, _, _ = call(dpo_loss, batch, beta=0.4, label_smoothing=0.5)
    h2, _, _ = call(dpo_loss, swapped, beta=0.4, label_smoothing=0.5)
    assert torch.allclose(h1, h2, atol=1e-12)


@pytest.mark.parametrize("average", [False, True])
def test_ipo(batch, average):
    beta = 0.2
    losses, cr, rr = call(ipo_loss, batch, beta=beta, average_log_prob=average)
    ref = []
    for i in range(B):
        sw, sl = S(batch, "chosen", i), S(batch, "rejected", i)
        if average:
            sw /= float(batch["chosen_mask"][i].sum())
            sl /= float(batch["rejected_mask"][i].sum())
        ref.append((sw - sl - 1 / (2 * beta)) ** 2)
    close(losses, ref)


def kto_reference(batch, beta, lam_d, lam_u, kl_logps=None):
    sw = [S(batch, "chosen", i) for i in range(B)]
    sl = [S(batch, "rejected", i) for i in range(B)]
    pool = [float(x) for x in kl_logps] if kl_logps is not None else sw + sl
    z = max(0.0, sum(pool) / len(pool))
    return [0.5 * (lam_d * (1 - sig(beta * (sw[i] - z))) + lam_u * (1 - sig(beta * (z - sl[i]))))
            for i in range(B)]


def test_kto_fallback(batch):
    # shift the chosen side up so the matched mean is positive and the clamp is inactive
    b = dict(batch, policy_chosen_logps=batch["policy_chosen_logps"] + 3.0)
    losses, cr, rr = call(kto_loss, b, beta=0.3, desirable_weight=1.5, undesirable_weight=0.7)
    close(losses, kto_reference(b, 0.3, 1.5, 0.7))
    close(cr, [0.3 * S(b, "chosen", i) for i in range(B)])


@pytest.mark.parametrize("kl", [[0.5, 1.0, -0.2, 2.0, 0.1], [-3.0, -1.0]])  # 2nd: z clamps to 0
def test_kto_with_mismatched_kl(batch, kl):
    kl_logps = torch.tensor(kl, dtype=torch.float64, requires_grad=True)
    batch = dict(batch, policy_chosen_logps=batch["policy_chosen_logps"].requires_grad_())
    losses, _, _ = call(kto_loss, batch, beta=0.5, kl_logps=kl_logps)
    close(losses, kto_reference(batch, 0.5, 1.0, 1.0, kl_logps.detach()))
    losses.sum().backward()
    assert kl_logps.grad is None  # z is detached


def test_kto_kl_logps_shape(batch):
    with pytest.raises(ValueError, match="kl_logps"):
        call(kto_loss, batch, kl_logps=torch.zeros(2, 3))


@pytest.mark.parametrize("variant", ["tdpo1", "tdpo2"])
def test_tdpo(batch, variant):
    beta, alpha = 0.3, 0.7
    losses, cr, rr = call(tdpo_loss, batch, beta=beta, alpha=alpha, variant=variant)
    a = 1.0 if variant == "tdpo1" else alpha
    ref, refc = [], []
    for i in range(B):
        m = S(batch, "chosen", i) - S(batch, "rejected", i)
        ref.append(-logsig(beta * (m - a * (K(batch, "rejected", i) - K(batch, "chosen", i)))))
        refc.append(beta * (S(batch, "chosen", i) + a * K(batch, "chosen", i)))
    close(losses, ref)
    close(cr, refc)
    assert torch.allclose(cr - rr, -torch.log(torch.expm1(losses)), atol=1e-9)  # margin = logit


@pytest.mark.parametrize("use_eta", [True, False])
def test_tisdpo(batch, use_eta):
    beta, alpha = 0.2, 0.5
    losses, cr, rr = call(tisdpo_loss, batch, beta=beta, alpha=alpha, use_eta=use_eta)
    ref = []
    for i in range(B):
        u = beta * (S(batch, "chosen", i, True) - S(batch, "rejected", i, True))
        eta = alpha * beta * (K(batch, "chosen", i, True) - K(batch, "rejected", i, True))
        ref.append(-logsig(u - (eta if use_eta else 0.0)))
    close(losses, ref)
    assert torch.allclose(cr - rr, -torch.log(torch.expm1(losses)), atol=1e-9)


@pytest.mark.parametrize("base", ["dpo", "tdpo2"])
def test_tidpo(batch, base):
    beta, alpha = 0.25, 0.6
    losses, _, _ = call(tidpo_loss, batch, beta=beta, base=base, alpha=alpha)
    ref = []
    for i in range(B):
        m = S(batch, "chosen", i, True) - S(batch, "rejected", i, True)
        if base == "tdpo2":
            m -= alpha * (K(batch, "rejected", i) - K(batch, "chosen", i))
        ref.append(-logsig(beta * m))
    close(losses, ref)


# ---- invariants ----

def at_reference(batch):
    """Policy = reference and zero KL."""
    return dict(batch, policy_chosen_logps=batch["reference_chosen_logps"].clone(),
                policy_rejected_logps=batch["reference_rejected_logps"].clone(),
                chosen_kl=torch.zeros_like(batch["chosen_kl"]),
                rejected_kl=torch.zeros_like(batch["rejected_kl"]))


@pytest.mark.parametrize("fn,kw", [(dpo_loss, {}), (tdpo_loss, {"variant": "tdpo1"}),
                                   (tdpo_loss, {"variant": "tdpo2"}), (tisdpo_loss, {}),
                                   (tidpo_loss, {}), (tidpo_loss, {"base": "tdpo2"})])
def test_ln2_at_reference(batch, fn, kw):
    losses, cr, rr = call(fn, at_reference(batch), **kw)
    assert torch.allclose(losses, torch.full_like(losses, math.log(2)), atol=1e-12)
    assert torch.all(cr == 0) and torch.all(rr == 0)


@pytest.mark.parametrize("beta", [0.1, 0.5])
def test_ipo_at_reference(batch, beta):
    losses, _, _ = call(ipo_loss, at_reference(batch), beta=beta)
    assert torch.allclose(losses, torch.full_like(losses, (1 / (2 * beta)) ** 2), atol=1e-9)


def test_tisdpo_unit_weights_no_eta_is_dpo(batch):
    args = [batch[k] for k in POSITIONAL]
    dpo = dpo_loss(*args, beta=0.3)
    for weights in (None, torch.ones_like(batch["chosen_weights"])):
        rw = None if weights is None else torch.ones_like(batch["rejected_weights"])
        tis = tisdpo_loss(*args, chosen_weights=weights, rejected_weights=rw, beta=0.3,
                          use_eta=False)
        for a, b in zip(dpo, tis):
            assert torch.equal(a, b)
    tid = tidpo_loss(*args, beta=0.3)
    assert torch.equal(tid[0], dpo[0])


def test_tisdpo_eta_sign(batch):
    """Larger weighted KL on the chosen side raises the loss; on the rejected side lowers it."""
    base, _, _ = call(tisdpo_loss, batch)
    up_c, _, _ = call(tisdpo_loss, dict(batch, chosen_kl=batch["chosen_kl"] + 1.0))
    up_r, _, _ = call(tisdpo_loss, dict(batch, rejected_kl=batch["rejected_kl"] + 1.0))
    assert torch.all(up_c > base) and torch.all(up_r < base)


def test_tisdpo_needs_kl_with_eta(batch):
    with pytest.raises(ValueError, match="chosen_kl"):
        call(tisdpo_loss, dict(batch, chosen_kl=None))
    call(tisdpo_loss, dict(batch, chosen_kl=None, rejected_kl=None), use_eta=False)  # fine


@pytest.mark.parametrize("fn,kw", [(tdpo_loss, {}), (tidpo_loss, {"base": "tdpo2"})])
def test_kl_required(batch, fn, kw):
    with pytest.raises(ValueError, match="rejected_kl"):
        call(fn, dict(batch, rejected_kl=None), **kw)


@pytest.mark.parametrize("fn,kw", [(tdpo_loss, {"variant": "tdpo2"}),
                                   (tidpo_loss, {"base": "tdpo2"})])
def test_tdpo2_stops_gradient_into_chosen_kl(batch, fn, kw):
    b = dict(batch, chosen_kl=batch["chosen_kl"].clone().requires_grad_(),
             rejected_kl=batch["rejected_kl"].clone().requires_grad_())
    call(fn, b, **kw)[0].sum().backward()
    assert b["chosen_kl"].grad is None or torch.all(b["chosen_kl"].grad == 0)
    assert b["rejected_kl"].grad.abs().sum() > 0


def test_tdpo1_gradient_reaches_chosen_kl(batch):
    b = dict(batch, chosen_kl=batch["chosen_kl"].clone().requires_grad_())
    call(tdpo_loss, b, variant="tdpo1")[0].sum().backward()
    assert b["chosen_kl"].grad.abs().sum() > 0


@pytest.mark.parametrize("name", sorted(LOSSES))
def test_rewards_detached_and_loss_differentiable(batch, name):
    b = {k: (v.clone().requires_grad_() if "logps" in k or k.endswith("_kl") else v)
         for k, v in batch.items()}
    losses, cr, rr = call(LOSSES[name], b)
    assert losses.shape == cr.shape == rr.shape == (B,)
    assert losses.requires_grad and not cr.requires_grad and not rr.requires_grad
    losses.sum().backward()
    assert b["policy_chosen_logps"].grad.abs().sum() > 0


@pytest.mark.parametrize("name", sorted(LOSSES))
def test_bool_masks_and_float32(batch, name):
    b = {k: v.float() for k, v in batch.items()}
    lf, _, _ = call(LOSSES[name], b)
    lb, _, _ = call(LOSSES[name], dict(b, chosen_mask=b["chosen_mask"].bool(),
                                       rejected_mask=b["rejected_mask"].bool()))
    assert lf.dtype == torch.float32 and torch.equal(lf, lb)


@pytest.mark.parametrize("name", sorted(LOSSES))
@pytest.mark.parametrize("arg,bad", [
    ("reference_chosen_logps", torch.zeros(B, TW + 1)),
    ("rejected_mask", torch.zeros(B, TW)),
    ("chosen_weights", torch.zeros(B)),
    ("rejected_kl", torch.zeros(B + 1, TL)),
    ("policy_chosen_logps", torch.zeros(B * TW)),
])
def test_shape_errors_name_the_argument(batch, name, arg, bad):
    with pytest.raises(ValueError, match=arg):
        call(LOSSES[name], dict(batch, **{arg: bad.double()}))


def test_batch_size_mismatch(batch):
    b = dict(batch, policy_rejected_logps=batch["policy_rejected_logps"][:2],
             reference_rejected_logps=batch["reference_rejected_logps"][:2],
             rejected_mask=batch["rejected_mask"][:2], rejected_weights=None, rejected_kl=None)
    with pytest.raises(ValueError, match="policy_rejected_logps"):
        call(dpo_loss, b)


def test_bad_options(batch):
    with pytest.raises(ValueError, match="variant"):
        call(tdpo_loss, batch, variant="tdpo3")
    with pytest.raises(ValueError, match="base"):
        call(tidpo_loss, batch, base="ipo")


def test_kl_direction_comes_from_each_record():
    needs_kl = {name for name in group_names("loss") if kl_direction(loss_node(name)) is not None}
    assert needs_kl == {"tdpo", "tisdpo", "tidpo"}  # tidpo.yaml: the released code's tdpo2 base
    assert kl_direction(loss_node("tdpo")) == REF_POLICY == "ref_policy"
    assert kl_direction(loss_node("tisdpo")) == POLICY_REF == "policy_ref"
    assert kl_direction(loss_node("tisdpo", use_eta=False)) is None
    assert kl_direction(loss_node("tidpo", base="dpo")) is None
    assert kl_direction(loss_node("tidpo", base="tdpo2")) == REF_POLICY


def test_an_unknown_loss_target_is_one_line():
    from tisdpo.checks import ConfigError
    with pytest.raises(ConfigError, match="no module tisdpo.losses.ppo"):
        loss_record(OmegaConf.create({"name": "ppo", "_target_": "tisdpo.losses.ppo.ppo_loss"}))


# ---- triplet ----

def triplet_reference(a, w, l, margin):
    """a/w/l: (policy [B,T], reference [B,T], mask [B,T]) float64 -> mean hinge."""
    def rho(x, i):
        pol, ref, m = x[0].detach(), x[1], x[2]
        return [float(pol[i, t] - ref[i, t]) for t in range(pol.shape[1]) if m[i, t] > 0]

    def d(p, q):
        return sum((p[t] - q[t]) ** 2 for t in range(min(len(p), len(q))))

    hs = []
    for i in range(a[0].shape[0]):
        ra, rw, rl = rho(a, i), rho(w, i), rho(l, i)
        hs.append(max(0.0, d(ra, rw) - d(ra, rl) + margin))
    return sum(hs) / len(hs)


def triplet_inputs(g, ta=6):
    def side(t, left=False):
        return (torch.randn(B, t, generator=g, dtype=torch.float64).requires_grad_(),
                torch.randn(B, t, generator=g, dtype=torch.float64), mask(B, t, g, left))
    return side(ta), side(TW), side(TL, left=True)


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_triplet_matches_reference(seed):
    a, w, l = triplet_inputs(torch.Generator().manual_seed(seed))
    for margin in (0.1, 5.0):
        out = triplet_loss(*a, *w, *l, margin=margin)
        assert abs(out.item() - triplet_reference(a, w, l, margin)) < ATOL


def test_triplet_zero_when_margin_met():
    g = torch.Generator().manual_seed(3)
    a, _, l = triplet_inputs(g)
    w = (a[0].detach().clone().requires_grad_(), a[1].clone(), a[2].clone())  # d(y, y_w) = 0
    l = (l[0].detach() + 10.0, l[1], l[2])  # d(y, y_l) huge
    assert triplet_loss(*a, *w, *l, margin=0.1).item() == 0.0


def test_triplet_gradients_reach_all_three():
    a, w, l = triplet_inputs(torch.Generator().manual_seed(4))
    per = triplet_loss(*a, *w, *l, margin=100.0, reduction="none")  # hinge active everywhere
    assert per.shape == (B,) and torch.all(per > 0)
    per.mean().backward()
    for x in (a, w, l):
        assert x[0].grad is not None and x[0].grad.abs().sum() > 0
        assert torch.all(x[0].grad[x[2] == 0] == 0)  # padding gets no gradient


def test_triplet_shape_errors():
    a, w, l = triplet_inputs(torch.Generator().manual_seed(5))
    with pytest.raises(ValueError, match="chosen_mask"):
        triplet_loss(*a, w[0], w[1], w[2][:, :-1], *l)
    with pytest.raises(ValueError, match="rejected_policy_logps"):
        triplet_loss(*a, *w, l[0][:2], l[1][:2], l[2][:2])


# ---- reference-free losses: SimPO and TPO ----

from tisdpo.losses.simpo import simpo_loss  # noqa: E402
from tisdpo.losses.tpo import tpo_loss  # noqa: E402


def policy_sum(batch, side, i):
    """Σ_t mask_t log π_θ(y_t) of one response, in plain float64 Python."""
    pol, m = batch[f"policy_{side}_logps"][i].detach(), batch[f"{side}_mask"][i]
    return sum(float(m[t]) * float(pol[t]) for t in range(len(pol))), sum(float(x) for x in m)


@pytest.mark.parametrize("beta,gamma", [(2.0, 1.0), (2.5, 0.25), (0.7, 0.0)])
def test_simpo_matches_an_independent_float64_formula(batch, beta, gamma):
    losses, cr, rr = call(simpo_loss, batch, beta=beta, gamma=gamma)
    for i in range(B):
        (sw, nw), (sl, nl) = policy_sum(batch, "chosen", i), policy_sum(batch, "rejected", i)
        rw, rl = beta * sw / nw, beta * sl / nl
        assert losses[i].item() == pytest.approx(-logsig(rw - rl - gamma), abs=ATOL)
        assert (cr[i].item(), rr[i].item()) == pytest.approx((rw, rl), abs=ATOL)


def test_simpo_ignores_the_reference(batch):
    other = dict(batch, reference_chosen_logps=batch["reference_chosen_logps"] - 3.0,
                 reference_rejected_logps=torch.zeros_like(batch["reference_rejected_logps"]))
    assert torch.equal(call(simpo_loss, batch)[0], call(simpo_loss, other)[0])


@pytest.mark.parametrize("beta,alpha,normalized,gamma", [(0.1, 1.0, False, 0.0), (2.0, 0.5, True, 0.8), (0.5, 0.0, False, 0.0)])
def test_tpo_matches_an_independent_float64_formula(batch, beta, alpha, normalized, gamma):
    losses, cr, rr = call(tpo_loss, batch, beta=beta, alpha=alpha, length_normalized=normalized, gamma=gamma)
    for i in range(B):
        (sw, nw), (sl, nl) = policy_sum(batch, "chosen", i), policy_sum(batch, "rejected", i)
        nll_gold = -sw / nw  # gold = chosen: the pairs carry two responses
        if normalized:
            sw, sl = sw / nw, sl / nl
        expected = -logsig(beta * sw - beta * sl - gamma) + alpha * nll_gold
        assert losses[i].item() == pytest.approx(expected, abs=ATOL)
        assert (cr[i].item(), rr[i].item()) == pytest.approx((beta * sw, beta * sl), abs=ATOL)


def test_tpo_takes_a_separate_gold_response(batch):
    g = torch.Generator().manual_seed(3)
    gold = -torch.rand(B, 6, generator=g, dtype=torch.float64)
    gold_mask = torch.ones(B, 6, dtype=torch.float64)
    with_gold, _, _ = call(tpo_loss, batch, alpha=1.0, gold_logps=gold, gold_mask=gold_mask)
    without_bc, _, _ = call(tpo_loss, batch, alpha=0.0)
    assert torch.allclose(with_gold - without_bc, -gold.mean(-1), atol=ATOL)


def test_simpo_with_zero_margin_and_equal_lengths_is_a_scaled_reference_free_dpo(batch):
    """Same lengths, γ = 0, reference 0: SimPO's argument is β/|y| (log π(y_w) − log π(y_l)), i.e. DPO's with β/|y|."""
    b = dict(batch, rejected_mask=batch["chosen_mask"].clone(), policy_rejected_logps=batch["policy_rejected_logps"][:, :TW],
             reference_rejected_logps=torch.zeros(B, TW, dtype=torch.float64),
             reference_chosen_logps=torch.zeros(B, TW, dtype=torch.float64),
             rejected_weights=None, rejected_kl=None, chosen_weights=None, chosen_kl=None)
    n = b["chosen_mask"].sum(-1)
    simpo, _, _ = call(simpo_loss, b, beta=1.0, gamma=0.0)
    for i in range(B):
        dpo_i, _, _ = call(dpo_loss, {k: (v[i:i + 1] if isinstance(v, torch.Tensor) else v) for k, v in b.items()},
                           beta=1.0 / float(n[i]))
        assert simpo[i].item() == pytest.approx(dpo_i.item(), abs=ATOL)
