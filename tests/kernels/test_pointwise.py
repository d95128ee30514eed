"""kernels/pointwise: each C kernel against the torch ops it replaces, and the model's C decode
step (Transformer._decode_step) against its torch path."""

from __future__ import annotations

import ctypes

import cpmtool.kernels.pointwise as ks
import pytest
import torch
import torch.nn.functional as F
from cpmtool.kernels import cbuild

from cpmtool.model import transformer as tr


def _kernel_or_skip():
    lib = ks.kernel()
    if lib is None:
        pytest.skip(f"pointwise kernels unavailable: {cbuild.build_error(ks._SRC) or 'no AVX2/FMA'}")
    return lib


def _gen(seed=0):
    return torch.Generator().manual_seed(seed)


@pytest.mark.parametrize("n, rs", [(256, 1.0), (576, 1.4 / 4**0.5), (13, 1.0), (8, 0.5)])
def test_add_rmsnorm_matches_the_residual_add_and_rmsnorm(n, rs):
    _kernel_or_skip()
    g = _gen()
    base = torch.randn(7, n + 5, generator=g) * 3  # x as a view with a row stride > n
    x, a = base[:, :n], torch.randn(7, n, generator=g)
    norm = tr.RMSNorm(n, 1e-5)
    norm.weight.data = torch.rand(n, generator=g) + 0.5
    want_x = x + (a if rs == 1.0 else a * rs)
    with torch.no_grad():
        want_h = norm(want_x)
    spare = base[:, n:].clone()
    got_h = ks.add_rmsnorm(x, a, rs, norm.weight, norm.eps)
    assert torch.equal(x, want_x)  # the add is elementwise: bit for bit, in place in the view
    assert torch.equal(base[:, n:], spare)  # nothing written past a row's n features
    assert torch.allclose(got_h, want_h, atol=1e-6, rtol=1e-5)
    # without a residual: the norm alone, x untouched
    before = x.clone()
    assert torch.allclose(ks.add_rmsnorm(x, None, rs, norm.weight, norm.eps), want_h, atol=1e-6, rtol=1e-5)
    assert torch.equal(x, before)


def test_add_rmsnorm_by_hand():
    # x = [3, 4] (after adding a = [1, 2] to [2, 2]): mean(x^2) = 12.5, x / sqrt(12.5) = [0.8485, 1.1314]
    _kernel_or_skip()
    x = torch.tensor([[2.0, 2.0]])
    h = ks.add_rmsnorm(x, torch.tensor([[1.0, 2.0]]), 1.0, torch.tensor([1.0, 2.0]), 0.0)
    assert torch.equal(x, torch.tensor([[3.0, 4.0]]))
    assert torch.allclose(h, torch.tensor([[3 / 12.5**0.5, 2 * 4 / 12.5**0.5]]), atol=1e-7)


@pytest.mark.parametrize("b, h, hkv, d", [(64, 4, 2, 64), (5, 9, 3, 64), (3, 2, 2, 128), (4, 2, 1, 6)])
def test_rope_write_matches_rotate_and_the_cache_write(b, h, hkv, d):
    _kernel_or_skip()
    g = _gen(1)
    s = 40
    q, k, v = (torch.randn(b, n * d, generator=g) for n in (h, hkv, hkv))
    pos = torch.randint(0, s, (b, 1), generator=g)
    inv_freq = 1.0 / (10000 ** (torch.arange(0, d, 2).float() / d))
    cos, sin = tr.rope_tables(inv_freq, pos, torch.float32)  # (B, 1, 1, D)
    ck, cv = torch.randn(b, hkv, s, d, generator=g), torch.randn(b, hkv, s, d, generator=g)
    want_k, want_v = ck.clone(), cv.clone()
    want_q = tr.rotate(q.view(b, 1, h, d).transpose(1, 2), cos, sin)  # (B, H, 1, D)
    kr = tr.rotate(k.view(b, 1, hkv, d).transpose(1, 2), cos, sin)  # (B, Hkv, 1, D)
    idx = pos[:, None, :, None].expand(-1, hkv, -1, d)
    want_k.scatter_(2, idx, kr)
    want_v.scatter_(2, idx, v.view(b, 1, hkv, d).transpose(1, 2))
    got_q = ks.rope_write(q, k, v, cos, sin, ck, cv, pos, h)
    # two products and one add per element, in the torch order: bit for bit
    assert got_q.shape == (b, h, 1, d) and torch.equal(got_q, want_q)
    assert torch.equal(ck, want_k) and torch.equal(cv, want_v)


