"""export_llama: a MiniCPM checkpoint becomes a LlamaForCausalLM with the same logits."""

from __future__ import annotations

import dataclasses
import json

import pytest
import torch

from cpmtool.errors import ModelError
from cpmtool.model.config import ModelConfig
from cpmtool.model.export import export_llama
from cpmtool.model.loader import load_model, save_pretrained
from cpmtool.model.transformer import Transformer

ATOL = 1e-4  # fp32: the folded weights differ from ours by rounding only


@pytest.fixture(autouse=True)
def _isolated_home(tmp_path, monkeypatch):
    monkeypatch.setenv("CPMTOOL_HOME", str(tmp_path / "home"))


def tiny(family: str, *, tied=True, bias=False, layers=2, kv_heads=2, seed=0, **kw) -> Transformer:
    mup = dict(scale_emb=12.0, scale_depth=1.4, dim_model_base=16) if family == "minicpm" else {}
    config = ModelConfig(family=family, vocab_size=61, hidden_size=64, intermediate_size=96, num_hidden_layers=layers,
                         num_attention_heads=4, num_key_value_heads=kv_heads, tie_word_embeddings=tied,
                         attention_bias=bias, bos_token_id=1, eos_token_id=2, **{**mup, **kw})
    torch.manual_seed(seed)
    model = Transformer(config).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" in name:
                p.uniform_(0.5, 1.5)
            elif p.ndim == 1:
                p.normal_(0, 0.3)
            elif name == "lm_head.weight":
                p.normal_(0, 1.0)  # O(1) logits, so a missed 1/d or 1/s shows
    return model


def tiny_tokenizer():
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {w: i for i, w in enumerate(["<unk>", "<s>", "</s>"] + [f"w{i}" for i in range(58)])}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    return PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="<unk>", bos_token="<s>", eos_token="</s>")


IDS = torch.tensor([[1, 5, 9, 13, 60, 7, 7, 22, 40, 3], [1, 2, 3, 4, 5, 6, 7, 8, 9, 10]])

# (tied, attention bias, layers, kv heads)
MINICPM_CASES = [
    (True, False, 2, 2),
    (False, False, 2, 2),
    (True, True, 3, 1),
    (False, True, 1, 4),
]


@pytest.mark.parametrize("tied,bias,layers,kv_heads", MINICPM_CASES)
def test_minicpm_exports_to_equivalent_llama(tied, bias, layers, kv_heads, tmp_path):
    from safetensors import safe_open
    from transformers import LlamaForCausalLM

    src = tiny("minicpm", tied=tied, bias=bias, layers=layers, kv_heads=kv_heads)
    save_pretrained(src, tmp_path / "src")
    out = export_llama(tmp_path / "src", tmp_path / "llama")

    hf = json.loads((out / "config.json").read_text())
    assert hf["architectures"] == ["LlamaForCausalLM"] and hf["model_type"] == "llama"
    assert not {"scale_emb", "scale_depth", "dim_model_base"} & set(hf)
    assert hf["tie_word_embeddings"] == tied  # the scales fold into the final norm, so tying survives
    with safe_open(out / "model.safetensors", "pt") as f:
        assert ("lm_head.weight" in f.keys()) != tied

    ref = LlamaForCausalLM.from_pretrained(out).eval()
    with torch.no_grad():
        ours, theirs = src(IDS), ref(IDS).logits
    diff = (ours - theirs).abs().max().item()
    assert diff <= ATOL, f"exported Llama logits differ by {diff:.3g}"
    assert torch.equal(ours.argmax(-1), theirs.argmax(-1))

    back, config = load_model(out)
    assert config.family == "llama" and not config.is_mup
    with torch.no_grad():
        assert (back(IDS) - ours).abs().max().item() <= ATOL


def test_export_without_folding_would_be_wrong(tmp_path):
    # a plain re-save of the MiniCPM weights under a Llama config must NOT match: the test above
    # would otherwise pass for an export that forgot the scales
    from transformers import LlamaForCausalLM

    src = tiny("minicpm")
    unfolded = Transformer(dataclasses.replace(src.config, family="llama", scale_emb=1.0, scale_depth=None,
                                               dim_model_base=None))
    unfolded.load_state_dict(src.state_dict())
    save_pretrained(unfolded, tmp_path / "unfolded")
    ref = LlamaForCausalLM.from_pretrained(tmp_path / "unfolded").eval()
    with torch.no_grad():
        assert (src(IDS) - ref(IDS).logits).abs().max() > 0.1


def test_llama_export_is_a_plain_resave_with_tokenizer(tmp_path, monkeypatch):
    from transformers import AutoTokenizer, LlamaForCausalLM

    from cpmtool.model import transformer

    # bit-for-bit against transformers needs the same ops: our torch path (the C norm and rotary of
    # kernels/pointwise agree with it to float rounding, tests/kernels/test_pointwise.py)
    monkeypatch.setattr(transformer, "_pointwise", False)

    src = tiny("llama", tied=False)
    save_pretrained(src, tmp_path / "src", tokenizer=tiny_tokenizer())
    out = export_llama(tmp_path / "src", tmp_path / "llama")
    ref = LlamaForCausalLM.from_pretrained(out).eval()
    with torch.no_grad():
        assert torch.equal(src(IDS), ref(IDS).logits)
    assert AutoTokenizer.from_pretrained(out).encode("w3 w4", add_special_tokens=False) == [6, 7]


def test_export_keeps_source_dtype(tmp_path):
    src = tiny("minicpm").to(torch.bfloat16)
    save_pretrained(src, tmp_path / "src")
    out = export_llama(tmp_path / "src", tmp_path / "llama")
    assert json.loads((out / "config.json").read_text())["torch_dtype"] == "bfloat16"
    model, _ = load_model(out, dtype="auto")
    assert model.lm_head.weight.dtype == torch.bfloat16


@pytest.mark.parametrize("family,arch", [("qwen2", "Qwen2ForCausalLM"), ("qwen3", "Qwen3ForCausalLM")])
def test_qwen_export_is_refused(family, arch, tmp_path):
    save_pretrained(tiny(family), tmp_path / "src")
    with pytest.raises(ModelError, match=f"already loadable by transformers as {arch}"):
        export_llama(tmp_path / "src", tmp_path / "out")
    assert not (tmp_path / "out").exists()
