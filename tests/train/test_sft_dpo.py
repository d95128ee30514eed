"""SFT (reply-only labels, packing) and DPO on the tiny random MiniCPM."""

from __future__ import annotations

import json
import math
import sys

import pytest
import torch

from cpmtool.train.config import DPOConfig, SFTConfig


@pytest.fixture(scope="module")
def tok_and_model(tiny_model_dir):
    from cpmtool.model.loader import load_model
    from cpmtool.model.tokenizer import load_tokenizer

    return load_tokenizer(tiny_model_dir), load_model(tiny_model_dir)[0]


def test_sft_labels_cover_the_assistant_reply_only(tok_and_model):
    from cpmtool.train.sequences import sft_example

    tok, model = tok_and_model
    rec = {"messages": [{"role": "user", "content": "Compute 12+30."},
                        {"role": "assistant", "content": "2+0=2\n1+3=4\n\\boxed{42}"}]}
    ids, labels = sft_example(tok, rec, tok.eos_token_id, 512)
    assert len(ids) == len(labels) and labels[-1] == -100
    learned = tok.decode([t for t in labels if t != -100])
    # the reply and the end-of-turn the template adds after it; nothing of the prompt
    assert learned == "2+0=2\n1+3=4\n\\boxed{42}<|im_end|>\n"
    # labels[t] is the token at t + 1: the first labelled target follows the generation prompt
    first = next(i for i, t in enumerate(labels) if t != -100)
    assert tok.decode(ids[: first + 1]).endswith("<|im_start|>assistant\n")
    # prompt + completion is the same example as a user/assistant pair
    ids2, labels2 = sft_example(tok, {"prompt": "Compute 12+30.", "completion": "2+0=2\n1+3=4\n\\boxed{42}"},
                                tok.eos_token_id, 512)
    assert (ids2, labels2) == (ids, labels)
    # truncation keeps what fits
    ids3, labels3 = sft_example(tok, rec, tok.eos_token_id, first + 3)
    assert len(ids3) == first + 3 and sum(t != -100 for t in labels3) == 2


def test_packed_rows_compute_the_per_example_losses(tok_and_model):
    import torch.nn.functional as F

    from cpmtool.train.sft import collate, pack_examples, packed

    tok, model = tok_and_model
    exs = [([5, 6, 7, 8], [6, 7, 8, -100]), ([9, 10, 11], [-100, 11, -100]), ([12, 13, 14, 15, 16], [13, 14, 15, 16, -100])]
    rows = pack_examples(exs, max_len=8)
    assert [len(r) for r in rows] == [2, 1]  # 4 + 3 fit in 8, the third starts a row
    ids, labels, pos = collate(rows, pad_id=0)
    assert pos[0].tolist() == [0, 1, 2, 3, 0, 1, 2] and pos[1].tolist() == [0, 1, 2, 3, 4, 5, 6]
    assert labels[1].tolist()[5:] == [-100, -100]  # padding is never a target
    with torch.no_grad(), packed(model):
        logits = model(ids, pos)
    got = F.cross_entropy(logits.reshape(-1, logits.shape[-1]), labels.reshape(-1), ignore_index=-100, reduction="sum")
    want = 0.0
    with torch.no_grad():
        for i, lab in exs:  # the reference: each example alone, plain causal attention
            lg = model(torch.tensor([i]))
            want += F.cross_entropy(lg[0], torch.tensor(lab), ignore_index=-100, reduction="sum")
    assert torch.allclose(got, want, rtol=1e-5)
    # without the block-diagonal mask the second example would see the first: a different loss
    with torch.no_grad():
        leak = F.cross_entropy(model(ids, pos).reshape(-1, logits.shape[-1]), labels.reshape(-1), ignore_index=-100,
                               reduction="sum")
    assert not torch.allclose(leak, want, rtol=1e-5)


@pytest.fixture
def sft_data(tmp_path):
    from cpmtool.data import tasks

    recs = list(tasks.generate("arithmetic", "train", 12, 0, level=1, with_solution=True))
    p = tmp_path / "sft.jsonl"
    lines = [json.dumps({"prompt": r["prompt"], "completion": r["solution"]}) for r in recs]
    lines += ["not json", json.dumps({"prompt": "no completion"})]
    p.write_text("\n".join(lines) + "\n")
    return p