def test_rope_write_by_hand_and_rejects_a_slot_outside_the_cache():
    # D = 4, position 1, inv_freq [1, 0.5]: angles [1, 0.5, 1, 0.5]; rotate-half of x = [1, 2, 3, 4]
    _kernel_or_skip()
    pos = torch.tensor([[1]])
    cos, sin = tr.rope_tables(torch.tensor([1.0, 0.5]), pos, torch.float32)
    x = torch.tensor([[1.0, 2.0, 3.0, 4.0]])
    c1, s1, c5, s5 = (torch.tensor(t) for t in (1.0, 1.0, 0.5, 0.5))
    c1, s1, c5, s5 = c1.cos(), s1.sin(), c5.cos(), s5.sin()
    want = torch.stack([1 * c1 - 3 * s1, 2 * c5 - 4 * s5, 3 * c1 + 1 * s1, 4 * c5 + 2 * s5])
    ck, cv = torch.zeros(1, 1, 3, 4), torch.zeros(1, 1, 3, 4)
    q = ks.rope_write(x, x, x * 10, cos, sin, ck, cv, pos, 1)
    assert torch.allclose(q.flatten(), want, atol=1e-6)
    assert torch.allclose(ck[0, 0, 1], want, atol=1e-6) and torch.equal(cv[0, 0, 1], x[0] * 10)
    assert ck[0, 0, 0].abs().sum() == 0 and ck[0, 0, 2].abs().sum() == 0  # only slot 1 written
    with pytest.raises(ValueError, match="outside the cache"):
        ks.rope_write(x, x, x, cos, sin, ck, cv, torch.tensor([[3]]), 1)


@pytest.mark.parametrize("i", [768, 1536, 13])
def test_silu_mul_matches_torch(i):
    _kernel_or_skip()
    g = _gen(2)
    gate = torch.cat([torch.randn(5, i, generator=g) * 4, torch.full((1, i), -200.0), torch.full((1, i), 90.0)])
    up = torch.randn(7, i, generator=g)
    got = ks.silu_mul(gate, up)
    assert torch.isfinite(got).all()
    assert torch.allclose(got, F.silu(gate) * up, atol=1e-6, rtol=2e-6)


def test_wrong_operands_get_a_clear_error():
    _kernel_or_skip()
    with pytest.raises(ValueError, match="fp32 CPU rows"):
        ks.silu_mul(torch.ones(2, 8, dtype=torch.bfloat16), torch.ones(2, 8, dtype=torch.bfloat16))
    with pytest.raises(ValueError, match="fp32 CPU rows"):
        ks.add_rmsnorm(torch.ones(4, 2).t(), None, 1.0, torch.ones(4), 1e-5)


def _random_qwen2():
    # a random 3-layer Qwen2 (q/k/v biases, 6 heads on 2 kv heads, no muP scales): the other family
    import transformers

    from cpmtool.model.config import ModelConfig

    torch.manual_seed(0)
    hc = transformers.Qwen2Config(vocab_size=320, hidden_size=96, intermediate_size=160, num_hidden_layers=3,
                                  num_attention_heads=6, num_key_value_heads=2, max_position_embeddings=64)
    m = tr.Transformer(ModelConfig.from_hf(hc.to_dict())).eval()
    with torch.no_grad():
        for prm in m.parameters():
            prm.normal_(0, 0.2)
    return m


@pytest.mark.parametrize("model", ["cpm-tiny", "qwen2"])
def test_the_model_decodes_the_same_through_the_c_step(model, monkeypatch):
    # prefill then six cached decode steps (rows at different positions), greedy-fed: the C step's
    # hidden states and cache against the torch path (the C step switched off)
    _kernel_or_skip()
    from cpmtool.model.loader import load_model

    m = load_model(model)[0] if model == "cpm-tiny" else _random_qwen2()
    layer = m.model.layers[0].self_attn
    assert (m.config.residual_scale != 1.0) if model == "cpm-tiny" else (layer.q_proj.bias is not None)
    b, p = 5, 7
    ids = torch.randint(5, 300, (b, p), generator=_gen(3))
    pos0 = torch.tensor([[p], [p], [p - 2], [p], [p - 4]])  # rows 2 and 4 overwrite their last prompt slots

    def decode():
        cache = m.new_cache(b, 24)
        outs = []
        with torch.no_grad():
            m.hidden_states(ids, None, cache)
            nxt = ids[:, -1:]
            for s in range(6):
                h = m.hidden_states(nxt, pos0 + s, cache)  # (B, 1, hidden)
                outs.append(h)
                nxt = m.lm_head(h[:, -1]).argmax(-1, keepdim=True)
        return torch.cat(outs, 1), cache

    calls = []
    monkeypatch.setattr(tr.Transformer, "_decode_step", lambda self, *a, _f=tr.Transformer._decode_step:
                        calls.append(1) or _f(self, *a))
    fast, cf = decode()
    assert len(calls) == 6  # every decode step took the C path
    monkeypatch.setattr(tr, "_pointwise", False)
    slow, cs = decode()
    assert len(calls) == 6
    scale = slow.abs().max()
    assert torch.allclose(fast, slow, atol=2e-6 * scale, rtol=1e-5)
    assert cf.used == cs.used and torch.equal(cf.valid, cs.valid)
    for a, c in zip(cf.k + cf.v, cs.k + cs.v, strict=True):
        assert torch.allclose(a, c, atol=2e-6 * scale, rtol=1e-5)


