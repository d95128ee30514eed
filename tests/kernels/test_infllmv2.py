"""InfLLM v2: the plain-torch reference against the spec, and the CPU production path against the reference."""

import math

import pytest
import torch
import torch.nn.functional as F
from cpmtool.kernels import cbuild
from cpmtool.kernels.infllmv2 import SparseConfig, cpu, reference
from cpmtool.kernels.infllmv2.config import num_compressed

from cpmtool.errors import ConfigError

# small settings that keep the MiniCPM4 ratios (kernel = 2 * stride, block = 4 * stride)
SMALL = dict(kernel_size=8, kernel_stride=4, init_blocks=1, block_size=16, window_size=32, topk=3, dense_len=-1)
TOL = {torch.float32: (2e-5, 1e-5), torch.bfloat16: (3e-2, 2e-2)}  # bf16: inputs rounded, math in fp32


def qkv(b, hkv, g, t, d, dtype=torch.float32, seed=0):
    gen = torch.Generator().manual_seed(seed)
    q = torch.randn(b, hkv * g, t, d, generator=gen).to(dtype)
    k = torch.randn(b, hkv, t, d, generator=gen).to(dtype)
    v = torch.randn(b, hkv, t, d, generator=gen).to(dtype)
    return q, k, v


def _fused_or_skip():
    lib = cpu._fused_kernels()
    if lib is None:
        pytest.skip(f"C kernels unavailable: {cbuild.build_error(cpu._FUSED_SRC)}")
    return lib


@pytest.fixture(params=["fused", "torch"])
def cpu_path(request, monkeypatch):
    """Run a CPU test through cpu_fused.c's kernels (built on first use) and through the torch path."""
    if request.param == "torch":
        monkeypatch.setattr(cpu, "_fused_kernels", lambda: None)
    else:
        _fused_or_skip()
    return request.param


def ref_batched(q, k, v, pos, cfg):
    # the fla-style chain of trust: a per-sequence loop over the reference
    return torch.stack([reference.infllmv2_attention(q[i], k[i], v[i], pos[i], cfg) for i in range(q.shape[0])])


def causal_dense(q, k, v):
    return F.scaled_dot_product_attention(q.float(), k.float(), v.float(), is_causal=True,
                                          enable_gqa=q.shape[1] != k.shape[1])


