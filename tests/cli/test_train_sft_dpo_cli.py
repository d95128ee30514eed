"""`cpmtool train-sft` and `cpmtool train-dpo` through the real CLI."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "train"))
from _fixtures import tiny_model_dir  # noqa: E402,F401,F811  (session fixture shared with tests/train)


def run(args, cwd):
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "CPMTOOL_PROGRESS": "0", "CPMTOOL_HOME": str(Path(cwd) / "home")}
    return subprocess.run([sys.executable, "-m", "cpmtool", *args], capture_output=True, text=True, timeout=600,
                          env=env, cwd=cwd)


def test_sft_and_dpo_commands(tiny_model_dir, tmp_path):  # noqa: F811
    sft = tmp_path / "sft.jsonl"
    sft.write_text("".join(json.dumps({"messages": [{"role": "user", "content": f"Compute {i}+1."},
                                                    {"role": "assistant", "content": f"\\boxed{{{i + 1}}}"}]}) + "\n"
                           for i in range(4)))
    r = run(["train-sft", "--model", str(tiny_model_dir), "--data", str(sft), "--out", "s", "--batch-size", "2",
             "--pack", "--threads", "1"], tmp_path)
    assert r.returncode == 0, r.stderr
    assert json.loads(r.stdout)["steps"] == 1  # 4 short examples pack into one row: one batch
    assert json.loads((tmp_path / "s" / "run.json").read_text())["config"]["pack"] is True
    pairs = tmp_path / "pairs.jsonl"
    pairs.write_text(json.dumps({"prompt": "Compute 1+1.", "chosen": "\\boxed{2}", "rejected": "\\boxed{3}"}) + "\n")
    r = run(["train-dpo", "--model", str(tiny_model_dir), "--data", str(pairs), "--out", "d", "--beta", "0.2",
             "--threads", "1"], tmp_path)
    assert r.returncode == 0, r.stderr
    last = json.loads(r.stdout)["last"]
    assert last["step"] == 1 and abs(last["loss"] - 0.6931472) < 1e-5
    r = run(["train-dpo", "--model", str(tiny_model_dir), "--data", str(sft), "--out", "d2"], tmp_path)
    assert r.returncode == 2
    assert r.stderr.strip().endswith("no usable preference records (rejected: {'no_chosen_rejected': 4})")
