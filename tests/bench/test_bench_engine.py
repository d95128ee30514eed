"""Smoke test of the engine benchmarks on a tiny model: the record's structure, never its timings."""

import orjson
import pytest
import torch

from cpmtool.bench.engine import bench_engine, bench_spec, format_engine, load_instructions
from cpmtool.errors import ConfigError, InputError


@pytest.fixture(scope="module")
def tiny_model_dir(tmp_path_factory):
    """A random 2-layer Llama on smollm2's vocabulary, saved with its tokenizer (loads in both peers)."""
    import transformers

    from cpmtool.errors import ModelError
    from cpmtool.model.config import ModelConfig
    from cpmtool.model.loader import save_pretrained
    from cpmtool.model.tokenizer import load_tokenizer
    from cpmtool.model.transformer import Transformer

    try:
        tok = load_tokenizer("smollm2-135m")
    except ModelError as e:
        pytest.skip(f"smollm2-135m is not pulled ({e})")
    torch.manual_seed(0)
    hc = transformers.LlamaConfig(vocab_size=len(tok), hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                                  num_attention_heads=4, num_key_value_heads=2, tie_word_embeddings=True,
                                  max_position_embeddings=1024, eos_token_id=None, bos_token_id=None)
    model = Transformer(ModelConfig.from_hf(hc.to_dict()))
    model.load_state_dict(transformers.LlamaForCausalLM(hc).state_dict(), strict=False)
    d = tmp_path_factory.mktemp("bench") / "tiny"
    save_pretrained(model, d, tokenizer=tok)
    return str(d)


@pytest.fixture(scope="module")
def prompts(tmp_path_factory):
    text = "Mix the flour and the eggs, then add the milk slowly while stirring. " * 8
    recs = [{"instruction": f"Explain step {i} of making crepes.", "input": "", "output": text} for i in range(3)]
    p = tmp_path_factory.mktemp("data") / "alpaca.jsonl"
    p.write_bytes(b"".join(orjson.dumps(r) + b"\n" for r in recs))
    return p


def test_bench_engine_record(tiny_model_dir, prompts):
    r = bench_engine(tiny_model_dir, batch=2, max_tokens=3, prompts=prompts)
    assert set(r["peers"]) == {"native", "hf"}
    for p in r["peers"].values():
        assert p["tokens"] == 6 and p["seconds"] > 0 and p["tokens_per_s"] > 0
    assert set(r["ratio_vs_hf"]) == {"native"} and r["ratio_vs_hf"]["native"] > 0
    assert r["same_as_hf"] == {"native": 2}  # greedy parity: both peers computed the same tokens
    assert r["prompt_tokens"] > 0 and "native" in format_engine(r)
    orjson.dumps(r)  # a JSON record


def test_bench_engine_on_a_minicpm_model(prompts):
    # transformers has no MiniCPM class: its peer loads the exact Llama export, so greedy tokens agree
    r = bench_engine("cpm-tiny", batch=2, max_tokens=4, prompts=prompts)
    assert r["device"] == "cpu" and r["peers"]["native"]["tokens"] == 8 and r["peers"]["hf"]["tokens"] == 8
    assert r["same_as_hf"]["native"] >= 1 and "cpu" in format_engine(r)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_bench_engine_on_cuda_times_graphs_and_eager(prompts):
    r = bench_engine("cpm-tiny", batch=3, max_tokens=8, prompts=prompts, device="cuda")
    assert set(r["peers"]) == {"native", "native_eager", "hf"}
    assert r["graphs_same_as_eager"] == 3  # the replayed graphs give the eager tokens


def test_bench_spec_record(tiny_model_dir, prompts):
    r = bench_spec(tiny_model_dir, methods=("ngram", "draft"), draft_model="self:1", spec_tokens=3, n_prompts=2,
                   batch=2, max_tokens=8, prompts=prompts)
    assert set(r["runs"]) == {"plain", "ngram", "draft"}
    assert r["runs"]["plain"]["tokens"] == 16
    for m in ("ngram", "draft"):
        run = r["runs"][m]
        assert run["identical"] is True and run["tokens"] == 16 and run["speedup"] > 0
        assert 0 <= run["acceptance_rate"] <= 1 and run["tokens_per_step"] >= 1
    assert r["runs"]["draft"]["draft_model"] == "self:1" and "identical: True" in format_engine(r)


def test_bench_input_errors(tmp_path, prompts):
    with pytest.raises(InputError, match="3 usable records, 5 needed"):
        load_instructions(prompts, 5)
    with pytest.raises(InputError, match="cannot read"):
        load_instructions(tmp_path / "missing.jsonl", 1)
    with pytest.raises(ConfigError, match="--methods"):
        bench_spec("x", methods=("eagle",))
    with pytest.raises(ConfigError, match="valid: cpu, cuda"):
        bench_engine("cpm-tiny", prompts=prompts, batch=1, device="mps")
    if not torch.cuda.is_available():
        with pytest.raises(ConfigError, match="no CUDA device"):
            bench_engine("cpm-tiny", prompts=prompts, batch=1, device="cuda")
