"""`cpmtool train-rl` through the real CLI: --config precedence, one-line errors, fit-entropy,
and `torchrun --nproc-per-node 2` data parallelism matching one process."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "train"))
from _fixtures import arith_prompts, tiny_model_dir  # noqa: E402,F401,F811  (session fixtures shared with tests/train)


def run(args, cwd, timeout=600, launcher=None):
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "CPMTOOL_PROGRESS": "0", "OMP_NUM_THREADS": "1",
           "CPMTOOL_HOME": str(Path(cwd) / "home")}
    cmd = (launcher or [sys.executable, "-m", "cpmtool"]) + args
    return subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, env=env, cwd=cwd)


@pytest.fixture
def setup_files(tmp_path, tiny_model_dir, arith_prompts):  # noqa: F811
    (tmp_path / "even.py").write_text("def even_length(record, completion):\n    return len(completion) % 2 == 0\n")
    cfg = tmp_path / "run.yaml"
    cfg.write_text(f"""# cpmtool train-rl --config run.yaml --steps 2
model: {tiny_model_dir}
prompts: {arith_prompts[0]}
reward: {tmp_path / 'even.py'}:even_length
steps: 1
batch-size: 2
n: 4
max_tokens: 10
lr: 0.001
threads: 1
clip_high: 0.28
""")
    return cfg


def test_config_file_then_flags(setup_files, tmp_path):
    r = run(["train-rl", "--config", str(setup_files), "--steps", "2", "--out", "out"], tmp_path)
    assert r.returncode == 0, r.stderr
    lines = r.stdout.splitlines()
    assert len(lines) == 1 and json.loads(lines[0])["last"]["step"] == 2  # stdout: one JSON result
    cfg = json.loads((tmp_path / "out" / "run.json").read_text())["config"]
    assert cfg["steps"] == 2  # the flag beats the file
    assert cfg["clip_high"] == 0.28 and cfg["n"] == 4  # the file beats the defaults
    assert cfg["clip_low"] == 0.2  # untouched default
    assert len((tmp_path / "out" / "metrics.jsonl").read_text().splitlines()) == 2


def test_errors_are_one_line_exit_2(setup_files, tmp_path):
    r = run(["train-rl", "--config", str(setup_files), "--algo", "ppo", "--out", "o"], tmp_path)
    assert r.returncode == 2
    assert r.stderr.strip().splitlines()[-1] == "cpmtool train-rl: error: --algo 'ppo' is not one of: grpo, prime, nft, luffy, ttrl"
    bad = tmp_path / "bad.yaml"
    bad.write_text("stepz: 3\nlr: fast\n")
    r = run(["train-rl", "--config", str(bad), "--prompts", "p", "--out", "o"], tmp_path)
    assert r.returncode == 2
    assert "unknown setting 'stepz'" in r.stderr and "setting 'lr' must be float" in r.stderr
    assert "Traceback" not in r.stderr


def test_fit_entropy_recovers_the_law(tmp_path):
    # R = -0.3 e^H + 0.9 exactly, on 8 steps
    rows = [{"step": k, "entropy": h, "accuracy": -0.3 * math.exp(h) + 0.9}
            for k, h in enumerate([1.2, 1.0, 0.8, 0.7, 0.5, 0.4, 0.3, 0.2], 1)]
    m = tmp_path / "metrics.jsonl"
    m.write_text("".join(json.dumps(r) + "\n" for r in rows))
    r = run(["train-rl", "fit-entropy", str(m), "--fit-steps", "5"], tmp_path)
    assert r.returncode == 0, r.stderr
    fit = json.loads(r.stdout)
    assert fit["a"] == pytest.approx(0.3) and fit["b"] == pytest.approx(0.9) and fit["ceiling"] == pytest.approx(0.6)
    assert fit["n_fit"] == 5 and fit["n_holdout"] == 3 and fit["rmse_holdout"] < 1e-9 and fit["y"] == "accuracy"
    assert (tmp_path / "entropy_fit.png").stat().st_size > 1000
    m.write_text(json.dumps(rows[0]) + "\n")
    r = run(["train-rl", "fit-entropy", str(m)], tmp_path)
    assert r.returncode == 2 and "the fit needs at least 3" in r.stderr


@pytest.mark.slow
def test_torchrun_two_processes_match_one(setup_files, tmp_path):
    common = ["train-rl", "--config", str(setup_files), "--steps", "3"]
    one = run(common + ["--out", "one"], tmp_path)
    assert one.returncode == 0, one.stderr
    torchrun = [str(Path(sys.executable).parent / "torchrun"), "--nproc-per-node", "2", "--master-port", "29617",
                "-m", "cpmtool"]
    two = run(common + ["--out", "two"], tmp_path, launcher=torchrun)
    assert two.returncode == 0, two.stderr
    assert len(two.stdout.splitlines()) == 1  # only rank 0 prints
    a = [json.loads(x) for x in (tmp_path / "one" / "metrics.jsonl").read_text().splitlines()]
    b = [json.loads(x) for x in (tmp_path / "two" / "metrics.jsonl").read_text().splitlines()]
    assert json.loads((tmp_path / "two" / "run.json").read_text())["world_size"] == 2
    assert len(a) == len(b) == 3
    for ra, rb in zip(a, b, strict=True):
        # the same samples (seeded per prompt draw), the same advantages, the same gradient:
        # DDP's average of per-rank losses normalised by the global token count is the full-batch loss
        for key in ("reward", "accuracy", "response_length", "gen_tokens", "groups_kept"):
            assert ra[key] == rb[key], key
        for key in ("loss", "grad_norm", "entropy", "clip_frac", "ppo_kl"):
            assert rb[key] == pytest.approx(ra[key], rel=1e-4, abs=1e-6), key
