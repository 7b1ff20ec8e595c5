"""Issue #25's token-level methods against independent float64 computations: ConfPO, TGDPO, SePO, OTPO
(loss, unbalanced Sinkhorn, transport weights) and critical-token weighting; their configs compose."""
from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from omegaconf import OmegaConf
from transformers import LlamaConfig, LlamaForCausalLM

from tests.conftest import CONF, TINY_MODEL, compose_config
from tisdpo.constants import IGNORE_INDEX
from tisdpo.losses.confpo import confpo_loss
from tisdpo.losses.otpo import otpo_loss
from tisdpo.losses.record import StepContext
from tisdpo.losses.sepo import sepo_loss
from tisdpo.losses.tgdpo import tgdpo_loss
from tisdpo.runtime.validate import validate_config
from tisdpo.weights.attach import apply_transform
from tisdpo.weights.estimators.critical_tokens import contrastive_logps
from tisdpo.weights.estimators.otpo import TransportWeights
from tisdpo.weights.optimal_transport import cost_matrix, ot_token_weights, unbalanced_sinkhorn

B, TW, TL = 5, 6, 8
METHODS = ("confpo", "tgdpo", "tgdpo_d", "tgdpo_p", "tgdpo_oracle", "sepo", "otpo", "critical_tokens")


def logsig(x: float) -> float:
    return -math.log1p(math.exp(-x)) if x >= 0 else x - math.log1p(math.exp(x))


@pytest.fixture
def batch():
    g = torch.Generator().manual_seed(1)

    def mask(t, left=False):
        m = torch.zeros(B, t, dtype=torch.float64)
        for i in range(B):
            n = int(torch.randint(2, t + 1, (1,), generator=g))
            if left:
                m[i, t - n:] = 1
            else:
                m[i, :n] = 1
        return m

    def rnd(t):
        return -3.0 * torch.rand(B, t, generator=g, dtype=torch.float64)

    return dict(policy_chosen_logps=rnd(TW), policy_rejected_logps=rnd(TL),
                reference_chosen_logps=rnd(TW), reference_rejected_logps=rnd(TL),
                chosen_mask=mask(TW), rejected_mask=mask(TL, left=True),
                chosen_weights=torch.randn(B, TW, generator=g, dtype=torch.float64),
                rejected_weights=torch.randn(B, TL, generator=g, dtype=torch.float64))


POSITIONAL = ["policy_chosen_logps", "policy_rejected_logps", "reference_chosen_logps",
              "reference_rejected_logps", "chosen_mask", "rejected_mask"]


def call(fn, batch, **kw):
    return fn(*[batch[k] for k in POSITIONAL], chosen_weights=batch["chosen_weights"],
              rejected_weights=batch["rejected_weights"], **kw)


def rows(batch, side, i):
    """(policy, reference, weight) float lists of the valid tokens of example i's side."""
    m = batch[f"{side}_mask"][i]
    keep = [t for t in range(len(m)) if m[t] > 0]
    pick = lambda key: [float(batch[key][i][t]) for t in keep]  # noqa: E731
    return pick(f"policy_{side}_logps"), pick(f"reference_{side}_logps"), pick(f"{side}_weights")


# ---- ConfPO ----

@pytest.mark.parametrize("beta,gamma", [(1.5, 1.6), (2.0, 0.0)])
def test_confpo_against_a_loop(batch, beta, gamma):
    losses, cr, rr = call(confpo_loss, batch, beta=beta, gamma=gamma)
    for i in range(B):
        means = []
        for side in ("chosen", "rejected"):
            pol, _, _ = rows(batch, side, i)
            threshold = math.log(sum(math.exp(x) for x in pol) / len(pol))
            picked = [x for x in pol if x < threshold]
            means.append(sum(picked) / len(picked) if picked else None)
        if None in means:
            assert float(losses[i]) == 0.0
            continue
        assert float(losses[i]) == pytest.approx(-logsig(beta * (means[0] - means[1]) - gamma), abs=1e-9)
        assert float(cr[i]) == pytest.approx(beta * means[0], abs=1e-9)
        assert float(rr[i]) == pytest.approx(beta * means[1], abs=1e-9)


def test_confpo_drops_a_pair_with_no_low_confidence_token(batch):
    b = dict(batch, policy_chosen_logps=torch.full_like(batch["policy_chosen_logps"], -1.0))  # all equal: none below the mean
    losses, _, _ = call(confpo_loss, b)
    assert torch.all(losses == 0)


