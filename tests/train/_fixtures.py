"""Session fixtures shared by tests/train and tests/cli/test_train_*: a tiny random MiniCPM with
cpm-tiny's tokenizer recipe, and prompt files of the synthetic arithmetic task (a few seconds)."""

from __future__ import annotations

import json

import pytest


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory):
    """A 2-layer, 32-wide random MiniCPM (μP scales on) with a BPE tokenizer trained on the tasks."""
    import torch

    from cpmtool.data import tasks
    from cpmtool.model import tiny
    from cpmtool.model.transformer import Transformer

    corpus = []
    for task in tasks.TASKS:
        for rec in tasks.generate(task, "train", 200, 1, with_solution=True):
            corpus += [rec["prompt"], rec["solution"]]
    corpus += ["user", "assistant", "system"]
    tok = tiny.train_tokenizer(corpus, vocab_size=320)
    config = tiny.tiny_config(tok, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                              num_attention_heads=4, num_key_value_heads=2, dim_model_base=16)
    torch.manual_seed(0)
    model = Transformer(config)
    tiny.init_mup(model, 0.1)
    out = tmp_path_factory.mktemp("tiny") / "model"
    tiny.save_tiny(model, tok, out)
    return out


def write_jsonl(path, records):
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    return path


@pytest.fixture(scope="session")
def arith_prompts(tmp_path_factory):
    from cpmtool.data import tasks

    d = tmp_path_factory.mktemp("prompts")
    recs = list(tasks.generate("arithmetic", "train", 16, 0, level=1, with_solution=True))
    for r in recs:
        r["reference"] = r["solution"]  # an off-policy trace for LUFFY
    train = write_jsonl(d / "train.jsonl", recs)
    test = write_jsonl(d / "test.jsonl", list(tasks.generate("arithmetic", "test", 6, 0, level=1)))
    return train, test
