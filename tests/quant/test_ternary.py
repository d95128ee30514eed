"""Ternary quantiser: scales, rounding and the STE by hand; the layer swap, packing and the loader on cpm-tiny."""

import json
import math

import pytest
import torch
from cpmtool.kernels.ternary_matmul import PackedTernaryLinear
from torch import nn

from cpmtool.errors import ConfigError, ModelError
from cpmtool.model.loader import load_model, quant_format
from cpmtool.model.transformer import block_linears
from cpmtool.quant.ternary import (
    Ternary,
    TernaryLinear,
    fake_quant_weight,
    file_bytes,
    save_ternary,
    ternary_stats,
    weight_quant,
    weight_scale,
)

# entries and group means are exact in bf16, so the bf16 rounding of the scales changes nothing here
W = torch.tensor([[0.375, -0.625, 0.0625, 0.9375], [0.0, 0.125, -0.25, 0.125]])


def test_absmean_per_tensor_by_hand():
    # mean|W| = (0.375 + 0.625 + 0.0625 + 0.9375 + 0 + 0.125 + 0.25 + 0.125) / 8 = 2.5 / 8 = 0.3125
    torch.testing.assert_close(weight_scale(W), torch.tensor([[0.3125]]))
    q, s = weight_quant(W)
    # W / s = [1.2, -2.0, 0.2, 3.0 | 0, 0.4, -0.8, 0.4] -> round, clamp to [-1, 1]
    assert q.dtype == torch.int8 and q.tolist() == [[1, -1, 0, 1], [0, 0, -1, 0]]
    torch.testing.assert_close(fake_quant_weight(W), q.float() * 0.3125)


def test_absmean_per_group_by_hand():
    s = weight_scale(W, group_size=2)
    # groups: (0.375, -0.625) 0.5; (0.0625, 0.9375) 0.5; (0, 0.125) 0.0625; (-0.25, 0.125) 0.1875
    torch.testing.assert_close(s, torch.tensor([[0.5, 0.5], [0.0625, 0.1875]]))
    q, _ = weight_quant(W, group_size=2)
    # [0.75, -1.25, 0.125, 1.875 | 0, 2.0, -1.33, 0.67]
    assert q.tolist() == [[1, -1, 0, 1], [0, 1, -1, 1]]
    torch.testing.assert_close(fake_quant_weight(W, 2), torch.tensor([[0.5, -0.5, 0.0, 0.5],
                                                                      [0.0, 0.0625, -0.1875, 0.1875]]))


def test_scale_is_rounded_to_bf16():
    # mean 0.29375 = 1.0010110011..b x 2^-2; bf16 keeps 8 significant bits -> 1.0010110b x 2^-2 = 0.29296875
    w = torch.tensor([[0.3, -0.6, 0.05, 1.0], [0.0, 0.1, -0.2, 0.1]])
    assert weight_scale(w).item() == 0.29296875


def test_zero_tensor_scale_is_clamped():
    q, s = weight_quant(torch.zeros(2, 4))
    assert s.item() == pytest.approx(1e-5, rel=4e-3) and not q.any()  # 1e-5 rounded to bf16


def test_ste_gradient_is_identity():
    lin = nn.Linear(4, 2, bias=False)
    with torch.no_grad():
        lin.weight.copy_(W)
    tl = TernaryLinear.from_linear(lin, group_size=0, act_bits=8)
    assert tl.weight is lin.weight  # the optimizer's Parameter is kept
    x = torch.tensor([[1.0, 2.0, -1.0, 0.5], [0.3, 0.0, 0.2, -4.0]], requires_grad=True)
    g = torch.tensor([[1.0, -2.0], [0.5, 3.0]])
    y = tl(x)
    wq = fake_quant_weight(W)
    xq = torch.stack([torch.round(r * 127 / r.abs().max()) * r.abs().max() / 127 for r in x.detach()])
    torch.testing.assert_close(y, xq @ wq.T)
    y.backward(g)
    # the STE passes the gradient straight through both quantisers: dL/dW = g^T xq for every weight,
    # also those clamped to +-1 (W[0, 3] / s = 3.0, W[0, 1] / s = -2.0), and dL/dx = g Wq
    torch.testing.assert_close(lin.weight.grad, g.T @ xq)
    torch.testing.assert_close(x.grad, g @ wq)