def test_confpo_gradient_reaches_only_the_selected_tokens(batch):
    b = dict(batch, policy_chosen_logps=batch["policy_chosen_logps"].clone().requires_grad_())
    call(confpo_loss, b)[0].sum().backward()
    grad = b["policy_chosen_logps"].grad
    for i in range(B):
        pol = batch["policy_chosen_logps"][i]
        m = batch["chosen_mask"][i].bool()
        threshold = torch.log(pol[m].exp().mean())
        unselected = m & ~(pol < threshold) | ~m
        assert torch.all(grad[i][unselected] == 0)


# ---- TGDPO ----

@pytest.mark.parametrize("beta,alpha", [(0.1, 0.5), (0.3, 2.0)])
def test_tgdpo_against_a_loop(batch, beta, alpha):
    losses, cr, rr = call(tgdpo_loss, batch, beta=beta, alpha=alpha)
    for i in range(B):
        sums = []
        for side in ("chosen", "rejected"):
            pol, ref, g = rows(batch, side, i)
            sums.append(sum(beta * (1 + alpha * beta * gt) * (p - r) for p, r, gt in zip(pol, ref, g)))
        assert float(losses[i]) == pytest.approx(-logsig(sums[0] - sums[1]), abs=1e-9)
        assert float(cr[i] - rr[i]) == pytest.approx(sums[0] - sums[1], abs=1e-9)


def test_tgdpo_is_the_released_formula_with_oriented_rewards(batch):
    """With g^w = r̂^w and g^l = −r̂^l (the identity transform's sign), the factors are the release's
    β(1 + αβ r̂^w) and β(1 − αβ r̂^l)."""
    beta, alpha = 0.1, 0.5
    reward_w, reward_l = batch["chosen_weights"], batch["rejected_weights"]
    signed = {"chosen": apply_transform(list(reward_w), "chosen", identity_transform()),
              "rejected": apply_transform(list(reward_l), "rejected", identity_transform())}
    b = dict(batch, chosen_weights=torch.stack(signed["chosen"]), rejected_weights=torch.stack(signed["rejected"]))
    losses, _, _ = call(tgdpo_loss, b, beta=beta, alpha=alpha)
    cm, rm = batch["chosen_mask"], batch["rejected_mask"]
    dw = batch["policy_chosen_logps"] - batch["reference_chosen_logps"]
    dl = batch["policy_rejected_logps"] - batch["reference_rejected_logps"]
    released = -torch.nn.functional.logsigmoid((beta * (1 + alpha * beta * reward_w) * dw * cm).sum(-1)
                                               - (beta * (1 - alpha * beta * reward_l) * dl * rm).sum(-1))
    assert torch.allclose(losses, released, atol=1e-12)


def test_tgdpo_without_guidance_is_dpo(batch):
    from tisdpo.losses.dpo import dpo_loss
    zero = dict(batch, chosen_weights=torch.zeros_like(batch["chosen_weights"]),
                rejected_weights=torch.zeros_like(batch["rejected_weights"]))
    assert torch.allclose(call(tgdpo_loss, zero)[0], dpo_loss(*[batch[k] for k in POSITIONAL])[0], atol=1e-12)
    assert torch.allclose(call(tgdpo_loss, batch, alpha=0.0)[0], dpo_loss(*[batch[k] for k in POSITIONAL])[0], atol=1e-12)


def identity_transform():
    node = OmegaConf.load(CONF / "method" / "tgdpo.yaml").estimator.transform
    return OmegaConf.create({"name": node.name, node.name: node[node.name]})


def test_tgdpo_methods_pass_the_scores_through():
    r = torch.tensor([-3.2, 0.0, 0.7, 12.5], dtype=torch.float64)
    assert torch.allclose(apply_transform([r], "chosen", identity_transform())[0], r, atol=1e-9)
    assert torch.allclose(apply_transform([r], "rejected", identity_transform())[0], -r, atol=1e-9)


# ---- SePO ----

