"""kernels/varlen_attention: the C packed attention, forward and backward, against its torch
reference (one SDPA call per row on its prefix + own keys), and the model's two attention paths."""

from __future__ import annotations

import cpmtool.kernels.varlen_attention as va
import pytest
import torch
from cpmtool.kernels import cbuild
from cpmtool.kernels.varlen_attention.reference import varlen_attention_ref


def _kernel_or_skip():
    if va._kernel() is None:
        pytest.skip(f"varlen kernel unavailable: {cbuild.build_error(va._SRC) or 'no AVX2/FMA'}")


def _case(lens, h, hkv, d, plens=None, group=None, seed=0, scale=1.0):
    """Packed q, k, v for rows of `lens` tokens (leaves with gradients), and with `plens` a prefix
    tensor pair of those prompt lengths, row b reading prompt group[b]."""
    g = torch.Generator().manual_seed(seed)
    n = sum(lens)
    cu = torch.tensor([0, *lens]).cumsum(0)
    q = (torch.randn(n, h * d, generator=g) * scale).requires_grad_()
    k = (torch.randn(n, hkv * d, generator=g) * scale).requires_grad_()
    v = torch.randn(n, hkv * d, generator=g).requires_grad_()
    leaves, prefix = [q, k, v], None
    if plens is not None:
        pcu = torch.tensor([0, *plens]).cumsum(0)
        pk = (torch.randn(sum(plens), hkv * d, generator=g) * scale).requires_grad_()
        pv = torch.randn(sum(plens), hkv * d, generator=g).requires_grad_()
        prefix = (pk, pv, pcu, torch.tensor(group))
        leaves += [pk, pv]
    return q, k, v, cu, prefix, leaves


def _check(lens, h, hkv, d, plens=None, group=None, seed=0, scale=1.0, atol=2e-5):
    q, k, v, cu, prefix, leaves = _case(lens, h, hkv, d, plens, group, seed, scale)
    got = va.varlen_attention(q, k, v, cu, n_heads=h, prefix=prefix)
    want = varlen_attention_ref(q, k, v, cu, n_heads=h, prefix=prefix)
    assert got.shape == (sum(lens), h * d)
    assert torch.allclose(got, want, atol=atol, rtol=1e-4)
    gy = torch.randn(got.shape, generator=torch.Generator().manual_seed(seed + 1))
    for a, b in zip(torch.autograd.grad(got, leaves, gy), torch.autograd.grad(want, leaves, gy), strict=True):
        assert torch.allclose(a, b, atol=atol * 4, rtol=1e-4), (a - b).abs().max()


@pytest.mark.parametrize("lens, h, hkv, d", [
    ([5, 1, 40, 33], 4, 2, 64),         # cpm-tiny's heads, rows of any length
    ([70, 3, 100], 9, 3, 64),           # smollm2-135m's heads; rows longer than a 32-query chunk
    ([17, 9], 8, 8, 128),               # no grouping, D = 128
    ([12, 30], 6, 1, 16),               # one kv head for all, the smallest D
    ([1, 1, 1], 2, 2, 32),              # one-token rows: each sees itself only
    ([40, 7], 16, 2, 128),              # MiniCPM4-0.5B's heads: 8 query heads a KV head, D = 128
    ([9, 35], 32, 2, 64),               # 16 query heads a KV head
])
def test_causal_rows_match_the_reference(lens, h, hkv, d):
    _kernel_or_skip()
    _check(lens, h, hkv, d)


@pytest.mark.parametrize("lens, plens, group", [
    ([6, 0, 40, 70], [3, 17], [0, 1, 1, 0]),    # interleaved groups; an empty row (a 1-token response)
    ([9] * 8, [5, 12], [0, 0, 0, 0, 1, 1, 1, 1]),  # GRPO's side-by-side groups
    ([1], [1], [0]),                              # the smallest prefix and row
    ([33, 2], [64, 1], [0, 1]),                   # a prefix of several 16-slot blocks
])
def test_rows_after_a_shared_prefix_match_the_reference(lens, plens, group):
    # gradients of a prefix token sum over every row that reads it
    _kernel_or_skip()
    _check(lens, 4, 2, 64, plens, group)


def test_large_logits_stay_finite():
    # scores of ~1e3: the row max keeps exp2 in range, as SDPA's softmax does
    _kernel_or_skip()
    _check([20, 50], 4, 2, 64, [10, 4], [1, 0], scale=6.0, atol=2e-4)


def test_available_only_for_what_it_takes():
    _kernel_or_skip()
    assert va.available(64, torch.zeros(1))
    assert not va.available(24)  # head_dim not a multiple of 16
    assert not va.available(64, n_heads=130, n_kv=2)  # more query heads a KV head than it takes
    assert not va.available(64, torch.zeros(1, dtype=torch.bfloat16))
    q, k, v, cu, _, _ = _case([3], 4, 4, 24)
    with pytest.raises(ValueError, match="head_dim"):
        va.varlen_attention(q, k, v, cu, n_heads=4)


def _model(family: str):
    from cpmtool.model.config import ModelConfig
    from cpmtool.model.loader import load_model
    from cpmtool.model.transformer import Transformer

    if family == "cpm-tiny":
        return load_model("cpm-tiny")[0].train()
    config = ModelConfig(family=family, vocab_size=300, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, head_dim=32)
    torch.manual_seed(0)
    return Transformer(config).train()


@pytest.mark.parametrize("family", ["cpm-tiny", "qwen3", "qwen2"])  # MiniCPM; q/k norms; q/k/v biases
@pytest.mark.parametrize("shared", [True, False], ids=["shared-prompts", "plain-rows"])
def test_the_model_trains_the_same_through_either_path(family, shared, monkeypatch):
    # response log-probs and weight gradients: packed attention against SDPA on padded rows
    from cpmtool.model import transformer
    from cpmtool.train.sequences import response_logprobs

    _kernel_or_skip()
    m = _model(family)
    assert m.config.qk_norm == (family == "qwen3")
    g = torch.Generator().manual_seed(3)
    prompt = torch.randint(5, 300, (7,), generator=g).tolist()
    prompts = [prompt if shared else prompt[:-1] + [9 + j] for j in range(4)]
    responses = [torch.randint(5, 300, (n,), generator=g).tolist() for n in (5, 1, 12, 8)]

    def run():
        m.zero_grad(set_to_none=True)
        logp, _, _ = response_logprobs(m, prompts, responses)
        (logp * torch.linspace(0.5, 2, logp.numel()).view_as(logp)).sum().backward()
        return logp.detach(), [p.grad.clone() for p in m.parameters()]

    calls = []
    real = va.varlen_attention
    monkeypatch.setattr(va, "varlen_attention", lambda *a, **k: calls.append(1) or real(*a, **k))
    fast, fast_grads = run()
    assert calls  # the packed path ran
    monkeypatch.setattr(transformer, "_varlen_kernel", False)
    calls.clear()
    slow, slow_grads = run()
    assert not calls
    assert torch.allclose(fast, slow, atol=2e-5)
    for a, b in zip(fast_grads, slow_grads, strict=True):  # q/k's gradients pass the softmax's backward: 3e-5
        assert torch.allclose(a, b, rtol=1e-4, atol=1e-4 * float(b.abs().max()))


def test_source_builds_a_stub_without_avx2(stub_build):
    lib = stub_build(va._SRC)
    assert lib.varlen_attention_available() == 0
    assert lib.varlen_fwd(*[0] * 20) == 2
