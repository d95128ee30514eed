"""InfLLM v2 inside the model: the config switch, dense below dense_len, the KV cache's compressed keys
(incremental, carried by select_rows, rebuilt after a reset), use_nope, training through the sparse
op, and a 16k-token retrieval check on which sparse and dense attention must agree."""

import math

import pytest
import torch
import torch.nn.functional as F
from cpmtool.kernels.infllmv2 import SparseConfig, cpu, reference
from cpmtool.kernels.infllmv2.attention import _unrotate, infllmv2_attention
from cpmtool.kernels.infllmv2.config import num_compressed

from cpmtool.model.config import ModelConfig
from cpmtool.model.transformer import ATTENTION, Transformer

requires_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
ON_GPU = pytest.param("cuda", marks=[requires_cuda, pytest.mark.gpu])
SMALL = dict(kernel_size=8, kernel_stride=4, init_blocks=1, block_size=16, window_size=32, topk=3, dense_len=-1)


@pytest.fixture(autouse=True)
def _home(tmp_path, monkeypatch):
    monkeypatch.setenv("CPMTOOL_HOME", str(tmp_path / "home"))


def tiny(sparse: dict | None, seed=0, **kw) -> Transformer:
    torch.manual_seed(seed)
    cfg = ModelConfig(family="minicpm", vocab_size=97, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, scale_emb=12.0, scale_depth=1.4,
                      dim_model_base=32, attention="infllmv2" if sparse else "dense", sparse_config=sparse, **kw)
    return Transformer(cfg).eval()


def twins(sparse: dict):
    m = tiny(sparse)
    d = tiny(None)
    d.load_state_dict(m.state_dict())
    return m, d


def test_sparse_config_in_config_json_switches_the_attention():
    hf = tiny(None).config.to_hf()
    hf["sparse_config"] = {"block_size": 64, "topk": 64, "dense_len": 8192}
    cfg = ModelConfig.from_hf(hf)
    assert cfg.attention == "infllmv2"
    assert Transformer(cfg).model.layers[0].self_attn.attn_fn is ATTENTION["infllmv2"] is infllmv2_attention
    assert ModelConfig.from_hf(cfg.to_hf()).sparse_config == hf["sparse_config"]


def test_dense_below_dense_len_and_sparse_at_or_above_it():
    ids = torch.randint(0, 97, (1, 300))
    m, d = twins({**SMALL, "dense_len": 301})
    with torch.no_grad():
        torch.testing.assert_close(m(ids), d(ids))  # 300 keys < dense_len: exactly the dense model
        m.config.sparse_config = {**SMALL, "dense_len": 300}
        assert (m(ids) - d(ids)).abs().max() > 1e-3  # 300 >= dense_len: sparse


def test_cached_prefill_and_decode_match_the_full_forward():
    m, _ = twins(SMALL)
    ids = torch.randint(0, 97, (2, 300))
    pos = torch.arange(300).expand(2, -1)
    with torch.no_grad():
        full = m(ids)
        cache = m.new_cache(2, 320)
        outs = [m(ids[:, :150], pos[:, :150], cache), m(ids[:, 150:270], pos[:, 150:270], cache)]  # chunked
        outs += [m(ids[:, t: t + 1], pos[:, t: t + 1], cache) for t in range(270, 300)]
    torch.testing.assert_close(torch.cat(outs, 1), full, atol=1e-4, rtol=1e-4)
    # the compressed keys were built once and then extended window by window, never recomputed
    per_layer = num_compressed(300, 8, 4) + num_compressed(300, 32, 16)
    assert cache.extra["infllmv2.computed"] == 2 * per_layer
    assert cache.extra["infllmv2.n1"][1].tolist() == [num_compressed(300, 8, 4)] * 2
    k = cache.k[1][:, :, :300]
    torch.testing.assert_close(cache.extra["infllmv2.c1"][1][:, :, :num_compressed(300, 8, 4)], cpu.compress(k, 8, 4))


def test_compressed_keys_start_at_the_switch_and_follow_rows():
    m, d = twins({**SMALL, "dense_len": 150})
    ids = torch.randint(0, 97, (1, 200))
    pos = torch.arange(200)[None]
    with torch.no_grad():
        cache = m.new_cache(1, 256)
        m(ids[:, :100], pos[:, :100], cache)
        assert "infllmv2.c1" not in cache.extra  # dense so far: nothing compressed
        for t in range(100, 160):
            m(ids[:, t: t + 1], pos[:, t: t + 1], cache)
        assert cache.extra["infllmv2.n1"][0].tolist() == [num_compressed(160, 8, 4)]
        # fan the row out to 3 samples, as the engine does for n > 1: the state follows
        cache.select_rows(torch.tensor([0, 0, 0]))
        nxt = ids[:, 160:161].expand(3, 1)
        out = m(nxt, torch.full((3, 1), 160), cache)
        assert cache.extra["infllmv2.c1"][0].shape[0] == 3
        torch.testing.assert_close(out[0], out[2])