@pytest.mark.parametrize("kw,kl", [(0.3, 0.3), (0.5, 0.2), (1.0, 1.0)])
def test_sepo_against_a_loop(batch, kw, kl):
    beta, gamma = 1.0, 0.0
    losses, cr, rr = call(sepo_loss, batch, beta=beta, gamma=gamma, chosen_fraction=kw, rejected_fraction=kl)
    for i in range(B):
        means = []
        for side, frac in (("chosen", kw), ("rejected", kl)):
            pol, _, w = rows(batch, side, i)
            k = max(1, int(frac * len(pol)))
            order = sorted(range(len(w)), key=lambda t: (-w[t], t))[:k]  # largest first, the earlier of a tie
            means.append(sum(pol[t] for t in order) / k)
        assert float(losses[i]) == pytest.approx(-logsig(beta * (means[0] - means[1]) - gamma), abs=1e-9)
        assert float(cr[i]) == pytest.approx(beta * means[0], abs=1e-9)


def test_sepo_ties_take_the_earlier_token():
    logps = torch.tensor([[-1.0, -2.0, -3.0, -4.0]], dtype=torch.float64)
    mask = torch.ones_like(logps)
    weights = torch.tensor([[0.5, 0.9, 0.9, 0.1]], dtype=torch.float64)
    losses, cr, _ = sepo_loss(logps, logps, logps, logps, mask, mask, chosen_weights=weights,
                              rejected_weights=weights, chosen_fraction=0.25, rejected_fraction=0.5)
    assert float(cr[0]) == pytest.approx(-2.0)  # one token: the first of the two 0.9s


def test_sepo_without_weights_trains_every_token(batch):
    from tisdpo.losses.simpo import simpo_loss
    args = [batch[k] for k in POSITIONAL]
    assert torch.allclose(sepo_loss(*args)[0], simpo_loss(*args, beta=1.0, gamma=0.0)[0], atol=1e-12)
    with pytest.raises(ValueError, match="rejected_weights"):
        sepo_loss(*args, chosen_weights=batch["chosen_weights"])


# ---- OTPO: the loss ----

def test_otpo_loss_against_a_loop(batch):
    beta = 0.1
    w = dict(batch, chosen_weights=batch["chosen_weights"].abs(), rejected_weights=batch["rejected_weights"].abs())
    losses, _, _ = call(otpo_loss, w, beta=beta)
    for i in range(B):
        sums = [sum(wt * (p - r) for p, r, wt in zip(*rows(w, side, i))) for side in ("chosen", "rejected")]
        assert float(losses[i]) == pytest.approx(-logsig(beta * (sums[0] - sums[1])), abs=1e-9)


# ---- OTPO: the unbalanced Sinkhorn and the weights ----

def numpy_uot(cost: np.ndarray, a: np.ndarray, b: np.ndarray, reg: float, reg_m: float, iters: int = 20000) -> np.ndarray:
    """POT's sinkhorn_knopp_unbalanced (reg_type='entropy') as plain float64 scalings, run long."""
    k = np.exp(-cost / reg)
    fi = reg_m / (reg_m + reg)
    u, v = np.ones(len(a)), np.ones(len(b))
    for _ in range(iters):
        u = (a / (k @ v)) ** fi
        v = (b / (k.T @ u)) ** fi
    return u[:, None] * k * v[None, :]


@pytest.mark.parametrize("reg,reg_m", [(0.1, 0.2), (1.0, 0.2), (0.5, 5.0)])
def test_unbalanced_sinkhorn_against_plain_scalings(reg, reg_m):
    g = torch.Generator().manual_seed(3)
    n, m = 7, 5
    cost = torch.rand(2, n, m, generator=g, dtype=torch.float64)
    a = torch.ones(2, n, dtype=torch.float64)
    b = torch.ones(2, m, dtype=torch.float64)
    a[1, 5:] = 0  # padding: no mass
    b[1, :1] = 0
    plan = unbalanced_sinkhorn(cost, a, b, reg=reg, reg_m=reg_m, max_iter=20000, tol=1e-13)
    for i in range(2):
        rows_, cols = a[i].bool().numpy(), b[i].bool().numpy()
        expected = numpy_uot(cost[i].numpy()[rows_][:, cols], a[i].numpy()[rows_], b[i].numpy()[cols], reg, reg_m)
        assert np.allclose(plan[i].numpy()[rows_][:, cols], expected, atol=1e-9, rtol=1e-7)
        assert float(plan[i][~torch.as_tensor(rows_)].abs().sum()) == 0.0
        assert float(plan[i][:, ~torch.as_tensor(cols)].abs().sum()) == 0.0