def test_scheme_flags_and_group_check():
    with pytest.raises(ConfigError, match="act-bits"):
        Ternary(0, 4)
    model, _ = load_model("cpm-tiny")
    with pytest.raises(ConfigError, match="does not divide"):
        Ternary(group_size=100).convert_for_qat(model)


def test_qat_swap_keeps_embeddings_head_and_parameters():
    model, cfg = load_model("cpm-tiny")
    before = {n: p for n, p in model.named_parameters()}
    Ternary(32, 8).convert_for_qat(model)
    swapped = [getattr(p, a) for _, p, a in block_linears(model)]
    assert len(swapped) == 7 * cfg.num_hidden_layers and all(isinstance(m, TernaryLinear) for m in swapped)
    assert type(model.lm_head) is nn.Linear and type(model.model.embed_tokens) is nn.Embedding
    assert {n: p for n, p in model.named_parameters()} == before  # same names, same Parameter objects


GROUP = 32  # divides every input size of cpm-tiny (hidden 256, MLP 768; it was 224/672 before)


@pytest.fixture(scope="module")
def packed_tiny(tmp_path_factory):
    from cpmtool.model.tokenizer import load_tokenizer

    model, _ = load_model("cpm-tiny")
    scheme = Ternary(GROUP, 8)
    scheme.convert_for_qat(model)
    out = save_ternary(model, tmp_path_factory.mktemp("t") / "tiny-ternary", scheme,
                       tokenizer=load_tokenizer("cpm-tiny"), keep_dtype="float32")
    return model, out


def test_packed_file_round_trip(packed_tiny):
    qat, out = packed_tiny
    loaded, _ = load_model(out)
    layers = [getattr(p, a) for _, p, a in block_linears(loaded)]
    assert all(isinstance(m, PackedTernaryLinear) and m.group_size == GROUP for m in layers)
    assert layers[0].weight_packed.dtype == torch.uint8 and layers[0].weight_scale.dtype == torch.bfloat16
    ids = torch.tensor([[1, 40, 41, 42, 43, 44, 45]])
    with torch.no_grad():
        torch.testing.assert_close(loaded(ids), qat(ids), atol=1e-4, rtol=1e-4)
    assert quant_format(out) == {"cpmtool.quant": "ternary-2bit-v1", "cpmtool.group_size": str(GROUP),
                                 "cpmtool.act_bits": "8"}
    # bf16 model: 2 bytes a weight; packed: 2 bits + a bf16 scale per GROUP weights, kept tensors float32
    stats = ternary_stats(qat, Ternary(GROUP, 8))
    assert stats["bits_per_weight"] == pytest.approx(2 + 16 / GROUP)
    kept = 4 * stats["kept_weights"]
    assert file_bytes(out) == pytest.approx(stats["packed_weight_bytes"] + kept, rel=0.01)
    assert file_bytes(out) < stats["bf16_bytes"] / 4


def _retag(src, dst, tags):
    import shutil

    from safetensors.torch import load_file, save_file

    shutil.copytree(src, dst)
    save_file(load_file(dst / "model.safetensors"), dst / "model.safetensors", metadata=tags)


def test_loader_rejects_unknown_or_missing_tag(packed_tiny, tmp_path):
    _, out = packed_tiny
    _retag(out, tmp_path / "x", {"format": "pt", "cpmtool.quant": "ternary-3bit-v9"})
    with pytest.raises(ModelError, match="'ternary-3bit-v9'.*cpmtool quantize-ternary --model"):
        load_model(tmp_path / "x")
    _retag(out, tmp_path / "y", {"format": "pt"})
    with pytest.raises(ModelError, match="no cpmtool.quant format tag.*cpmtool quantize-ternary"):
        load_model(tmp_path / "y")


def test_loader_keeps_full_precision_checkpoints_plain(tmp_path):
    from cpmtool.model.loader import resolve

    model, _ = load_model("cpm-tiny", dtype="bfloat16")
    assert quant_format(resolve("cpm-tiny")) == {}
    assert all(type(getattr(p, a)) is nn.Linear for _, p, a in block_linears(model))
    assert model.lm_head.weight.dtype == torch.bfloat16


def test_config_json_is_the_architecture(packed_tiny):
    _, out = packed_tiny
    hf = json.loads((out / "config.json").read_text())
    assert hf["model_type"] == "minicpm" and hf["torch_dtype"] == "float32"
    assert math.isclose(hf["scale_depth"], 1.4)