def test_continuous_batching_one_row_restarts_while_the_other_continues():
    m, _ = twins(SMALL)
    a, b, c = torch.randint(0, 97, (1, 260)), torch.randint(0, 97, (1, 200)), torch.randint(0, 97, (1, 60))
    with torch.no_grad():
        cache = m.new_cache(2, 320)
        m(torch.cat([a[:, :200], b]), torch.arange(200).expand(2, -1), cache)
        cache.reset(torch.tensor([1]))  # row 1 finished; a new prompt c takes its place
        pos = torch.stack([torch.arange(200, 260), torch.arange(60)])
        got = m(torch.cat([a[:, 200:], c]), pos, cache)
        want_a = m(a, torch.arange(260)[None], m.new_cache(1, 320))[:, 200:]
        want_c = m(c, torch.arange(60)[None], m.new_cache(1, 320))
    torch.testing.assert_close(got[0], want_a[0], atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(got[1], want_c[0], atol=1e-4, rtol=1e-4)


def test_a_reset_row_is_rebuilt_like_a_fresh_cache():
    m, _ = twins(SMALL)
    a, b = torch.randint(0, 97, (1, 180)), torch.randint(0, 97, (1, 150))
    with torch.no_grad():
        cache = m.new_cache(1, 256)
        m(a, torch.arange(180)[None], cache)
        cache.reset()
        got = m(b, torch.arange(150)[None], cache)
        fresh = m(b, torch.arange(150)[None], m.new_cache(1, 256))
    torch.testing.assert_close(got, fresh)


def test_use_nope_scores_blocks_with_pre_rope_keys():
    m = tiny({**SMALL, "use_nope": True})
    cfg = m.config
    torch.manual_seed(1)
    b, t = 1, 200
    q, k, v = torch.randn(b, 4, t, 16), torch.randn(b, 2, t, 16), torch.randn(b, 2, t, 16)
    pos = torch.arange(t)[None]
    out = infllmv2_attention(q, k, v, positions=pos, causal_no_cache=True, layer=0, config=cfg)
    qn, kn = _unrotate(q, pos, cfg), _unrotate(k, pos, cfg)
    want = reference.infllmv2_attention(q[0], k[0], v[0], pos[0], SparseConfig(**{**SMALL, "use_nope": True}),
                                        q_score=qn[0], k_score=kn[0])
    torch.testing.assert_close(out[0], want, atol=2e-5, rtol=1e-5)
    with_rope = reference.infllmv2_attention(q[0], k[0], v[0], pos[0], SparseConfig(**SMALL))
    assert (with_rope - want).abs().max() > 1e-3  # the scoring keys matter
    ids = torch.randint(0, 97, (1, 220))
    with torch.no_grad():
        full = m(ids)
        cache = m.new_cache(1, 256)
        outs = [m(ids[:, :200], torch.arange(200)[None], cache)]
        outs += [m(ids[:, i: i + 1], torch.tensor([[i]]), cache) for i in range(200, 220)]
    torch.testing.assert_close(torch.cat(outs, 1), full, atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("device", ["cpu", ON_GPU])
def test_training_through_sparse_attention_lowers_the_loss(device):
    # cpm-tiny's architecture (μP MiniCPM, GQA, its init), shrunk, with sparse attention on 16-token
    # blocks: 95-token rows use far blocks, so the backward runs through the tiled sparse path (on
    # CUDA: the Triton forward and backward kernels)
    from cpmtool.model.tiny import init_mup

    sparse = dict(kernel_size=8, kernel_stride=4, init_blocks=1, block_size=16, window_size=16, topk=2, dense_len=-1)
    # MiniCPM-style μP values, fixed here so the test does not follow cpm-tiny's shipped recipe
    r = dict(num_attention_heads=4, num_key_value_heads=2, scale_emb=12.0, scale_depth=1.4, init_std=0.1)
    cfg = ModelConfig(family="minicpm", vocab_size=32, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                      num_attention_heads=r["num_attention_heads"], num_key_value_heads=r["num_key_value_heads"],
                      scale_emb=r["scale_emb"], scale_depth=r["scale_depth"], dim_model_base=16,
                      attention="infllmv2", sparse_config=sparse)
    torch.manual_seed(0)
    model = Transformer(cfg)
    init_mup(model, r["init_std"])
    model.to(device)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    gen = torch.Generator().manual_seed(0)
    losses = []
    for _ in range(15):
        ids = ((torch.randint(0, 32, (4, 1), generator=gen) + 7 * torch.arange(96)) % 32).to(device)  # learnable
        loss = F.cross_entropy(model(ids[:, :-1]).reshape(-1, 32), ids[:, 1:].reshape(-1))
        opt.zero_grad()
        loss.backward()
        for name, p in model.named_parameters():
            assert p.grad is not None and torch.isfinite(p.grad).all(), name
        opt.step()
        losses.append(loss.item())
    assert losses[0] > math.log(32) - 0.3
    assert losses[-1] < 0.5 * losses[0], losses


@pytest.mark.parametrize("t, device", [(16384, "cpu"), (32768, "cpu"), pytest.param(131072, "cuda",
                                                                               marks=[requires_cuda, pytest.mark.gpu])])
def test_retrieval_at_long_context_sparse_agrees_with_dense(t, device):
    """Needles in a 16k-128k haystack: each query matches one key far outside the local window.

    Dense attention puts almost all weight on the needle, so its output is the needle's value; the
    sparse op agrees only if stage 1 put the needle's block in that query's top-k. MiniCPM4's
    defaults (block 64, window 2048, top-k 64), heads of MiniCPM4-0.5B (2 KV, 16 query).
    """
    cfg = SparseConfig(dense_len=8192)
    hkv, g, d = 2, 8, 64
    gen = torch.Generator().manual_seed(0)
    k = torch.randn(1, hkv, t, d, generator=gen)
    v = torch.randn(1, hkv, t, d, generator=gen)
    n_q = 16
    needles = torch.randint(64, t - cfg.window_size - 64, (n_q,), generator=gen)
    q = torch.randn(1, hkv * g, n_q, d, generator=gen) * 0.3
    for i, p in enumerate(needles.tolist()):
        u = F.normalize(torch.randn(hkv, d, generator=gen), dim=-1)
        k[0, :, p] = 24 * u  # the needle key; each query head of the group points at it
        q[0, :, i] = q[0, :, i] + u.repeat_interleave(g, 0) * 8
    q_pos = torch.full((1, n_q), t - 1)
    with torch.no_grad():
        if device == "cuda":  # the Triton kernels (fp32, IEEE dots) against SDPA on the GPU
            from cpmtool.kernels.infllmv2.triton import infllmv2_triton

            qg, kg, vg = q.cuda(), k.cuda(), v.cuda()
            sparse = infllmv2_triton(qg, kg, vg, q_pos.cuda(), cfg).cpu()
            dense = F.scaled_dot_product_attention(qg, kg, vg, enable_gqa=True).cpu()
        else:
            sparse = cpu.infllmv2_cpu(q, k, v, q_pos, cfg)
            dense = F.scaled_dot_product_attention(q, k, v, enable_gqa=True)  # the last token sees every key
        c1, c2 = cpu.compress(k[0], 32, 16), cpu.compress(k[0], 128, 64)
        idx = cpu.select_blocks(cpu.block_scores(q.view(hkv, g, n_q, d), c1, c2, q_pos.expand(hkv, -1), cfg,
                                                 t // 64), q_pos.expand(hkv, -1), cfg)
    assert idx.shape[-1] == cfg.topk_eff < t // 64  # 96 of 256 or 512 blocks: really sparse
    for i, p in enumerate(needles.tolist()):
        assert (idx[:, i] == p // 64).any(-1).all(), f"needle {i} at {p}: block not selected"
    needle_v = v[0, :, needles].repeat_interleave(g, 0)  # (Hq, n_q, D)
    torch.testing.assert_close(dense[0], needle_v, atol=0.05, rtol=0.05)  # the task is retrieval
    torch.testing.assert_close(sparse, dense, atol=1e-3, rtol=1e-3)


@requires_cuda
@pytest.mark.gpu
def test_on_gpu_the_model_runs_the_triton_kernels_and_matches_the_torch_path(monkeypatch):
    from cpmtool.kernels.infllmv2 import triton as tri

    calls = []
    real = tri.infllmv2_triton
    monkeypatch.setattr(tri, "infllmv2_triton", lambda *a, **kw: calls.append(1) or real(*a, **kw))
    m, _ = twins(SMALL)
    ids = torch.randint(0, 97, (2, 300))
    pos = torch.arange(300).expand(2, -1)
    with torch.no_grad():
        want = m(ids)  # CPU: the batched torch path
        m.cuda()
        ids, pos = ids.cuda(), pos.cuda()
        full = m(ids)
        assert len(calls) == 2  # one call per layer: the Triton kernels, not the torch fallback
        cache = m.new_cache(2, 320)
        outs = [m(ids[:, :150], pos[:, :150], cache)]
        outs += [m(ids[:, t: t + 1], pos[:, t: t + 1], cache) for t in range(150, 300)]  # cached c1/c2
    torch.testing.assert_close(full.cpu(), want, atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(torch.cat(outs, 1).cpu(), want, atol=1e-4, rtol=1e-4)