def test_ot_token_weights_as_released():
    """Marginals rescaled to min(n, m) per side; the released cost normalisation (distances over the
    zero-padded sequence, divided by their max when it exceeds 1)."""
    g = torch.Generator().manual_seed(4)
    hidden_w = 3 * torch.randn(1, 6, 4, generator=g, dtype=torch.float64)
    hidden_l = 3 * torch.randn(1, 6, 4, generator=g, dtype=torch.float64)
    mw = torch.tensor([[0, 1, 1, 1, 1, 0]], dtype=torch.bool)   # position 0: prompt, 5: padding
    ml = torch.tensor([[0, 0, 1, 1, 1, 1]], dtype=torch.bool)
    ww, wl = ot_token_weights(hidden_w, hidden_l, mw, ml, reg=0.1, reg_m=0.2, max_iter=20000, tol=1e-13)
    # independent: the released construction on the full padded matrix, then plain scalings
    p, q = (hidden_w[0] * mw[0, :, None]).numpy(), (hidden_l[0] * ml[0, :, None]).numpy()
    cost = np.sqrt(((p[:, None, :] - q[None, :, :]) ** 2).sum(-1)) + 1e-6
    if cost.max() > 1:
        cost = cost / cost.max()
    a, b = mw[0].double().numpy(), ml[0].double().numpy()
    plan = numpy_uot(cost[a > 0][:, b > 0], a[a > 0], b[b > 0], 0.1, 0.2)
    scale = plan.sum() / min(a.sum(), b.sum())
    assert np.allclose(ww[0].numpy()[a > 0], plan.sum(1) / scale, atol=1e-8)
    assert np.allclose(wl[0].numpy()[b > 0], plan.sum(0) / scale, atol=1e-8)
    assert float(ww[0][~mw[0]].abs().sum()) == 0 and float(wl[0][~ml[0]].abs().sum()) == 0
    assert float(ww.sum()) == pytest.approx(4.0) and float(wl.sum()) == pytest.approx(4.0)
    c = cost_matrix(hidden_w, hidden_l, mw.double(), ml.double())[0].numpy()
    assert np.allclose(c[np.ix_(a > 0, b > 0)], cost[np.ix_(a > 0, b > 0)], atol=1e-12)


def tiny_llama(seed: int, vocab: int = 11):
    torch.manual_seed(seed)
    return LlamaForCausalLM(LlamaConfig(vocab_size=vocab, **TINY_MODEL)).eval()


def tiny_batch():
    """Two pairs: prompts of 2-3 tokens, responses of 2-4 tokens, right-padded (pad 0)."""
    def side(sequences, prompt_lengths, width=7):
        ids = torch.zeros(len(sequences), width, dtype=torch.long)
        labels = torch.full_like(ids, IGNORE_INDEX)
        attention = torch.zeros_like(ids)
        for i, (s, p) in enumerate(zip(sequences, prompt_lengths)):
            ids[i, :len(s)] = torch.tensor(s)
            labels[i, p:len(s)] = torch.tensor(s[p:])
            attention[i, :len(s)] = 1
        return ids, attention, labels

    batch = {}
    for name, seqs, prompts in (("chosen", [[1, 2, 3, 4, 5], [1, 6, 2, 7, 8, 9]], [2, 3]),
                                ("rejected", [[1, 2, 9, 9], [1, 6, 2, 3, 4, 5, 10]], [2, 3])):
        ids, attention, labels = side(seqs, prompts)
        batch.update({f"{name}_input_ids": ids, f"{name}_attention_mask": attention, f"{name}_labels": labels})
    return batch


def test_transport_hook_weights_the_response_tokens_only():
    policy, batch = tiny_llama(0), tiny_batch()
    ctx = StepContext(policy=policy, reference=None, batch=batch, step=0)
    chosen, rejected = TransportWeights(reg=0.1, reg_m=0.2)(ctx)
    assert chosen.shape == batch["chosen_input_ids"].shape and rejected.shape == batch["rejected_input_ids"].shape
    for i in range(2):
        cw, rw = batch["chosen_labels"][i] != IGNORE_INDEX, batch["rejected_labels"][i] != IGNORE_INDEX
        assert float(chosen[i][~cw].abs().sum()) == 0 and float(rejected[i][~rw].abs().sum()) == 0
        assert bool((chosen[i][cw] > 0).all()) and bool((rejected[i][rw] > 0).all())
        n = min(int(cw.sum()), int(rw.sum()))
        assert float(chosen[i].sum()) == pytest.approx(n, rel=1e-4) and float(rejected[i].sum()) == pytest.approx(n, rel=1e-4)
    # the same weights from the hidden states by hand (position t-1 represents token t)
    ids = torch.cat([batch["chosen_input_ids"], batch["rejected_input_ids"]])
    att = torch.cat([batch["chosen_attention_mask"], batch["rejected_attention_mask"]])
    with torch.no_grad():
        hidden = policy(input_ids=ids, attention_mask=att, output_hidden_states=True).hidden_states[-1][:, :-1].float()
    labels = torch.cat([batch["chosen_labels"], batch["rejected_labels"]])[:, 1:] != IGNORE_INDEX
    ww, wl = ot_token_weights(hidden[:2], hidden[2:], labels[:2], labels[2:], reg=0.1, reg_m=0.2)
    assert torch.allclose(chosen[:, 1:], ww, atol=1e-6) and torch.allclose(rejected[:, 1:], wl, atol=1e-6)


