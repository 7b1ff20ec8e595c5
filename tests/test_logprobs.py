"""Chunked token log-probs and per-position KL against the naive full log_softmax."""
import pytest
import torch

from tisdpo.kernels.logprobs import per_position_kl, token_logps

N, T, V = 3, 9, 17


def naive_logps(logits, labels, ignore_index=-100):
    mask = labels[:, 1:] != ignore_index
    lp = logits.float().log_softmax(-1)[:, :-1]
    out = lp.gather(-1, labels[:, 1:].masked_fill(~mask, 0)[..., None]).squeeze(-1)
    return out * mask, mask


def naive_kl(p, q, mask):
    lp, lq = p.float().log_softmax(-1)[:, :-1], q.float().log_softmax(-1)[:, :-1]
    return (lp.exp() * (lp - lq)).sum(-1) * mask


def make(seed=0, dtype=torch.float32):
    g = torch.Generator().manual_seed(seed)
    logits = (3 * torch.randn(N, T, V, generator=g)).to(dtype)
    labels = torch.randint(0, V, (N, T), generator=g)
    labels[0, :4] = -100  # prompt positions
    labels[1, -3:] = -100  # right padding
    return logits, labels, g


@pytest.mark.parametrize("chunk", [1, 4, 7, 1024])  # partial blocks, row-grouped blocks
def test_token_logps_values_and_grads(chunk):
    logits, labels, g = make()
    a = logits.clone().requires_grad_()
    b = logits.clone().requires_grad_()
    out, mask = token_logps(a, labels, chunk_size=chunk)
    ref, ref_mask = naive_logps(b, labels)
    assert out.shape == (N, T - 1) and out.dtype == torch.float32
    assert torch.equal(mask, ref_mask)
    assert torch.allclose(out, ref, atol=1e-5)
    assert torch.all(out[~mask] == 0)
    up = torch.randn(N, T - 1, generator=g)
    (out * up).sum().backward()
    (ref * up).sum().backward()
    assert torch.allclose(a.grad, b.grad, atol=1e-5)
    assert torch.all(a.grad[:, -1] == 0)  # last position predicts nothing
    assert torch.all(a.grad[:, :-1][~mask] == 0)  # masked positions get no gradient


def test_token_logps_bf16():
    logits, labels, _ = make(1, torch.bfloat16)
    x = logits.clone().requires_grad_()
    out, _ = token_logps(x, labels, chunk_size=5)
    ref, _ = naive_logps(logits, labels)  # the upcast is exact, so only fp32 rounding differs
    assert out.dtype == torch.float32 and torch.allclose(out, ref, atol=1e-5)
    out.sum().backward()
    assert x.grad.dtype == torch.bfloat16


def test_token_logps_no_grad_and_custom_ignore():
    logits, labels, _ = make(2)
    labels = labels.masked_fill(labels == -100, 0)
    labels[2, 5:] = 7  # use 7 as the ignore index
    with torch.no_grad():
        out, mask = token_logps(logits, labels, ignore_index=7)
    ref, _ = naive_logps(logits, labels, ignore_index=7)
    assert torch.allclose(out, ref, atol=1e-5) and not mask[2, 4:].any()


def test_token_logps_gradcheck():
    g = torch.Generator().manual_seed(3)
    logits = torch.randn(2, 4, 5, generator=g, dtype=torch.float64, requires_grad=True)
    labels = torch.tensor([[1, 2, 3, -100], [-100, 0, 4, 1]])
    assert torch.autograd.gradcheck(lambda x: token_logps(x, labels, chunk_size=3)[0], (logits,),
                                   fast_mode=True)


def test_token_logps_shape_errors():
    with pytest.raises(ValueError, match="logits"):
        token_logps(torch.zeros(3, 4), torch.zeros(3, 4, dtype=torch.long))
    with pytest.raises(ValueError, match="labels"):
        token_logps(torch.zeros(3, 4, 5), torch.zeros(3, 5, dtype=torch.long))


@pytest.mark.parametrize("chunk", [1, 5, 1024])
@pytest.mark.parametrize("full_mask", [False, True])
def test_per_position_kl_values_and_grads(chunk, full_mask):
    p_logits, labels, g = make(4)
    q_logits = p_logits + torch.randn(N, T, V, generator=g)
    mask = labels[:, 1:] != -100
    pa, qa = p_logits.clone().requires_grad_(), q_logits.clone().requires_grad_()
    pb, qb = p_logits.clone().requires_grad_(), q_logits.clone().requires_grad_()
    out = per_position_kl(pa, qa, (labels != -100) if full_mask else mask, chunk_size=chunk)
    ref = naive_kl(pb, qb, mask)
    assert out.shape == (N, T - 1) and torch.allclose(out, ref, atol=1e-5)
    assert torch.all(out[~mask] == 0) and torch.all(out >= -1e-6)
    up = torch.randn(N, T - 1, generator=g)
    (out * up).sum().backward()
    (ref * up).sum().backward()
    assert torch.allclose(pa.grad, pb.grad, atol=1e-5)
    assert torch.allclose(qa.grad, qb.grad, atol=1e-5)


def test_per_position_kl_grad_only_where_needed():
    p, labels, g = make(5)
    q = torch.randn(N, T, V, generator=g).requires_grad_()  # e.g. TDPO: p = frozen reference
    out = per_position_kl(p, q, labels[:, 1:] != -100)
    out.sum().backward()
    assert p.grad is None and q.grad.abs().sum() > 0


def test_per_position_kl_self_is_zero_and_gradcheck():
    p, labels, _ = make(6)
    assert torch.allclose(per_position_kl(p, p, labels[:, 1:] != -100), torch.zeros(N, T - 1),
                          atol=1e-5)
    g = torch.Generator().manual_seed(7)
    a = torch.randn(2, 4, 5, generator=g, dtype=torch.float64, requires_grad=True)
    b = torch.randn(2, 4, 5, generator=g, dtype=torch.float64, requires_grad=True)
    m = torch.tensor([[True, True, False], [False, True, True]])
    assert torch.autograd.gradcheck(lambda x, y: per_position_kl(x, y, m, chunk_size=2), (a, b),
                                   fast_mode=True)


def test_per_position_kl_shape_errors():
    x = torch.zeros(2, 4, 5)
    with pytest.raises(ValueError, match="q_logits"):
        per_position_kl(x, torch.zeros(2, 4, 6), torch.ones(2, 3))
    with pytest.raises(ValueError, match="mask"):
        per_position_kl(x, x, torch.ones(2, 2))
