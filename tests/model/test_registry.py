"""Registry: name/dir/gguf resolution, every error message, list and the model card."""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import pytest

from cpmtool.errors import ModelError
from cpmtool.model import registry
from cpmtool.model.registry import cpmtool_home, list_models, model_info, resolve_model

UNKNOWN = "unknown model '{}' (known: cpm-tiny, smollm2-135m; or give a local HF directory or .gguf file)"


@pytest.fixture(autouse=True)
def home(tmp_path, monkeypatch):
    h = tmp_path / "home"
    monkeypatch.setenv("CPMTOOL_HOME", str(h))
    return h


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory):
    """A complete HF directory: config.json, Llama-named safetensors, a word-level tokenizer.json."""
    import numpy as np
    from safetensors.numpy import save_file
    from tokenizers import Tokenizer, models, pre_tokenizers

    d = tmp_path_factory.mktemp("tiny")
    cfg = {
        "architectures": ["LlamaForCausalLM"],
        "model_type": "llama",
        "vocab_size": 20,
        "hidden_size": 16,
        "intermediate_size": 32,
        "num_hidden_layers": 2,
        "num_attention_heads": 2,
        "num_key_value_heads": 1,
        "max_position_embeddings": 64,
        "tie_word_embeddings": True,
        "torch_dtype": "float32",
    }
    (d / "config.json").write_text(json.dumps(cfg))
    shapes = {"model.embed_tokens.weight": (20, 16), "model.norm.weight": (16,)}
    for i in range(2):
        p = f"model.layers.{i}."
        shapes.update(
            {
                p + "self_attn.q_proj.weight": (16, 16),
                p + "self_attn.k_proj.weight": (8, 16),
                p + "self_attn.v_proj.weight": (8, 16),
                p + "self_attn.o_proj.weight": (16, 16),
                p + "mlp.gate_proj.weight": (32, 16),
                p + "mlp.up_proj.weight": (32, 16),
                p + "mlp.down_proj.weight": (16, 32),
                p + "input_layernorm.weight": (16,),
                p + "post_attention_layernorm.weight": (16,),
            }
        )
    save_file({k: np.zeros(s, np.float32) for k, s in shapes.items()}, str(d / "model.safetensors"))
    tok = Tokenizer(models.WordLevel({f"w{i}": i for i in range(20)}, unk_token="w0"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tok.save(str(d / "tokenizer.json"))
    return d, sum(int(np.prod(s)) for s in shapes.values())


def _copy(src, dst, skip=()):
    dst.mkdir()
    for f in src.iterdir():
        if f.name not in skip:
            shutil.copy(f, dst / f.name)
    return dst


def test_home_default_and_env(monkeypatch, tmp_path):
    assert cpmtool_home() == tmp_path / "home"
    monkeypatch.delenv("CPMTOOL_HOME")
    assert cpmtool_home() == Path.home() / ".cache" / "cpmtool"
    monkeypatch.setenv("CPMTOOL_HOME", "")
    assert cpmtool_home() == Path.home() / ".cache" / "cpmtool"


def test_unknown_name():
    with pytest.raises(ModelError) as e:
        resolve_model("gpt-5")
    assert str(e.value) == UNKNOWN.format("gpt-5")


def test_smollm2_not_pulled(home):
    with pytest.raises(ModelError) as e:
        resolve_model("smollm2-135m")
    assert str(e.value) == "model 'smollm2-135m' is not installed; run: cpmtool models pull smollm2-135m"


def test_complete_dir_resolves_to_itself(tiny_dir):
    d, _ = tiny_dir
    assert resolve_model(d) == d
    assert resolve_model(str(d)) == d


def test_incomplete_dir_names_what_is_missing(tiny_dir, tmp_path):
    d, _ = tiny_dir
    bare = _copy(d, tmp_path / "bare", skip={"model.safetensors", "tokenizer.json"})
    with pytest.raises(ModelError) as e:
        resolve_model(bare)
    assert str(e.value) == (
        f"incomplete model directory {bare}: missing weights (*.safetensors), "
        "tokenizer (tokenizer.json or tokenizer.model)"
    )
    noconf = _copy(d, tmp_path / "noconf", skip={"config.json"})
    with pytest.raises(ModelError, match=r"missing config\.json$"):
        resolve_model(noconf)


def test_missing_shard(tiny_dir, tmp_path):
    d, _ = tiny_dir
    sharded = _copy(d, tmp_path / "sharded", skip={"model.safetensors"})
    shutil.copy(d / "model.safetensors", sharded / "model-00001-of-00002.safetensors")
    index = {
        "metadata": {},
        "weight_map": {
            "model.embed_tokens.weight": "model-00001-of-00002.safetensors",
            "model.norm.weight": "model-00002-of-00002.safetensors",
        },
    }
    (sharded / "model.safetensors.index.json").write_text(json.dumps(index))
    with pytest.raises(ModelError) as e:
        resolve_model(sharded)
    assert (
        str(e.value)
        == f"incomplete model directory {sharded}: missing shard model-00002-of-00002.safetensors"
    )
    shutil.copy(d / "model.safetensors", sharded / "model-00002-of-00002.safetensors")
    assert resolve_model(sharded) == sharded
    (sharded / "model.safetensors.index.json").write_text("{not json")
    with pytest.raises(ModelError, match="missing a readable model.safetensors.index.json"):
        resolve_model(sharded)


def test_gguf_file_and_other_files(tmp_path):
    g = tmp_path / "m.gguf"
    g.write_bytes(b"GGUF")
    assert resolve_model(g) == g
    other = tmp_path / "weights.bin"
    other.write_bytes(b"x")
    with pytest.raises(ModelError, match="is a file but not a .gguf model"):
        resolve_model(other)
    with pytest.raises(ModelError) as e:
        resolve_model(tmp_path / "missing.gguf")
    assert str(e.value) == UNKNOWN.format(tmp_path / "missing.gguf")


def test_registry_name_wins_over_a_same_named_dir(tiny_dir, tmp_path, monkeypatch):
    d, _ = tiny_dir
    _copy(d, tmp_path / "smollm2-135m")
    monkeypatch.chdir(tmp_path)
    with pytest.raises(ModelError, match="not installed"):
        resolve_model("smollm2-135m")
    assert resolve_model("./smollm2-135m").resolve() == (tmp_path / "smollm2-135m")


def test_installed_smollm2_is_found_under_home(tiny_dir, home):
    d, n = tiny_dir
    target = home / "models" / "smollm2-135m"
    target.parent.mkdir(parents=True)
    _copy(d, target)
    assert resolve_model("smollm2-135m") == target
    row = {r["name"]: r for r in list_models()}["smollm2-135m"]
    assert row == {**row, "installed": True, "params": n, "path": str(target), "family": "llama"}


def test_list_before_pull(home):
    rows = {r["name"]: r for r in list_models()}
    assert set(rows) == {"cpm-tiny", "smollm2-135m"}
    assert rows["smollm2-135m"]["installed"] is False and rows["smollm2-135m"]["params"] is None
    assert rows["smollm2-135m"]["path"] == str(home / "models" / "smollm2-135m")


def test_info_of_a_directory(tiny_dir, tmp_path):
    d, n = tiny_dir
    info = model_info(d)
    assert info["params"] == n
    assert (info["architecture"], info["layers"], info["hidden"], info["heads"], info["kv_heads"]) == (
        "LlamaForCausalLM",
        2,
        16,
        2,
        1,
    )
    assert (info["vocab"], info["context"], info["head_dim"]) == (20, 64, 8)
    assert "mup" not in info and "card" not in info
    assert info["files"]["model.safetensors"] == (d / "model.safetensors").stat().st_size
    mup = _copy(d, tmp_path / "mup")
    cfg = json.loads((mup / "config.json").read_text())
    cfg.update(scale_emb=12, scale_depth=1.4, dim_model_base=256)
    (mup / "config.json").write_text(json.dumps(cfg))
    (mup / "card.json").write_text(
        json.dumps({"accuracy": {"arith_test": 0.9}, "reproduce": "make cpm-tiny"})
    )
    info = model_info(mup)
    assert info["mup"] == {"scale_emb": 12, "scale_depth": 1.4, "dim_model_base": 256}
    assert info["card"] == {"accuracy": {"arith_test": 0.9}, "reproduce": "make cpm-tiny"}


def test_pull_unknown_name():
    with pytest.raises(ModelError) as e:
        registry.pull_model("llama-70b")
    assert str(e.value) == "unknown model 'llama-70b' (known: cpm-tiny, smollm2-135m)"


def test_stale_temp_dirs_are_cleared(home):
    models = home / "models"
    stale = models / ".smollm2-135m.tmp-999999999"  # no such pid
    live = models / f".smollm2-135m.tmp-{os.getpid()}"
    stale.mkdir(parents=True)
    live.mkdir()
    registry._clear_stale_temps(models / "smollm2-135m")
    assert not stale.exists() and live.exists()


def test_cpm_tiny_is_shipped_in_the_package():
    e = registry.REGISTRY["cpm-tiny"]
    if not e.path().is_dir():
        pytest.skip("cpm-tiny weights not built yet")
    assert resolve_model("cpm-tiny") == e.path()
    res = registry.pull_model("cpm-tiny")
    assert res.already_present and res.path == e.path()
    info = model_info("cpm-tiny")
    assert info["family"] in ("minicpm", "minicpm4") and info["params"] > 0
