"""InfLLM v2 Triton kernels against the reference: in Triton's interpreter on CPU (small shapes, odd
lengths), compiled on a GPU when there is one (the same cases, plus full-size ones)."""

import pytest
import torch
from cpmtool.kernels.infllmv2 import SparseConfig, cpu, reference

pytest.importorskip("triton")
from cpmtool.kernels.infllmv2 import triton as tri  # noqa: E402  (after the interpreter switch in conftest)

DEV = "cuda" if torch.cuda.is_available() else "cpu"
requires_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
SMALL = dict(kernel_size=8, kernel_stride=4, init_blocks=1, block_size=16, window_size=16, topk=2, dense_len=-1)


def rms_ratio(ref, got):  # fla's metric for low-precision parity
    return ((ref.float() - got.float()).pow(2).mean().sqrt() / ref.float().pow(2).mean().sqrt()).item()


def inputs(b, hkv, g, t, d, dtype=torch.float32, seed=0, grad=False):
    gen = torch.Generator().manual_seed(seed)
    xs = [torch.randn(b, hkv * g, t, d, generator=gen), torch.randn(b, hkv, t, d, generator=gen),
          torch.randn(b, hkv, t, d, generator=gen)]
    return [x.to(DEV, dtype).requires_grad_(grad) for x in xs]


def ref_batched(q, k, v, pos, cfg):
    return torch.stack([reference.infllmv2_attention(q[i], k[i], v[i], pos[i], cfg) for i in range(q.shape[0])])


@pytest.mark.parametrize("hkv, g, t, d", [(2, 3, 45, 16), (1, 1, 19, 32)])
def test_stage1_scores_match_reference(hkv, g, t, d):
    cfg = SparseConfig(**SMALL)
    q, k, _ = inputs(1, hkv, g, t, d)
    pos = torch.arange(t, device=DEV)
    c1, c2 = reference.compress(k[0], 8, 4), reference.compress(k[0], 32, 16)
    got = tri.stage1_scores(q.view(hkv, g, t, d), c1, c2, pos.expand(hkv, t), cfg)  # (Hkv, T, N1)
    want = reference.block_scores(q[0], c1, c2, pos, cfg)
    torch.testing.assert_close(cpu.pool_blocks(got, cfg, want.shape[-1]), want, atol=1e-5, rtol=1e-5)


def test_forward_and_backward_match_reference():
    cfg = SparseConfig(**SMALL)
    q, k, v = inputs(1, 1, 2, 53, 16, grad=True)  # 4 blocks, the last one partial; top-k drops some
    pos = torch.arange(53, device=DEV)[None]
    out = tri.infllmv2_triton(q, k, v, pos, cfg)
    want = ref_batched(q, k, v, pos, cfg)
    torch.testing.assert_close(out, want, atol=1e-5, rtol=1e-5)
    dense = torch.nn.functional.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=True)
    assert (want - dense).abs().max() > 1e-2  # the case is really sparse
    do = torch.randn_like(out)
    got = torch.autograd.grad(out, (q, k, v), do)
    ref = torch.autograd.grad(want, (q, k, v), do)
    for name, a, b in zip(("dq", "dk", "dv"), got, ref, strict=True):
        torch.testing.assert_close(a, b, atol=2e-5, rtol=1e-4, msg=name)


def test_tile_plan_unions_each_tiles_blocks_and_transposes_them():
    idx = torch.tensor([[[-1, 0, 2], [0, 1, 2], [-1, -1, 3]]], device=DEV)  # (N=1, T=3, K=3), tiles of 2 tokens
    plan = tri.tile_plan(idx, n_key_blocks=5, bq=2)
    assert plan.union.tolist() == [[[0, 1, 2], [3, -1, -1]]]
    assert plan.count.tolist() == [[3, 1]]
    assert plan.member.tolist() == [[[1, 0, 1], [1, 1, 1], [1, 0, 0]]]  # token 0 skipped block 1, token 2 has 3
    # per key block, the (tile, slot) pairs that hold it; block 4 is nobody's
    assert plan.offsets.tolist() == [0, 1, 2, 3, 4, 4]
    assert plan.pair_tile.tolist() == [0, 0, 0, 1] and plan.pair_slot.tolist() == [0, 1, 2, 0]


@pytest.mark.parametrize("hkv, g, t", [(1, 2, 200), (2, 16, 45)])
def test_many_tiles_forward_and_backward_match_reference(hkv, g, t):
    # 4 tiles of 64 tokens (G=2), 6 of 8 (G=16); the last tile is partial in both
    cfg = SparseConfig(**SMALL)
    q, k, v = inputs(1, hkv, g, t, 16, seed=3, grad=True)
    pos = torch.arange(t, device=DEV)[None]
    st = tri.calculate_settings(g, 16, cfg.block_size, t)
    assert -(-t // st["BQ"]) > 1
    out = tri.infllmv2_triton(q, k, v, pos, cfg)
    want = ref_batched(q, k, v, pos, cfg)
    torch.testing.assert_close(out, want, atol=1e-5, rtol=1e-5)
    do = torch.randn_like(out)
    got = torch.autograd.grad(out, (q, k, v), do)
    ref = torch.autograd.grad(want, (q, k, v), do)
    for name, a, b in zip(("dq", "dk", "dv"), got, ref, strict=True):
        torch.testing.assert_close(a, b, atol=2e-5, rtol=1e-4, msg=name)


def test_decode_rows_at_different_positions():
    cfg = SparseConfig(**SMALL)
    q, k, v = inputs(2, 2, 2, 61, 16)
    pos = torch.tensor([[60], [37]], device=DEV)
    qd = torch.stack([q[0, :, 60:61], q[1, :, 37:38]])
    out = tri.infllmv2_triton(qd, k, v, pos, cfg)
    want = torch.stack([reference.infllmv2_attention(qd[i], k[i], v[i], pos[i], cfg) for i in range(2)])
    torch.testing.assert_close(out, want, atol=1e-5, rtol=1e-5)


def test_settings_name_the_limit():
    with pytest.raises(RuntimeError, match="block_size"):
        tri.calculate_settings(2, 64, 24)
    with pytest.raises(RuntimeError, match="head_dim <= 256"):
        tri.calculate_settings(2, 512, 64)


@requires_cuda
@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_full_size_on_gpu(dtype):
    # MiniCPM4-8B's heads (2 KV, 32 query) and default settings, forced sparse at 4k tokens
    cfg = SparseConfig(dense_len=-1)
    q, k, v = inputs(1, 2, 16, 4096, 128, dtype=dtype, grad=True)
    pos = torch.arange(4096, device=DEV)[None]
    out = tri.infllmv2_triton(q, k, v, pos, cfg)
    want = ref_batched(q.float(), k.float(), v.float(), pos, cfg)
    assert rms_ratio(want, out) < (1e-5 if dtype == torch.float32 else 1e-2)
    do = torch.randn_like(out)
    got = torch.autograd.grad(out, (q, k, v), do)
    ref = torch.autograd.grad(want, (q, k, v), do.float())
    for name, a, b in zip(("dq", "dk", "dv"), got, ref, strict=True):
        assert rms_ratio(b, a) < (1e-4 if dtype == torch.float32 else 2e-2), name