@pytest.mark.parametrize("pack", [False, True])
def test_sft_learns_the_training_set(tiny_model_dir, sft_data, tmp_path, pack):
    from cpmtool.train.sft import train_sft

    out = tmp_path / "sft"
    res = train_sft(SFTConfig(model=str(tiny_model_dir), data=str(sft_data), out=str(out), epochs=24 if pack else 8,
                              batch_size=4, lr=1e-2, pack=pack, max_len=128, threads=1, save_every=5))
    rows = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    run = json.loads((out / "run.json").read_text())
    # 12 examples of ~40-60 tokens: 12 rows unpacked, a few rows of <= 128 tokens packed
    assert (run["rows"] == 12) if not pack else (2 <= run["rows"] <= 6)
    assert len(rows) == res["steps"] == (24 if pack else 8) * -(-run["rows"] // 4)
    assert rows[-1]["loss"] < 0.6 * rows[0]["loss"]
    assert run["examples"] == 12 and run["rejected"] == {"bad_json": 1, "no_messages_or_prompt_completion": 1}
    assert run["malloc"] == ("kept" if sys.platform == "linux" else "not_glibc")
    assert (out / "model" / "model.safetensors").is_file() and (out / "curves.png").is_file()


@pytest.mark.parametrize("pack", [False, True])
def test_per_example_rows_train_as_the_collated_rows(sft_data, tmp_path, pack, monkeypatch):
    # cpm-tiny (head_dim 64) takes the packed-attention path: each example its own packed row, the
    # LM head on the labelled tokens; the same losses and gradient norms as the collated (B, T) rows
    from cpmtool.model.loader import load_model
    from cpmtool.train.sft import SFTRecipe, train_sft

    if not load_model("cpm-tiny")[0].packs_attention():
        pytest.skip("the varlen attention kernel is not built here")
    ran = []
    real = SFTRecipe.example_loss
    monkeypatch.setattr(SFTRecipe, "example_loss", lambda self, exs: ran.append(len(exs)) or real(self, exs))

    def run(per_example):
        monkeypatch.setattr(SFTRecipe, "per_example", per_example)
        out = tmp_path / f"sft-{per_example}"
        train_sft(SFTConfig(model="cpm-tiny", data=str(sft_data), out=str(out), steps=3, batch_size=4, lr=1e-3,
                            pack=pack, max_len=128, threads=1))
        return [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]

    fast = run(True)
    assert ran and (sum(ran) > 3 * 4 if pack else ran == [4, 4, 4])  # packed rows hold several examples
    ran.clear()
    slow = run(False)
    assert not ran
    for a, b in zip(fast, slow, strict=True):
        assert a["tokens"] == b["tokens"]
        assert a["loss"] == pytest.approx(b["loss"], rel=1e-5)
        assert a["grad_norm"] == pytest.approx(b["grad_norm"], rel=1e-4)


def test_dpo_starts_at_ln2_and_raises_the_margin(tiny_model_dir, tmp_path):
    from cpmtool.data import tasks
    from cpmtool.train.dpo import train_dpo

    recs = list(tasks.generate("arithmetic", "train", 8, 0, level=1, with_solution=True))
    pairs = [{"prompt": r["prompt"], "chosen": r["solution"],
              "rejected": r["solution"].replace(f"\\boxed{{{r['answer']}}}", "\\boxed{0}")} for r in recs]
    data = tmp_path / "pairs.jsonl"
    data.write_text("".join(json.dumps(p) + "\n" for p in pairs))
    out = tmp_path / "dpo"
    train_dpo(DPOConfig(model=str(tiny_model_dir), data=str(data), out=str(out), epochs=6, batch_size=4,
                        lr=3e-3, beta=0.5, threads=1))
    rows = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    # policy == reference at the first step: margin 0, loss -log sigmoid(0) = ln 2
    assert rows[0]["loss"] == pytest.approx(math.log(2), abs=1e-6) and rows[0]["reward_margin"] == pytest.approx(0, abs=1e-6)
    assert rows[-1]["reward_margin"] > 0.5 and rows[-1]["loss"] < math.log(2) - 0.1
    assert rows[-1]["pair_accuracy"] == 1.0
