"""cpm-tiny: the shipped weights and tokenizer, the batched decoder, and a short run of the recipe."""

from __future__ import annotations

import json

import pytest
import torch

from cpmtool.data import tasks
from cpmtool.model import tiny


@pytest.fixture(autouse=True)
def home(tmp_path, monkeypatch):
    monkeypatch.setenv("CPMTOOL_HOME", str(tmp_path / "home"))


@pytest.fixture(scope="module")
def shipped():
    # decoding a 2M model is latency-bound: one thread is as fast and does not stall on a busy machine
    torch.set_num_threads(1)
    return tiny.load_tiny()


def test_shipped_directory_is_a_minicpm_checkpoint():
    d = tiny.WEIGHTS_DIR
    for f in ("config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json",
              "generation_config.json", "card.json"):
        assert (d / f).is_file(), f
    cfg = json.loads((d / "config.json").read_text())
    assert cfg["model_type"] == "minicpm" and cfg["architectures"] == ["MiniCPMForCausalLM"]
    # the shipped recipe keeps scale_depth/sqrt(L) and neutral embedding/logit multipliers (tiny.RECIPE)
    assert cfg["scale_depth"] and cfg["dim_model_base"] and "scale_emb" in cfg
    assert cfg["num_key_value_heads"] < cfg["num_attention_heads"] and cfg["tie_word_embeddings"]
    assert (d / "model.safetensors").stat().st_size < 40 * 2**20
    card = json.loads((d / "card.json").read_text())
    assert 2_000_000 <= card["params"] <= 10_000_000
    assert card["params"] == sum(p.numel() for p in tiny.load_tiny()[0].parameters())
    assert 0.2 <= card["eval"]["arithmetic"]["greedy"] <= 0.7
    assert "eval" in card["eval_command"]


def test_shipped_tokenizer_round_trips_with_single_digit_tokens(shipped):
    _, tok = shipped
    for text in ("Compute 70592+76332.", "12-7=5 b1\n\\boxed{(16+5+17)*8}", "Use 8, 16, 5 to make 29.",
                 "héllo wörld ∑ 👋"):
        assert tok.decode(tok(text, add_special_tokens=False)["input_ids"]) == text
    pieces = tok.convert_ids_to_tokens(tok("9081726354", add_special_tokens=False)["input_ids"])
    assert pieces == list("9081726354")
    assert len(tok) <= 1024


def test_chat_template_renders_chatml_offline():
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(str(tiny.WEIGHTS_DIR))
    text = tok.apply_chat_template([{"role": "user", "content": "Compute 1+2."}], add_generation_prompt=True,
                                   tokenize=False)
    assert text == "<s><|im_start|>user\nCompute 1+2.<|im_end|>\n<|im_start|>assistant\n"
    ids = tiny.prompt_ids(tok, {"prompt": "Compute 1+2."})
    assert ids[0] == tok.bos_token_id and tok.convert_ids_to_tokens(ids[1]) == "<|im_start|>"


def test_batched_decode_matches_the_reference_greedy_loop(shipped):
    model, tok = shipped
    recs = list(tasks.generate("arithmetic", "test", 6, seed=5)) + list(tasks.generate("countdown", "test", 3))
    prompts = [tiny.prompt_ids(tok, r) for r in recs]
    stop = tiny.stop_ids(tok)
    batched = tiny.generate_ids(model, prompts, 64, stop, batch_size=4)
    for p, b in zip(prompts, batched, strict=True):
        assert b == model.greedy(p, 64, stop)


def test_shipped_model_solves_a_fair_share_of_the_test_split(shipped):
    model, tok = shipped
    recs = list(tasks.generate("arithmetic", "test", 50, seed=0))
    outs = tiny.complete(model, tok, recs)
    ok = [tasks.grade(r, o[0]) for r, o in zip(recs, outs, strict=True)]
    assert sum(ok) / len(recs) > 0.1
    by_level = {lv: sum(c for r, c in zip(recs, ok, strict=True) if r["level"] == lv) for lv in (1, 5)}
    assert by_level[1] > by_level[5]  # the levels are levels
    assert tiny.evaluate_tasks(model, tok, recs[:10]) == sum(ok[:10]) / 10


def test_sampling_is_seeded_and_differs_from_greedy(shipped):
    model, tok = shipped
    recs = list(tasks.generate("arithmetic", "test", 4, seed=1, level=3))  # level 3: the model is unsure there, samples vary
    a = tiny.complete(model, tok, recs, temperature=1.0, n=3, seed=7)
    b = tiny.complete(model, tok, recs, temperature=1.0, n=3, seed=7)
    assert a == b
    assert len({s for ss in a for s in ss}) > len(recs)  # the samples are not all alike


def test_wsd_schedule_warms_up_holds_and_decays():
    lr = [tiny.wsd_lr(s, 100, warmup=0.1, decay=0.2) for s in range(100)]
    assert lr[0] == pytest.approx(0.1) and lr[9] == pytest.approx(1.0)
    assert all(v == 1.0 for v in lr[10:80])
    assert lr[80] == 1.0 and lr[90] == pytest.approx(0.1**0.5) and lr[99] < lr[90]


def test_recipe_writes_a_loadable_directory(tmp_path):
    card = tiny.train_tiny(tmp_path / "run", steps=4, seed=1, threads=2, evaluate=False, hidden_size=64,
                           intermediate_size=128, num_hidden_layers=2, batch_size=4, dim_model_base=16)
    assert card["recipe"]["steps"] == 4
    assert card["train_tokens"] > 0 and card["params"] < 200_000
    model, tok = tiny.load_tiny(tmp_path / "run")
    assert model.config.family == "minicpm" and model.config.logit_divisor == 4.0
    assert torch.equal(model.lm_head.weight, model.model.embed_tokens.weight)
    (out,) = tiny.complete(model, tok, [{"prompt": "Compute 1+2."}], max_new_tokens=4)
    assert isinstance(out[0], str)
