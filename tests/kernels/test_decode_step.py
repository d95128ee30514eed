"""kernels/decode_step: a decode step's layer loop in one C call against the same loop run from
Python (`Transformer._decode_step` with the kernel switched off)."""

from __future__ import annotations

import cpmtool.kernels.decode_step as ds
import pytest
import torch
from cpmtool.kernels import cbuild

from cpmtool.model import transformer
from cpmtool.model.config import ModelConfig
from cpmtool.model.transformer import Transformer


def _kernel_or_skip():
    if ds._kernel() is None:
        why = "torch without MKL's sgemm_" if ds.sgemm_address() is None else cbuild.build_error(ds._SRC)
        pytest.skip(f"decode step kernel unavailable: {why or 'no AVX2/FMA'}")


def _random(family: str, **kw) -> Transformer:
    config = ModelConfig(family=family, vocab_size=300, hidden_size=64, intermediate_size=96, num_hidden_layers=3,
                         num_attention_heads=4, num_key_value_heads=2, head_dim=32, **kw)
    torch.manual_seed(0)
    return Transformer(config).eval()


def _decode(model, steps=6, b=5, p=9):
    # a prefill of right-padded prompts (invalid slots past each prompt), then steps with rows at
    # different positions; the logits of every step
    g = torch.Generator().manual_seed(1)
    ids = torch.randint(5, 290, (b, p), generator=g)
    lens = [p - (i % 3) for i in range(b)]
    cache = model.new_cache(b, p + steps + 3)
    out = []
    with torch.no_grad():
        model.hidden_states(ids, None, cache, lengths=lens)
        for i, n in enumerate(lens):
            cache.valid[i, n:] = False
        pos = torch.tensor(lens)[:, None]
        tok = ids[:, -1:]
        for _ in range(steps):
            logits = model.logits(model.hidden_states(tok, pos, cache)[:, -1])
            out.append(logits)
            tok = logits.argmax(-1, keepdim=True)
            pos = pos + 1
    return torch.stack(out)


@pytest.mark.parametrize("name", ["cpm-tiny", "llama", "qwen2"])  # MiniCPM (μP scales); plain; q/k/v/o biases
def test_the_step_matches_the_python_layer_loop(name, monkeypatch):
    from cpmtool.model.loader import load_model

    _kernel_or_skip()
    model = load_model("cpm-tiny")[0].eval() if name == "cpm-tiny" else _random(name)
    if name == "qwen2":
        assert model.model.layers[0].self_attn.q_proj.bias is not None
    calls = []
    real = ds.decode_step
    monkeypatch.setattr(ds, "decode_step", lambda *a: calls.append(1) or real(*a))
    monkeypatch.setattr(transformer, "_decode_step_kernel", None)
    fast = _decode(model)
    assert len(calls) == 6  # every step took the kernel
    monkeypatch.setattr(transformer, "_decode_step_kernel", False)
    slow = _decode(model)
    # the same ops in the same order: the same MKL sgemm calls and the same C kernels
    assert torch.allclose(fast, slow, atol=1e-5, rtol=1e-6)


def test_what_it_does_not_compute_keeps_the_python_loop():
    from cpmtool.quant.ternary import TernaryLinear

    _kernel_or_skip()
    assert ds.supports(_random("llama"))
    assert not ds.supports(_random("qwen3"))  # q/k norms
    assert not ds.supports(_random("llama", mlp_bias=True))
    m = _random("llama")
    att = m.model.layers[1].self_attn
    att.q_proj = TernaryLinear.from_linear(att.q_proj)  # a quantized layer (an nn.Linear subclass)
    assert not ds.supports(m)
    m = _random("llama")
    mlp = m.model.layers[0].mlp
    mlp.up_proj.weight = torch.nn.Parameter(mlp.up_proj.weight.detach().t().contiguous().t())  # a transposed view
    assert not ds.supports(m)


def test_source_builds_a_stub_without_avx2(stub_build):
    lib = stub_build(ds._SRC)
    assert lib.decode_step_available() == 0