@pytest.mark.parametrize("length", [0, 7, 8, 9, 31, 32, 33, 100])
def test_compress_counts_full_windows_and_means_them(length):
    k = torch.randn(2, length, 4)
    n = num_compressed(length, 8, 4)
    assert n == (0 if length < 8 else (length - 8) // 4 + 1)
    ref = reference.compress(k, 8, 4)
    assert ref.shape == (2, n, 4)
    for j in range(n):
        torch.testing.assert_close(ref[:, j], k[:, 4 * j: 4 * j + 8].mean(1))
    torch.testing.assert_close(cpu.compress(k, 8, 4), ref, atol=1e-6, rtol=1e-6)


def _spec_stage1(q, c1, c2, s1=16, s2=64):
    # inference-kernels.md §1.4 (from infllmv2_cuda_impl's compressed-LSE reference), then the official
    # max_pool1d(kernel 5, stride 4, padding 1) of §1.5
    d, tq = q.shape[-1], q.shape[1]
    i = torch.arange(tq)[:, None]
    s_c2 = q @ c2.T / d**0.5
    s_c2 = s_c2.masked_fill(torch.arange(c2.shape[0])[None] >= ((i - s2 + 1) // s2).clamp(min=0), float("-inf"))
    lse2 = torch.logsumexp(s_c2, -1, keepdim=True)
    s_c1 = q @ c1.T / d**0.5
    s_c1 = s_c1.masked_fill(torch.arange(c1.shape[0])[None] >= ((i - s1 + 1) // s1).clamp(min=0), float("-inf"))
    p = torch.exp(s_c1 - lse2).nan_to_num(0.0).sum(0)
    return F.max_pool1d(p[None], kernel_size=5, stride=4, padding=1)[0]


def test_stage1_matches_the_official_formulation():
    cfg = SparseConfig(dense_len=-1)  # MiniCPM4's 32/16/64 defaults
    t, g, d = 700, 4, 8
    q, k = torch.randn(g, t, d), torch.randn(1, t, d)
    c1, c2 = reference.compress(k, 32, 16), reference.compress(k, 128, 64)
    ours = reference.block_scores(q, c1, c2, torch.arange(t), cfg)[0]  # (T, n_blocks)
    spec = _spec_stage1(q, c1[0], c2[0])
    nb = min(ours.shape[1], spec.shape[1])
    # queries before position 127 see no coarse key: the spec scores them inf (nan_to_num), ours 0
    torch.testing.assert_close(ours[127:, :nb], spec[127:, :nb], atol=1e-6, rtol=1e-5)
    assert (ours[:127] == 0).all()
    torch.testing.assert_close(cpu.block_scores(q[None], c1, c2, torch.arange(t)[None], cfg, ours.shape[1])[0],
                               ours, atol=1e-6, rtol=1e-5)


def test_selection_forces_sinks_and_window_and_never_picks_the_future():
    cfg = SparseConfig(**{**SMALL, "init_blocks": 2, "topk": 4})
    t = 300
    q, k, _ = qkv(1, 1, 2, t, 8)
    c1, c2 = reference.compress(k[0], 8, 4), reference.compress(k[0], 32, 16)
    pos = torch.arange(t)
    idx = reference.select_blocks(reference.block_scores(q[0], c1, c2, pos, cfg), pos, cfg)[0]  # (T, K)
    assert idx.shape == (t, cfg.topk_eff)
    for i in range(t):
        qb = i // cfg.block_size
        chosen = set(idx[i][idx[i] >= 0].tolist())
        assert len(chosen) == min(cfg.topk_eff, qb + 1)
        assert {b for b in range(cfg.init_blocks) if b <= qb} <= chosen
        assert set(range(max(0, qb - cfg.local_blocks), qb + 1)) <= chosen
        assert max(chosen) == qb
        assert idx[i].tolist() == sorted(idx[i].tolist())
    # the fast path selects the same blocks (ties go to the lower block in both)
    scores = cpu.block_scores(q.view(1, 2, t, 8), c1, c2, pos[None], cfg, math.ceil(t / 16))
    sel = cpu.select_blocks(scores, pos[None], cfg)[0]
    assert torch.equal(sel, idx)


def test_ties_go_to_the_lower_block():
    cfg = SparseConfig(**{**SMALL, "init_blocks": 0, "window_size": 0, "topk": 2})
    scores = torch.tensor([[[0.5, 0.7, 0.7, 0.7, 0.1, 0.0]]])
    pos = torch.tensor([5 * 16])  # block 5: the forced local block
    assert reference.select_blocks(scores, pos, cfg)[0, 0].tolist() == [1, 5]
    assert cpu.select_blocks(scores, pos[None], cfg)[0, 0].tolist() == [1, 5]


def test_selecting_every_block_is_dense_causal_attention():
    cfg = SparseConfig(**{**SMALL, "topk": 64})
    q, k, v = qkv(2, 2, 3, 150, 16)
    pos = torch.arange(150).expand(2, -1)
    dense = causal_dense(q, k, v)
    torch.testing.assert_close(ref_batched(q, k, v, pos, cfg), dense, atol=2e-5, rtol=1e-5)
    torch.testing.assert_close(cpu.infllmv2_cpu(q, k, v, pos, cfg), dense, atol=2e-5, rtol=1e-5)


def test_sparse_attention_really_drops_blocks():
    q, k, v = qkv(1, 2, 2, 300, 16)
    pos = torch.arange(300)[None]
    out = ref_batched(q, k, v, pos, SparseConfig(**SMALL))
    dense = causal_dense(q, k, v)
    # early queries select everything; late ones see 5 of up to 19 blocks
    torch.testing.assert_close(out[:, :, :80], dense[:, :, :80], atol=2e-5, rtol=1e-5)
    assert (out[:, :, 200:] - dense[:, :, 200:]).abs().max() > 1e-2


CASES = [  # (B, Hkv, G, T, D, settings)
    (1, 1, 1, 5, 16, SMALL),
    (2, 2, 3, 37, 16, SMALL),
    (1, 2, 4, 123, 8, SMALL),
    (2, 1, 2, 257, 32, {**SMALL, "init_blocks": 0}),
    (1, 2, 2, 333, 16, {**SMALL, "init_blocks": 2, "window_size": 0, "topk": 4}),
    (1, 1, 3, 200, 16, {**SMALL, "kernel_size": 12, "window_size": 48}),  # kernel = 3 * stride
]


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("b, hkv, g, t, d, settings", CASES, ids=lambda c: str(c) if not isinstance(c, dict) else "")
def test_cpu_prefill_matches_reference(b, hkv, g, t, d, settings, dtype, cpu_path):
    cfg = SparseConfig(**settings)
    q, k, v = qkv(b, hkv, g, t, d, dtype)
    pos = torch.arange(t).expand(b, -1)
    atol, rtol = TOL[dtype]
    out = cpu.infllmv2_cpu(q, k, v, pos, cfg)
    assert out.dtype == dtype
    torch.testing.assert_close(out.float(), ref_batched(q, k, v, pos, cfg).float(), atol=atol, rtol=rtol)


def test_cpu_decode_and_chunked_prefill_match_reference(cpu_path):
    cfg = SparseConfig(**SMALL)
    b, t, extra = 2, 301, 19  # keys in a longer buffer, as in a KV cache
    q, k, v = qkv(b, 2, 3, t, 16)
    kb = torch.cat([k, torch.randn(b, 2, extra, 16)], 2)
    vb = torch.cat([v, torch.randn(b, 2, extra, 16)], 2)
    full = ref_batched(q, k, v, torch.arange(t).expand(b, -1), cfg)
    valid = torch.zeros(b, t + extra, dtype=torch.bool)
    valid[:, :t] = True
    for start, stop in [(t - 1, t), (250, 251), (120, 301), (17, 18)]:  # decode steps and a prefill chunk
        pos = torch.arange(start, stop).expand(b, -1)
        out = cpu.infllmv2_cpu(q[:, :, start:stop], kb, vb, pos, cfg, key_valid=valid)
        torch.testing.assert_close(out, full[:, :, start:stop], atol=2e-5, rtol=1e-5, msg=f"queries {start}:{stop}")


def test_cpu_masks_unwritten_slots(cpu_path):
    cfg = SparseConfig(**SMALL)
    q, k, v = qkv(1, 1, 2, 300, 16)
    valid = torch.ones(1, 300, dtype=torch.bool)
    valid[0, 100:116] = False  # a hole, as left by a freed row
    pos = torch.tensor([[299]])
    out = cpu.infllmv2_cpu(q[:, :, -1:], k, v, pos, cfg, key_valid=valid)
    k2, v2 = k.clone(), v.clone()
    k2[0, :, 100:116] = 1e3  # values in the hole must not matter
    v2[0, :, 100:116] = 1e3
    torch.testing.assert_close(cpu.infllmv2_cpu(q[:, :, -1:], k2, v2, pos, cfg, key_valid=valid), out)


def test_cpu_gradients_match_reference():
    cfg = SparseConfig(**SMALL)
    q, k, v = (x.requires_grad_() for x in qkv(2, 2, 2, 150, 16))
    pos = torch.arange(150).expand(2, -1)
    do = torch.randn(2, 4, 150, 16)
    got = torch.autograd.grad(cpu.infllmv2_cpu(q, k, v, pos, cfg), (q, k, v), do)
    want = torch.autograd.grad(ref_batched(q, k, v, pos, cfg), (q, k, v), do)
    for name, a, b in zip(("dq", "dk", "dv"), got, want, strict=True):
        torch.testing.assert_close(a, b, atol=3e-5, rtol=1e-4, msg=name)


def test_cpu_survives_logits_far_above_the_window(cpu_path):
    # a far block whose logits exceed the local band's by > 88 overflows exp relative to the band's LSE:
    # the tile path must fall back to the exact merge
    cfg = SparseConfig(**SMALL)
    q, k, v = qkv(1, 1, 1, 200, 16)
    k[0, 0, 40:56] = q[0, 0, -1] * 40
    pos = torch.arange(200)[None]
    out = cpu.infllmv2_cpu(q, k, v, pos, cfg)
    assert torch.isfinite(out).all()
    torch.testing.assert_close(out, ref_batched(q, k, v, pos, cfg), atol=1e-4, rtol=1e-4)


def test_cpu_spans_several_prefill_chunks(cpu_path):
    cfg = SparseConfig(**SMALL)
    t = cpu.CHUNK + 77
    q, k, v = qkv(1, 1, 2, t, 8)
    pos = torch.arange(t)[None]
    torch.testing.assert_close(cpu.infllmv2_cpu(q, k, v, pos, cfg), ref_batched(q, k, v, pos, cfg),
                               atol=2e-5, rtol=1e-5)


def _avx2_fma() -> bool:
    try:
        flags = open("/proc/cpuinfo").read()
    except OSError:
        return False
    return " avx2" in flags and " fma" in flags


@pytest.mark.skipif(not _avx2_fma(), reason="cpu_fused.c needs AVX2 and FMA")
def test_fused_kernels_build_on_this_machine():
    # CI machines have a C compiler: a silent fallback to the torch path would hide a broken build
    assert cpu._fused_kernels() is not None, cbuild.build_error(cpu._FUSED_SRC)


def test_fused_source_builds_stubs_without_avx2(stub_build):
    # built for a CPU without AVX2/FMA (no -march=native) the library says so, and the Python side
    # then keeps the torch path
    lib = stub_build(cpu._FUSED_SRC)
    assert lib.infllmv2_available() == 0
    assert lib.infllmv2_pool_select(*[0] * 14) == 1


FAR = dict(kernel_size=32, kernel_stride=16, init_blocks=1, block_size=64, window_size=256, topk=8, dense_len=-1)


@pytest.mark.parametrize("g, d", [(8, 64), (3, 32), (1, 16)])  # 6-row micro-tiles with remainders of 2, 3 and 1
def test_fused_far_blocks_match_the_torch_tiles_and_the_exact_merge(g, d):
    lib = _fused_or_skip()
    cfg = SparseConfig(**FAR)
    n, t, c = 2, 1500, 400  # the last 400 queries of 1500 keys: every query has far blocks
    gen = torch.Generator().manual_seed(1)
    q = torch.randn(n, g, c, d, generator=gen)
    k, v = torch.randn(n, t, d, generator=gen), torch.randn(n, t, d, generator=gen)
    pos = torch.arange(t - c, t).expand(n, -1)
    nb = -(-t // cfg.block_size)
    idx = cpu.select_blocks(cpu.block_scores(q, cpu.compress(k, 32, 16), cpu.compress(k, 128, 64), pos, cfg, nb),
                            pos, cfg)
    o_band, lse_band = cpu._band(q, k, v, pos, cfg, None, False)
    fused = cpu._remote_fused(lib, q, k, v, pos, idx, cfg, nb, o_band, lse_band)
    assert fused is not None
    exact = cpu._remote(q, k, v, pos, idx, cfg, None, True, o_band, lse_band)
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(cpu, "_fused_kernels", lambda: None)
        tiles = cpu._remote(q, k, v, pos, idx, cfg, None, False, o_band, lse_band)
    torch.testing.assert_close(fused, exact, atol=2e-6, rtol=1e-5)
    torch.testing.assert_close(fused, tiles, atol=2e-6, rtol=1e-5)
    assert not torch.equal(fused, o_band.float())  # the far blocks did contribute


@pytest.mark.parametrize("transposed", [False, True])
@pytest.mark.parametrize("g, t0, t", [(8, 0, 300), (3, 1000, 1077), (1, 5000, 5003)])
def test_fused_stage1_scores_match_the_torch_scores(g, t0, t, transposed):
    lib = _fused_or_skip()
    cfg = SparseConfig(**FAR)
    gen = torch.Generator().manual_seed(2)
    q = torch.randn(2, g, t - t0, 64, generator=gen)
    k = torch.randn(2, t, 64, generator=gen)
    pos = torch.arange(t0, t).expand(2, -1)  # from 0: queries that see no coarse key yet (score 0)
    c1, c2 = cpu.compress(k, 32, 16), cpu.compress(k, 128, 64)
    if transposed:  # padded to 16 columns, as infllmv2_cpu passes them
        c1, c2 = cpu._transpose_padded(c1), cpu._transpose_padded(c2)
    nb = -(-t // 64)
    fused = cpu._scores_fused(lib, q, c1, c2, pos, cfg, transposed)
    assert fused is not None
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(cpu, "_fused_kernels", lambda: None)
        want = cpu.block_scores(q, c1, c2, pos, cfg, nb, transposed=transposed)
    torch.testing.assert_close(cpu.pool_blocks(fused, cfg, nb), want, atol=1e-6, rtol=2e-5)
    assert torch.equal(cpu.select_blocks(cpu.pool_blocks(fused, cfg, nb), pos, cfg), cpu.select_blocks(want, pos, cfg))


@pytest.mark.parametrize("settings", [FAR, {**FAR, "init_blocks": 0}, {**FAR, "init_blocks": 2, "window_size": 0},
                                      {**FAR, "kernel_size": 48}])
def test_fused_pooling_and_top_k_match_select_blocks(settings):
    lib = _fused_or_skip()
    cfg = SparseConfig(**settings)
    gen = torch.Generator().manual_seed(3)
    t, n_blocks = 900, 40  # positions 0..2599: before the window fills, fewer past blocks than top-k, ...
    pos = torch.randint(0, n_blocks * 64, (2, t), generator=gen)
    n1 = num_compressed(n_blocks * 64, cfg.kernel_size, cfg.kernel_stride)
    p = (torch.rand(2, t, n1, generator=gen) * 8).floor() / 8  # coarse values: many ties
    got = cpu._pool_select_fused(lib, p, pos, cfg, n_blocks)
    want = cpu.select_blocks(cpu.pool_blocks(p, cfg, n_blocks), pos, cfg)
    assert torch.equal(got, want)


@pytest.mark.parametrize("bad, msg", [
    ({"topk": 0}, "topk=0"),
    ({"block_size": 50}, "multiple of kernel_stride"),
    ({"window_size": 100}, "multiple of block_size"),
    ({"init_blocks": 64}, "init_blocks=64"),
    ({"blocksize": 64}, "unknown sparse_config keys"),
])
def test_config_validation_names_the_problem(bad, msg):
    with pytest.raises(ConfigError, match=msg):
        SparseConfig.from_dict(bad)
