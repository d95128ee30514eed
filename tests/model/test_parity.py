"""Our Transformer vs transformers on the same checkpoint: logits, argmax, KV-cache decode.

Checkpoints go both ways: transformers saves and `load_model` reads (single file and sharded), and
`save_pretrained` writes what `AutoModelForCausalLM.from_pretrained` reads.
"""

from __future__ import annotations

import os

import pytest
import torch

from cpmtool.errors import ModelError
from cpmtool.model.loader import load_model, save_pretrained

_OUTER_HOME = os.environ.get("CPMTOOL_HOME")  # where `make test` pulled smollm2 (default home if unset)
ATOL = 1e-3  # fp32, max abs logit difference
VOCAB = 97

# id -> (HF config class name, config kwargs). Tiny sizes; GQA unless the id says mha.
CASES = {
    "llama-tied-mha": ("LlamaConfig", dict(num_key_value_heads=4, tie_word_embeddings=True)),
    "llama-untied-gqa": ("LlamaConfig", dict(num_key_value_heads=2, tie_word_embeddings=False)),
    "llama-bias-mqa": ("LlamaConfig", dict(num_key_value_heads=1, attention_bias=True, mlp_bias=True,
                                           tie_word_embeddings=False)),
    "llama3-rope": ("LlamaConfig", dict(num_key_value_heads=2, tie_word_embeddings=True, rope_parameters={
        "rope_type": "llama3", "rope_theta": 500000.0, "factor": 8.0, "low_freq_factor": 1.0,
        "high_freq_factor": 4.0, "original_max_position_embeddings": 8})),
    "qwen2-tied-gqa": ("Qwen2Config", dict(num_key_value_heads=2, tie_word_embeddings=True)),
    "qwen2-untied-mha": ("Qwen2Config", dict(num_key_value_heads=4, tie_word_embeddings=False)),
    "qwen3-tied-gqa-hd24": ("Qwen3Config", dict(num_key_value_heads=2, head_dim=24, tie_word_embeddings=True)),
    "qwen3-untied-gqa-hd12": ("Qwen3Config", dict(num_key_value_heads=2, head_dim=12, tie_word_embeddings=False)),
}


@pytest.fixture(autouse=True)
def _isolated_home(tmp_path, monkeypatch):
    monkeypatch.setenv("CPMTOOL_HOME", str(tmp_path / "home"))


def _randomize(model: torch.nn.Module, seed: int) -> None:
    # HF's 0.02 init gives near-zero logits that would hide errors; use O(1) activations instead
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" in name:
                p.copy_(1 + 0.2 * torch.randn(p.shape, generator=g))
            else:
                p.copy_(torch.randn(p.shape, generator=g) * (0.5 if p.ndim == 1 else p.shape[-1] ** -0.5))


def hf_model(case: str, seed: int = 0):
    import transformers

    cls_name, kw = CASES[case]
    config = getattr(transformers, cls_name)(vocab_size=VOCAB, hidden_size=48, intermediate_size=80,
                                             num_hidden_layers=2, num_attention_heads=4, **kw)
    model = transformers.AutoModelForCausalLM.from_config(config).eval()
    _randomize(model, seed)
    return model


def ids(batch: int = 2, t: int = 13, seed: int = 1) -> torch.Tensor:
    return torch.randint(0, VOCAB, (batch, t), generator=torch.Generator().manual_seed(seed))


def assert_same_logits(ours: torch.Tensor, ref: torch.Tensor, atol: float = ATOL) -> float:
    diff = (ours.float() - ref.float()).abs().max().item()
    assert diff <= atol, f"max abs logit diff {diff:.3g} > {atol}"
    same = ours.argmax(-1) == ref.argmax(-1)
    assert same.all(), f"argmax differs at positions {same.logical_not().nonzero().tolist()}"
    return diff


@pytest.fixture(scope="module", params=[(c, s) for c in CASES for s in (None, "12KB")],
                ids=[f"{c}-{'sharded' if s else 'single'}" for c in CASES for s in (None, "12KB")])
