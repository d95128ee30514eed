"""kernels/decode_attention: the C decode step against SDPA with the slot mask (its torch path)."""

from __future__ import annotations

import cpmtool.kernels.decode_attention as da
import pytest
import torch
import torch.nn.functional as F
from cpmtool.kernels import cbuild

from cpmtool.model.transformer import slot_mask


def _kernel_or_skip():
    lib = da._kernel()
    if lib is None:
        pytest.skip(f"decode kernel unavailable: {cbuild.build_error(da._SRC) or 'no AVX2/FMA'}")
    return lib


def _case(b, h, hkv, s, d, spare=13, p_valid=0.8, seed=0):
    """q (B, H, 1, D) as the model makes it (a transposed view), k/v views of longer cache buffers,
    positions anywhere in the cache, a fifth of the slots invalid (the query's own slot valid)."""
    g = torch.Generator().manual_seed(seed)
    kb, vb = torch.randn(b, hkv, s + spare, d, generator=g), torch.randn(b, hkv, s + spare, d, generator=g)
    q = torch.randn(b, 1, h, d, generator=g).transpose(1, 2)
    pos = torch.randint(0, s, (b, 1), generator=g)
    valid = torch.rand(b, s + spare, generator=g) < p_valid
    valid[torch.arange(b), pos[:, 0]] = True
    return q, kb[:, :, :s], vb[:, :, :s], pos, valid[:, :s]


def _sdpa(q, k, v, pos, valid):
    return F.scaled_dot_product_attention(q, k, v, attn_mask=slot_mask(k.shape[2], pos, valid),
                                          enable_gqa=q.shape[1] != k.shape[1])


@pytest.mark.parametrize("b, h, hkv, s, d", [
    (64, 4, 2, 85, 64),     # cpm-tiny in a GRPO rollout
    (32, 9, 3, 170, 64),    # smollm2-135m
    (3, 8, 8, 300, 128),    # no grouping, D = 128, several 64-slot blocks
    (5, 6, 1, 70, 64),      # one kv head for all
    (2, 32, 2, 1000, 64),   # G = 16, the largest group the kernel takes
    (4, 2, 2, 7, 8),        # fewer slots than one SIMD vector
])
def test_matches_sdpa_with_the_slot_mask(b, h, hkv, s, d):
    _kernel_or_skip()
    q, k, v, pos, valid = _case(b, h, hkv, s, d)
    got = da.decode_attention(q, k, v, pos, valid)
    assert got is not None and got.shape == (b, h, 1, d)
    assert torch.allclose(got, _sdpa(q, k, v, pos, valid), atol=2e-6, rtol=1e-5)


def test_a_block_of_only_invalid_slots_and_large_logits():
    # slots 0-127 invalid (two whole blocks before the first visible one), then logits of ~1e3 that
    # would overflow a plain exp: the online max keeps them finite
    _kernel_or_skip()
    q, k, v, pos, valid = _case(3, 4, 2, 300, 64, seed=2)
    valid[:, :128] = False
    pos[:] = 299
    q = q * 40
    got = da.decode_attention(q, k, v, pos, valid)
    want = _sdpa(q, k, v, pos, valid)
    assert torch.isfinite(got).all() and torch.allclose(got, want, atol=2e-5, rtol=1e-4)


def test_declines_what_it_does_not_take():
    _kernel_or_skip()
    q, k, v, pos, valid = _case(2, 4, 2, 20, 64)
    assert da.decode_attention(q.to(torch.bfloat16), k.bfloat16(), v.bfloat16(), pos, valid) is None
    assert da.decode_attention(q.expand(-1, -1, 2, -1), k, v, pos.expand(-1, 2), valid) is None  # 2 queries
    assert da.decode_attention(q.clone().requires_grad_(), k, v, pos, valid) is None  # autograd: SDPA
    q5, k5, v5, pos5, valid5 = _case(2, 5, 1, 20, 12)  # D not a multiple of 8: the C side says no
    assert da.decode_attention(q5, k5, v5, pos5, valid5) is None


def test_the_model_decodes_the_same_through_either_path(monkeypatch):
    # a cached decode step of the real cpm-tiny: the C kernel against SDPA (the kernel switched off)
    from cpmtool.model.loader import load_model

    _kernel_or_skip()
    m, _ = load_model("cpm-tiny")
    ids = torch.randint(5, 300, (4, 9), generator=torch.Generator().manual_seed(0))

    def decode():
        cache = m.new_cache(4, 16)
        with torch.no_grad():
            m.hidden_states(ids, None, cache)
            return torch.stack([m.logits(m.hidden_states(ids[:, i:i + 1], torch.full((4, 1), 9 + i), cache)[:, -1])
                                for i in range(5)])

    fast = decode()
    monkeypatch.setattr(da, "_lib", [None])
    assert torch.allclose(fast, decode(), atol=1e-4, rtol=1e-5)


def test_source_builds_a_stub_without_avx2(stub_build):
    lib = stub_build(da._SRC)
    assert lib.decode_attention_available() == 0
    assert lib.decode_attention(*[0] * 21) == 1
