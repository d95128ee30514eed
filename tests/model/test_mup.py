"""MiniCPM μP scaling checked against a forward pass written out by hand.

transformers has no MiniCPM(4) class (it is remote code), so the reference here is a naive
per-head loop with the three scales spelled out as constants:
embedding × scale_emb, each residual branch × scale_depth/√L, final hidden ÷ (hidden/dim_model_base).
"""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from cpmtool.model.config import ModelConfig
from cpmtool.model.loader import load_model, save_pretrained
from cpmtool.model.transformer import Transformer

SCALE_EMB, SCALE_DEPTH, HIDDEN, DIM_MODEL_BASE = 12.0, 1.4, 32, 8  # logit divisor 32/8 = 4
EPS, THETA = 1e-5, 10000.0


@pytest.fixture(autouse=True)
def _isolated_home(tmp_path, monkeypatch):
    monkeypatch.setenv("CPMTOOL_HOME", str(tmp_path / "home"))


def minicpm(layers: int, tied: bool, heads: int = 4, kv_heads: int = 2, bias: bool = False, seed: int = 0):
    config = ModelConfig(family="minicpm", vocab_size=50, hidden_size=HIDDEN, intermediate_size=48,
                         num_hidden_layers=layers, num_attention_heads=heads, num_key_value_heads=kv_heads,
                         rms_norm_eps=EPS, rope_theta=THETA, tie_word_embeddings=tied, attention_bias=bias,
                         scale_emb=SCALE_EMB, scale_depth=SCALE_DEPTH, dim_model_base=DIM_MODEL_BASE)
    torch.manual_seed(seed)
    model = Transformer(config).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" in name:
                p.uniform_(0.5, 1.5)
            elif p.ndim == 1:
                p.normal_(0, 0.3)
    return model


def rms(x, w):
    return w * x / torch.sqrt((x * x).mean(-1, keepdim=True) + EPS)


def rope(x, pos):
    # x (T, D); rotate-half convention: pairs are (i, i + D/2)
    d = x.shape[-1]
    ang = pos[:, None].double() * THETA ** (-torch.arange(0, d, 2).double() / d)  # (T, D/2)
    cos, sin = ang.cos().to(x.dtype), ang.sin().to(x.dtype)
    x1, x2 = x[:, : d // 2], x[:, d // 2:]
    return torch.cat([x1 * cos - x2 * sin, x2 * cos + x1 * sin], dim=-1)


def by_hand(model: Transformer, ids: torch.Tensor, scale_emb=SCALE_EMB, scale_depth=SCALE_DEPTH,
            dim_model_base=DIM_MODEL_BASE) -> torch.Tensor:
    """Logits (T, V) of one sequence, one head and one position at a time."""
    c = model.config
    w = {k: v.double() for k, v in model.state_dict().items()}
    lin = lambda x, name: x @ w[name + ".weight"].T + (w[name + ".bias"] if name + ".bias" in w else 0)  # noqa: E731
    L, H, Hkv, D = c.num_hidden_layers, c.num_attention_heads, c.num_key_value_heads, c.head_dim
    t = ids.shape[0]
    pos = torch.arange(t)
    x = w["model.embed_tokens.weight"][ids] * scale_emb  # (T, hidden)
    for i in range(L):
        p = f"model.layers.{i}."
        h = rms(x, w[p + "input_layernorm.weight"])
        q, k, v = (lin(h, p + f"self_attn.{n}_proj") for n in "qkv")
        heads = []
        for hd in range(H):
            g = hd // (H // Hkv)  # the KV head this query head reads (GQA)
            qh = rope(q[:, hd * D:(hd + 1) * D], pos)
            kh = rope(k[:, g * D:(g + 1) * D], pos)
            vh = v[:, g * D:(g + 1) * D]
            out = torch.zeros(t, D, dtype=x.dtype)
            for a in range(t):
                s = torch.stack([qh[a] @ kh[b] / math.sqrt(D) for b in range(a + 1)])
                out[a] = (torch.softmax(s, 0)[:, None] * vh[: a + 1]).sum(0)
            heads.append(out)
        x = x + scale_depth / math.sqrt(L) * lin(torch.cat(heads, -1), p + "self_attn.o_proj")
        h = rms(x, w[p + "post_attention_layernorm.weight"])
        mlp = F.silu(lin(h, p + "mlp.gate_proj")) * lin(h, p + "mlp.up_proj")
        x = x + scale_depth / math.sqrt(L) * lin(mlp, p + "mlp.down_proj")
    x = rms(x, w["model.norm.weight"]) / (HIDDEN / dim_model_base)
    head = w["model.embed_tokens.weight"] if c.tie_word_embeddings else w["lm_head.weight"]
    return x @ head.T


# (layers, tied, heads, kv_heads, bias)
CASES = [
    (1, True, 4, 2, False),
    (1, False, 4, 4, False),
    (2, True, 4, 1, True),
    (3, False, 2, 2, True),
]


@pytest.mark.parametrize("layers,tied,heads,kv_heads,bias", CASES)
def test_forward_matches_hand_computation(layers, tied, heads, kv_heads, bias):
    model = minicpm(layers, tied, heads, kv_heads, bias)
    assert model.config.residual_scale == pytest.approx(SCALE_DEPTH / math.sqrt(layers))
    assert model.config.logit_divisor == pytest.approx(HIDDEN / DIM_MODEL_BASE)
    ids = torch.tensor([3, 17, 42, 0, 9, 9, 31])
    with torch.no_grad():
        ours = model(ids[None])[0].double()
    ref = by_hand(model, ids)
    diff = (ours - ref).abs().max().item()
    assert diff <= 1e-4, f"max abs logit diff {diff:.3g} vs the hand computation"
    # the scales matter: the same weights without μP give clearly different logits
    plain = by_hand(model, ids, scale_emb=1.0, scale_depth=math.sqrt(layers), dim_model_base=HIDDEN)
    assert (ref - plain).abs().max() > 1e-2


def test_hf_minicpm_config_maps_to_mup_fields():
    hf = {"architectures": ["MiniCPMForCausalLM"], "model_type": "minicpm", "vocab_size": 73448,
          "hidden_size": 4096, "intermediate_size": 16384, "num_hidden_layers": 32, "num_attention_heads": 32,
          "num_key_value_heads": 2, "scale_emb": 12, "scale_depth": 1.4, "dim_model_base": 256,
          "tie_word_embeddings": False, "rms_norm_eps": 1e-6, "torch_dtype": "bfloat16"}
    c = ModelConfig.from_hf(hf)
    assert (c.family, c.scale_emb, c.scale_depth, c.dim_model_base) == ("minicpm", 12, 1.4, 256)
    assert c.residual_scale == pytest.approx(1.4 / math.sqrt(32))  # ≈ 0.2475 for MiniCPM4-8B
    assert c.logit_divisor == pytest.approx(16.0)
    back = ModelConfig.from_hf(c.to_hf())
    assert (back.scale_emb, back.scale_depth, back.dim_model_base) == (12, 1.4, 256)


@pytest.mark.parametrize("tied", [True, False])
def test_mup_survives_save_and_load(tied, tmp_path):
    model = minicpm(2, tied)
    out = save_pretrained(model, tmp_path / "m")
    loaded, config = load_model(out)
    assert (config.scale_emb, config.scale_depth, config.dim_model_base) == (SCALE_EMB, SCALE_DEPTH, DIM_MODEL_BASE)
    ids = torch.tensor([[1, 2, 3, 4, 5]])
    with torch.no_grad():
        assert torch.equal(loaded(ids), model(ids))
