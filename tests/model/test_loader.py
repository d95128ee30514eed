"""load_model / save_pretrained / load_tokenizer on real files, including broken ones."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file, save_file

from cpmtool.errors import ConfigError, ModelError
from cpmtool.model.config import ModelConfig
from cpmtool.model.loader import load_model, save_pretrained
from cpmtool.model.tokenizer import chat_prompt, encode_chat, load_tokenizer
from cpmtool.model.transformer import Transformer

CHAT_TEMPLATE = ("{% for m in messages %}<s> {{ m['role'] }} {{ m['content'] }} </s> {% endfor %}"
                 "{% if add_generation_prompt %}<s> assistant{% endif %}")
WORDS = ["<unk>", "<s>", "</s>", "user", "assistant", "hello", "there"]


@pytest.fixture(autouse=True)
def _isolated_home(tmp_path, monkeypatch):
    monkeypatch.setenv("CPMTOOL_HOME", str(tmp_path / "home"))


def tiny(tied: bool = True, family: str = "llama", **kw) -> Transformer:
    config = ModelConfig(family=family, vocab_size=40, hidden_size=32, intermediate_size=48, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, tie_word_embeddings=tied, **kw)
    torch.manual_seed(0)
    return Transformer(config).eval()


def tiny_tokenizer(chat_template: str | None = CHAT_TEMPLATE):
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.WordLevel({w: i for i, w in enumerate(WORDS)}, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    return PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="<unk>", bos_token="<s>", eos_token="</s>",
                                   chat_template=chat_template)


@pytest.fixture
def ckpt(tmp_path):
    """An untied tiny checkpoint directory and the model it came from."""
    model = tiny(tied=False)
    return save_pretrained(model, tmp_path / "ckpt"), model


def _rewrite(path, drop=(), add=None):
    sd = load_file(path)
    sd = {k: v for k, v in sd.items() if k not in drop} | (add or {})
    save_file(sd, path, metadata={"format": "pt"})


def assert_one_line(e: pytest.ExceptionInfo, *fragments: str):
    msg = str(e.value)
    assert "\n" not in msg, f"error message spans lines: {msg!r}"
    for f in fragments:
        assert f in msg, f"{f!r} not in {msg!r}"


# ------------------------------------------------------------------------------- broken checkpoints

CORRUPTIONS = {
    "truncated": lambda b: b[: len(b) // 2],
    "garbage-header": lambda b: b"\x20\x00\x00\x00\x00\x00\x00\x00{not json at all, really!!!}" + b[40:],
    "header-too-long": lambda b: (10**9).to_bytes(8, "little") + b[8:],
    "empty": lambda b: b"",
}


@pytest.mark.parametrize("kind", list(CORRUPTIONS))
def test_corrupt_safetensors_is_a_one_line_model_error(kind, ckpt):
    d, _ = ckpt
    f = d / "model.safetensors"
    f.write_bytes(CORRUPTIONS[kind](f.read_bytes()))
    with pytest.raises(ModelError) as e:
        load_model(d)
    assert_one_line(e, "corrupt safetensors file", str(f))


BROKEN = {
    # name -> (how to break the checkpoint dir, fragment of the error)
    "missing-tensor": (lambda d: _rewrite(d / "model.safetensors", drop=["model.layers.1.mlp.up_proj.weight"]),
                       "missing tensor(s): model.layers.1.mlp.up_proj.weight"),
    "missing-untied-head": (lambda d: _rewrite(d / "model.safetensors", drop=["lm_head.weight"]),
                            "missing tensor(s): lm_head.weight"),
    "unexpected-tensor": (lambda d: _rewrite(d / "model.safetensors", add={"model.extra.weight": torch.zeros(2)}),
                          "unexpected tensor(s): model.extra.weight"),
    "wrong-shape": (lambda d: _rewrite(d / "model.safetensors",
                                       add={"model.norm.weight": torch.ones(31)}),
                    "tensor model.norm.weight"),
    "no-config": (lambda d: (d / "config.json").unlink(), "no config.json"),
    "bad-config-json": (lambda d: (d / "config.json").write_text("{oops"), "unreadable config.json"),
    "unsupported-arch": (lambda d: (d / "config.json").write_text(json.dumps({"model_type": "gpt2"})),
                         "unsupported model_type 'gpt2'"),
    "no-weights": (lambda d: (d / "model.safetensors").unlink(), "no safetensors weights"),
}


@pytest.mark.parametrize("kind", list(BROKEN))
def test_broken_checkpoint_is_a_one_line_model_error(kind, ckpt):
    d, _ = ckpt
    breaker, fragment = BROKEN[kind]
    breaker(d)
    with pytest.raises(ModelError) as e:
        load_model(d)
    assert_one_line(e, fragment)


def test_sharded_index_naming_a_missing_shard(tmp_path):
    d = save_pretrained(tiny(), tmp_path / "m", max_shard_size=4000)
    shards = sorted(d.glob("model-*.safetensors"))
    assert len(shards) > 2
    shards[1].unlink()
    with pytest.raises(ModelError) as e:
        load_model(d)
    assert_one_line(e, "missing shard file(s)", shards[1].name)


def test_unknown_model_name_is_a_model_error():
    with pytest.raises(ModelError, match="no-such-model"):
        load_model("no-such-model")


# ------------------------------------------------------------------------------- what loads, and how


def test_tied_checkpoint_with_a_stored_head_and_stray_rotary_buffer_loads(tmp_path):
    model = tiny(tied=True)
    d = save_pretrained(model, tmp_path / "m")
    emb = model.model.embed_tokens.weight.detach()
    # older exports store the tied head and the rotary buffer; both are ignored
    _rewrite(d / "model.safetensors", add={"lm_head.weight": torch.zeros_like(emb),
                                           "model.layers.0.self_attn.rotary_emb.inv_freq": torch.ones(4)})
    loaded, _ = load_model(d)
    assert loaded.lm_head.weight is loaded.model.embed_tokens.weight
    assert torch.equal(loaded.lm_head.weight, emb)


@pytest.mark.parametrize("dtype,want", [("float32", torch.float32), ("bfloat16", torch.bfloat16),
                                        ("float16", torch.float16), (torch.bfloat16, torch.bfloat16),
                                        ("auto", torch.bfloat16)])
def test_dtype(dtype, want, tmp_path):
    d = save_pretrained(tiny().to(torch.bfloat16), tmp_path / "m")
    assert json.loads((d / "config.json").read_text())["torch_dtype"] == "bfloat16"
    model, config = load_model(d, dtype=dtype)
    assert {p.dtype for p in model.parameters()} == {want}
    assert config.torch_dtype == str(want).removeprefix("torch.")
    assert model.inv_freq.dtype == torch.float32  # RoPE frequencies stay fp32 as in HF
    with torch.no_grad():
        assert model(torch.tensor([[1, 2, 3]])).dtype == want


def test_bad_dtype_is_a_config_error(ckpt):
    with pytest.raises(ConfigError, match="unsupported dtype 'int8'"):
        load_model(ckpt[0], dtype="int8")


def test_attention_override(ckpt):
    model, config = load_model(ckpt[0], attention="dense")
    assert config.attention == "dense"
    with pytest.raises(ConfigError, match="unknown attention 'nope'"):
        load_model(ckpt[0], attention="nope")


def test_round_trip_is_exact(ckpt):
    d, model = ckpt
    loaded, config = load_model(d)
    assert config.to_hf() == model.config.to_hf()
    for (k, a), (k2, b) in zip(model.state_dict().items(), loaded.state_dict().items(), strict=True):
        assert k == k2 and torch.equal(a, b), k


# ------------------------------------------------------------------------------- save_pretrained


def test_sharded_save_has_a_complete_index(tmp_path):
    model = tiny(tied=True)
    d = save_pretrained(model, tmp_path / "m", max_shard_size="5KB")
    index = json.loads((d / "model.safetensors.index.json").read_text())
    want = {k: v for k, v in model.state_dict().items() if k != "lm_head.weight"}
    assert set(index["weight_map"]) == set(want)
    assert index["metadata"]["total_size"] == sum(t.numel() * t.element_size() for t in want.values())
    for name in set(index["weight_map"].values()):
        assert (d / name).is_file()
    assert not (d / "model.safetensors").exists()
    loaded, _ = load_model(d)
    assert torch.equal(loaded(torch.tensor([[3, 4]])), model(torch.tensor([[3, 4]])))


def test_save_replaces_a_model_dir_atomically_and_leaves_no_temp(tmp_path):
    save_pretrained(tiny(), tmp_path / "m", max_shard_size=4000)
    save_pretrained(tiny(tied=False), tmp_path / "m")  # the old shards must not survive
    assert sorted(p.name for p in (tmp_path / "m").iterdir()) == ["config.json", "model.safetensors"]
    assert [p.name for p in tmp_path.iterdir() if p.name != "home"] == ["m"]
    _, config = load_model(tmp_path / "m")
    assert config.tie_word_embeddings is False


def test_save_refuses_to_clobber_a_non_model_dir(tmp_path):
    (tmp_path / "docs").mkdir()
    (tmp_path / "docs" / "notes.txt").write_text("keep me")
    with pytest.raises(ModelError, match="refusing to overwrite"):
        save_pretrained(tiny(), tmp_path / "docs")
    assert (tmp_path / "docs" / "notes.txt").read_text() == "keep me"


def test_bad_shard_size_is_a_config_error(tmp_path):
    with pytest.raises(ConfigError, match="max_shard_size"):
        save_pretrained(tiny(), tmp_path / "m", max_shard_size="lots")
    assert not (tmp_path / "m").exists()


# ------------------------------------------------------------------------------- tokenizer


def test_tokenizer_round_trip_and_chat_template(tmp_path):
    d = save_pretrained(tiny(), tmp_path / "m", tokenizer=tiny_tokenizer())
    tok = load_tokenizer(d)
    messages = [{"role": "user", "content": "hello there"}]
    assert chat_prompt(tok, messages) == "<s> user hello there </s> <s> assistant"
    assert encode_chat(tok, messages) == [1, 3, 5, 6, 2, 1, 4]
    assert chat_prompt(tok, messages, add_generation_prompt=False) == "<s> user hello there </s> "


def test_missing_tokenizer_is_a_model_error(ckpt):
    with pytest.raises(ModelError) as e:
        load_tokenizer(ckpt[0])
    assert_one_line(e, "no tokenizer in", str(ckpt[0]))


def test_missing_chat_template_is_a_model_error(tmp_path):
    d = save_pretrained(tiny(), tmp_path / "m", tokenizer=tiny_tokenizer(chat_template=None))
    with pytest.raises(ModelError, match="no chat template"):
        chat_prompt(load_tokenizer(d), [{"role": "user", "content": "hello"}])