# ---------------------------------------------------------------- training Functions


def _torch_norm(x, w, eps):
    # RMSNorm's torch path (transformer.RMSNorm with the C kernels off)
    return w * (x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + eps))


@pytest.mark.parametrize("shape", [(3032, 256), (4, 9, 96), (5, 13)])
def test_rms_norm_function_matches_autograd_of_the_torch_path(shape):
    _kernel_or_skip()
    g = _gen(5)
    x0, w0 = torch.randn(*shape, generator=g) * 2, torch.rand(shape[-1], generator=g) + 0.5
    gy = torch.randn(*shape, generator=g)
    x, w = x0.clone().requires_grad_(), w0.clone().requires_grad_()
    y = ks.rms_norm(x, w, 1e-5)
    y.backward(gy)
    xr, wr = x0.clone().requires_grad_(), w0.clone().requires_grad_()
    yr = _torch_norm(xr, wr, 1e-5)
    yr.backward(gy)
    assert torch.allclose(y, yr, atol=1e-6, rtol=1e-5)
    assert torch.allclose(x.grad, xr.grad, atol=1e-5, rtol=1e-4)
    assert torch.allclose(w.grad, wr.grad, atol=1e-4 * shape[0] ** 0.5, rtol=1e-4)


def test_rms_norm_gradient_by_hand():
    # x = [3, 4], w = [1, 2], eps = 0, gy = [1, 0]: r = 1/sqrt(12.5), g = gy * w = [1, 0],
    # mean(g * x) = 1.5, dx = r * g - x * r^3 * 1.5 = [0.64 r, -0.48 r], dw = gy * x * r = [3 r, 0]
    _kernel_or_skip()
    x = torch.tensor([[3.0, 4.0]], requires_grad=True)
    w = torch.tensor([1.0, 2.0], requires_grad=True)
    y = ks.rms_norm(x, w, 0.0)
    y.backward(torch.tensor([[1.0, 0.0]]))
    r = 12.5**-0.5
    assert torch.allclose(y, torch.tensor([[3 * r, 8 * r]]), atol=1e-7)
    assert torch.allclose(x.grad, torch.tensor([[0.64 * r, -0.48 * r]]), atol=1e-7)
    assert torch.allclose(w.grad, torch.tensor([3 * r, 0.0]), atol=1e-7)


def test_rms_norm_backward_on_two_threads_matches_one():
    # the threaded backward: dx row by row exactly; dw from two float64 partial sums, to rounding
    _kernel_or_skip()
    g = _gen(8)
    x0, w0 = torch.randn(3032, 256, generator=g), torch.rand(256, generator=g) + 0.5
    gy = torch.randn(3032, 256, generator=g)
    threads = torch.get_num_threads()
    got = []
    try:
        for n in (1, 2):
            torch.set_num_threads(n)
            x, w = x0.clone().requires_grad_(), w0.clone().requires_grad_()
            ks.rms_norm(x, w, 1e-5).backward(gy)
            got.append((x.grad, w.grad))
    finally:
        torch.set_num_threads(threads)
    assert torch.equal(got[0][0], got[1][0])
    assert torch.allclose(got[0][1], got[1][1], rtol=1e-6, atol=0)


@pytest.mark.parametrize("shape", [(3032, 768), (2, 3, 40), (5, 13)])
def test_swiglu_function_matches_autograd_of_the_torch_path(shape):
    # (3032, 768): a GRPO update's MLP, split over the threads; (5, 13): short of a vector
    _kernel_or_skip()
    g = _gen(9)
    g0, u0, dh = (torch.randn(*shape, generator=g) * 3 for _ in range(3))
    gate, up = g0.clone().requires_grad_(), u0.clone().requires_grad_()
    h = ks.swiglu(gate, up)
    h.backward(dh)
    gr, ur = g0.clone().requires_grad_(), u0.clone().requires_grad_()
    hr = F.silu(gr) * ur
    hr.backward(dh)
    assert torch.allclose(h, hr, atol=1e-5, rtol=1e-5)
    assert torch.allclose(gate.grad, gr.grad, atol=1e-5, rtol=1e-5)
    assert torch.allclose(up.grad, ur.grad, atol=1e-5, rtol=1e-5)


