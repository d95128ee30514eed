"""`cpmtool quantize-ternary` end to end through the CLI on cpm-tiny (a few steps), and its flag errors."""

import json
import subprocess
import sys

import orjson
import pytest

from cpmtool.data import tasks
from cpmtool.model.loader import load_model
from cpmtool.quant.qat import distill_kl

CPMTOOL = [sys.executable, "-m", "cpmtool"]


def test_distill_kl_by_hand():
    import math

    import torch

    teacher = torch.tensor([[[0.0, math.log(3.0)], [5.0, 0.0]]])  # p_T = (1/4, 3/4) at position 0
    student = torch.tensor([[[0.0, 0.0], [0.0, 9.0]]])  # p_S = (1/2, 1/2); position 1 is unlabelled
    labels = torch.tensor([[1, -100]])
    want = 0.25 * math.log(0.25 / 0.5) + 0.75 * math.log(0.75 / 0.5)  # 0.130812
    assert distill_kl(student, teacher, labels).item() == pytest.approx(want, abs=1e-6)
    assert distill_kl(teacher, teacher, labels).item() == pytest.approx(0.0, abs=1e-7)
    # temperature 2: p_T = softmax(0, ln3 / 2) = (1/(1+sqrt3), sqrt3/(1+sqrt3)), student uniform, times T^2
    a = 1 / (1 + math.sqrt(3))
    want_t2 = 4 * (a * math.log(a / 0.5) + (1 - a) * math.log((1 - a) / 0.5))
    assert distill_kl(student, teacher, labels, temperature=2.0).item() == pytest.approx(want_t2, abs=1e-6)


def test_training_examples_from_tasks_and_text():
    from cpmtool.model.tokenizer import load_tokenizer
    from cpmtool.quant.qat import as_sft_record, text_example

    rec = next(tasks.generate("arithmetic", "train", 1, 0, level=1, with_solution=True))
    sft = as_sft_record(rec)
    assert sft["messages"][-1] == {"role": "assistant", "content": rec["solution"]}
    assert as_sft_record({"prompt": "a", "completion": "b"}) == {"prompt": "a", "completion": "b"}
    tok = load_tokenizer("cpm-tiny")
    ids, labels = text_example(tok, {"text": "Compute 12"}, eos=4, max_len=100)
    assert ids[-1] == 4 and labels == ids[1:] + [-100]


@pytest.mark.slow
def test_cli_end_to_end(tmp_path):
    data = tmp_path / "train.jsonl"
    data.write_bytes(b"".join(orjson.dumps(r) + b"\n" for r in
                              tasks.generate("arithmetic", "train", 12, 0, level=1, with_solution=True)))
    out = tmp_path / "run"
    p = subprocess.run([*CPMTOOL, "quantize-ternary", "--model", "cpm-tiny", "--data", str(data), "--steps", "2",
                        "--batch-size", "2", "--max-len", "96", "--group-size", "32", "--distill", "--eval-n", "2",
                        "--eval-task-n", "2", "--threads", "1", "--out", str(out)],
                       capture_output=True, timeout=900)
    assert p.returncode == 0, p.stderr.decode()
    card = json.loads(p.stdout)
    assert card == json.loads((out / "card.json").read_text())
    assert set(card["eval"]) == {"full_precision", "ptq_naive", "qat"}
    for ev in card["eval"].values():
        assert ev["heldout_ppl"] > 1 and 0 <= ev["arithmetic_accuracy"] <= 1
    assert card["steps"] == 2 and card["group_size"] == 32 and card["bits_per_weight"] == 2.5  # + bf16 / 32
    assert card["file_bytes"] < card["bf16_bytes"] / 4
    assert "| ternary QAT |" in (out / "README.md").read_text()
    rows = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == [1, 2] and all("kl" in r and "ce" in r for r in rows)
    run = json.loads((out / "run.json").read_text())
    assert run["examples"] == 10  # 12 records, the last 2 held out for perplexity
    model, _ = load_model(out / "model")
    assert type(model.model.layers[0].mlp.up_proj).__name__ == "PackedTernaryLinear"
    again = subprocess.run([*CPMTOOL, "quantize-ternary", "--model", str(out / "model"), "--data", str(data),
                            "--eval-n", "2", "--out", str(tmp_path / "again")], capture_output=True, timeout=300)
    assert again.returncode == 2 and b"is already ternary" in again.stderr, again.stderr.decode()


@pytest.mark.parametrize("flags, message", [
    (["--act-bits", "4"], "--act-bits must be 8 or 16"),
    (["--group-size", "100"], "--group-size 100 does not divide"),
])
def test_cli_flag_errors(tmp_path, flags, message):
    data = tmp_path / "d.jsonl"
    data.write_text('{"prompt": "a", "completion": "b"}\n' * 80)
    p = subprocess.run([*CPMTOOL, "quantize-ternary", "--data", str(data), "--out", str(tmp_path / "o"), *flags],
                       capture_output=True, timeout=300)
    err = p.stderr.decode()
    assert p.returncode == 2 and err.count("\n") == 1 and message in err, err