def hf_checkpoint(request, tmp_path_factory):
    case, shard = request.param
    model = hf_model(case)
    d = tmp_path_factory.mktemp(case)
    model.save_pretrained(d, max_shard_size=shard) if shard else model.save_pretrained(d)
    sharded = (d / "model.safetensors.index.json").exists()
    assert sharded == bool(shard), f"expected {'sharded' if shard else 'single-file'} save from transformers"
    return case, model, d


def test_load_model_reads_transformers_checkpoint(hf_checkpoint):
    case, ref, d = hf_checkpoint
    ours, config = load_model(d)
    x = ids()
    with torch.no_grad():
        assert_same_logits(ours(x), ref(x).logits)
    assert config.tie_word_embeddings == CASES[case][1]["tie_word_embeddings"]
    assert (ours.lm_head.weight is ours.model.embed_tokens.weight) == config.tie_word_embeddings
    assert not any(p.is_meta for p in ours.parameters()) and not ours.inv_freq.is_meta


@pytest.mark.parametrize("shard", [None, 6000], ids=["single", "sharded"])
@pytest.mark.parametrize("case", list(CASES))
def test_saved_checkpoint_loads_in_transformers(case, shard, tmp_path):
    from safetensors import safe_open
    from transformers import AutoModelForCausalLM

    ref = hf_model(case, seed=3)
    ref.save_pretrained(tmp_path / "hf")
    ours, config = load_model(tmp_path / "hf")
    out = save_pretrained(ours, tmp_path / "ours", max_shard_size=shard)
    files = sorted(out.glob("*.safetensors"))
    assert (len(files) > 1) == bool(shard)
    keys = set()
    for f in files:
        with safe_open(f, "pt") as st:
            keys |= set(st.keys())
    assert ("lm_head.weight" in keys) != config.tie_word_embeddings, "a tied head must not be saved twice"

    back = AutoModelForCausalLM.from_pretrained(out).eval()
    assert type(back) is type(ref)
    x = ids(seed=4)
    with torch.no_grad():
        assert_same_logits(ours(x), back(x).logits)
        assert_same_logits(back(x).logits, ref(x).logits)


@pytest.mark.parametrize("case", list(CASES))
def test_kv_cache_decode_equals_full_forward(case, tmp_path):
    hf_model(case, seed=5).save_pretrained(tmp_path)
    model, _ = load_model(tmp_path)
    x = ids(t=12, seed=6)
    b, t = x.shape
    prefill = 5
    with torch.no_grad():
        full = model(x)  # (B, T, V)
        cache = model.new_cache(b, t)
        pos = torch.arange(t).expand(b, t)
        steps = [model(x[:, :prefill], pos[:, :prefill], cache)]
        for i in range(prefill, t):
            steps.append(model(x[:, i:i + 1], pos[:, i:i + 1], cache))
    assert_same_logits(torch.cat(steps, dim=1), full, atol=1e-4)


@pytest.fixture
def smollm2(monkeypatch):
    if _OUTER_HOME:
        monkeypatch.setenv("CPMTOOL_HOME", _OUTER_HOME)
    else:
        monkeypatch.delenv("CPMTOOL_HOME", raising=False)
    from cpmtool.model.registry import resolve_model

    try:
        return resolve_model("smollm2-135m")
    except ModelError as e:
        pytest.skip(f"smollm2-135m is not pulled ({e}); `make test` pulls it before the tests")


def test_smollm2_parity_with_transformers(smollm2):
    from transformers import AutoModelForCausalLM

    from cpmtool.model.tokenizer import encode_chat, load_tokenizer

    ours, config = load_model(smollm2)
    assert config.family == "llama" and config.num_hidden_layers == 30
    tok = load_tokenizer(smollm2)
    prompt = encode_chat(tok, [{"role": "user", "content": "What is the capital of France?"}])
    ref = AutoModelForCausalLM.from_pretrained(smollm2, dtype=torch.float32).eval()
    x = torch.tensor([prompt])
    with torch.no_grad():
        assert_same_logits(ours(x), ref(x).logits)
        want = ref.generate(x, max_new_tokens=6, do_sample=False)[0, x.shape[1]:].tolist()
    assert ours.greedy(prompt, 6, stop_ids=[]) == want