# ---- critical tokens ----

def test_contrastive_probability_against_a_direct_computation():
    positive, negative, batch = tiny_llama(1), tiny_llama(2), tiny_batch()
    examples = []
    for i in range(2):
        ex = {}
        for side in ("chosen", "rejected"):
            n = int(batch[f"{side}_attention_mask"][i].sum())
            ex[f"{side}_input_ids"] = batch[f"{side}_input_ids"][i][:n].tolist()
            ex[f"{side}_labels"] = batch[f"{side}_labels"][i][:n].tolist()
        prompt = int((batch["chosen_labels"][i] == IGNORE_INDEX).long().argmin())
        ex["prompt_input_ids"] = batch["chosen_input_ids"][i][:prompt].tolist()
        examples.append(ex)
    got = contrastive_logps(positive, negative, examples, pad_token_id=0, contrast=1.0, batch_size=1)
    for i, ex in enumerate(examples):
        for side in ("chosen", "rejected"):
            ids = torch.tensor([ex[f"{side}_input_ids"]])
            with torch.no_grad():
                zp, zn = positive(input_ids=ids).logits[0].double(), negative(input_ids=ids).logits[0].double()
            expected = []
            for t, label in enumerate(ex[f"{side}_labels"]):
                if label != IGNORE_INDEX:
                    probs = torch.softmax(2 * zp[t - 1] - zn[t - 1], -1)  # logits: the release's (1+1)·pos − 1·neg
                    expected.append(math.log(float(probs[label])))
            assert torch.allclose(got[side][i].double(), torch.tensor(expected, dtype=torch.float64), atol=1e-5)


def test_critical_token_transform_gives_the_released_weights():
    node = OmegaConf.load(CONF / "estimator" / "critical_tokens.yaml").transform
    p = torch.tensor([0.0, 0.1, 0.5, 0.93, 1.0], dtype=torch.float64)
    s = 2 * p - 1
    assert torch.allclose(apply_transform([s], "chosen", node)[0], p, atol=1e-12)             # weight_chosen=true: p
    assert torch.allclose(apply_transform([s], "rejected", node)[0], 1 - p, atol=1e-12)       # the release: 1 − p
    assert torch.allclose(apply_transform([torch.ones(3)], "chosen", node)[0], torch.ones(3))  # only_neg / EOS: 1
    assert torch.allclose(apply_transform([-torch.ones(3)], "rejected", node)[0], torch.ones(3))  # rejected EOS: 1


# ---- configs ----

@pytest.mark.parametrize("method", METHODS)
def test_method_configs_compose_and_validate(tmp_path, method):
    cfg = compose_config([f"method={method}"], tmp_path)
    OmegaConf.to_container(cfg, resolve=True)
    validate_config(cfg)
    assert "cdpo" not in str(cfg.label).lower().replace(" ", "")


def test_token_methods_sweep_composes(tmp_path):
    params = OmegaConf.load(CONF / "experiment" / "token_methods.yaml").hydra.sweeper.params
    methods = str(params.method).split(",")
    assert set(METHODS) - {"tgdpo_p"} <= set(methods)
    assert {"dpo", "tisdpo_d", "tidpo", "tisdpo_oracle", "tisdpo_random"} <= set(methods)
    assert str(params.seed).split(",") == ["0", "1", "2", "3", "4"]
    for method in methods:
        cfg = compose_config(["experiment=token_methods", f"method={method}"], tmp_path, tiny=False)
        assert cfg.dataset.task.get("p_good") is not None or cfg.dataset.name == "synthetic"
        validate_config(cfg)