def test_swiglu_by_hand():
    # g = [0, 1], u = [2, 3], dh = [1, 1]; sig(0) = 1/2, sig(1) = s = 0.7310586:
    # h = [0, 3 s]; du = silu(g) = [0, s]; dg = u * sig * (1 + g (1 - sig)) = [2 * 1/2, 3 s (2 - s)]
    _kernel_or_skip()
    s = 1 / (1 + 2.718281828459045**-1)
    gate = torch.tensor([0.0, 1.0], requires_grad=True)
    up = torch.tensor([2.0, 3.0], requires_grad=True)
    h = ks.swiglu(gate, up)
    h.backward(torch.ones(2))
    assert torch.allclose(h, torch.tensor([0.0, 3 * s]), atol=1e-6)
    assert torch.allclose(up.grad, torch.tensor([0.0, s]), atol=1e-6)
    assert torch.allclose(gate.grad, torch.tensor([1.0, 3 * s * (2 - s)]), atol=1e-6)


@pytest.mark.parametrize("b, t, h, d", [(64, 63, 4, 64), (3, 5, 9, 64), (2, 4, 2, 6)])
def test_rope_function_matches_rotate_and_its_gradient(b, t, h, d):
    _kernel_or_skip()
    g = _gen(6)
    x0 = torch.randn(b, t, h, d, generator=g)
    pos = torch.randint(0, 100, (b, t), generator=g)
    cos, sin = tr.rope_tables(1.0 / (10000 ** (torch.arange(0, d, 2).float() / d)), pos, torch.float32)
    gy = torch.randn(b, t, h, d, generator=g)
    x = x0.clone().requires_grad_()
    y = ks.rope(x, cos, sin)
    y.backward(gy)
    xr = x0.clone().requires_grad_()
    yr = tr.rotate(xr.transpose(1, 2), cos, sin).transpose(1, 2)  # the torch path: heads-major
    yr.backward(gy)
    # the same products and adds in the same order, forward and transposed: bit for bit
    assert torch.equal(y, yr) and torch.equal(x.grad, xr.grad)


def test_a_training_step_of_the_model_matches_the_torch_path(monkeypatch):
    # cpm-tiny forward + backward on padded rows (packing) with the C norm, rotary and SwiGLU, and without
    _kernel_or_skip()
    from cpmtool.model.loader import load_model

    m, _ = load_model("cpm-tiny")
    ids = torch.randint(5, 300, (3, 11), generator=_gen(7))
    lens = [11, 7, 9]

    def grads():
        m.zero_grad(set_to_none=True)
        logits = m(ids, lengths=lens)
        (logits.float().logsumexp(-1) * (torch.arange(11)[None] < torch.tensor(lens)[:, None])).sum().backward()
        return logits.detach(), {n: p.grad.clone() for n, p in m.named_parameters()}

    calls = []
    monkeypatch.setattr(ks, "rms_norm", lambda *a, _f=ks.rms_norm: calls.append("norm") or _f(*a))
    monkeypatch.setattr(ks, "swiglu", lambda *a, _f=ks.swiglu: calls.append("swiglu") or _f(*a))
    fast, gf = grads()
    assert set(calls) == {"norm", "swiglu"}  # the C norm and SwiGLU ran
    monkeypatch.setattr(tr, "_pointwise", False)
    slow, gs = grads()
    assert torch.allclose(fast, slow, atol=1e-5, rtol=1e-5)
    for name, g in gs.items():
        assert torch.allclose(gf[name], g, atol=1e-5 * g.abs().max().item() + 1e-7, rtol=1e-4), name


def test_autograd_and_bf16_keep_the_torch_path():
    _kernel_or_skip()
    from cpmtool.model.loader import load_model

    m, _ = load_model("cpm-tiny")
    ids = torch.randint(5, 300, (2, 1), generator=_gen(4))
    assert m._c_decode(ids, m.new_cache(2, 8)) is False  # grad enabled (training): autograd needs torch ops
    with torch.no_grad():
        assert m._c_decode(ids, m.new_cache(2, 8)) is True
        assert m._c_decode(ids, m.new_cache(2, 8, dtype=torch.bfloat16)) is False


def test_source_builds_a_stub_without_avx2(stub_build):
    lib = stub_build(ks._SRC)
    assert lib.pointwise_available() == 0
    lib.rope_write.argtypes = [ctypes.c_void_p] * 20
    assert lib.rope_write(*[0] * 20) == 1
