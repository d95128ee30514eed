"""`make demo` (pipelines/demo.sh), one of the README's two set-up commands, runs to the end."""

import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]


@pytest.mark.slow
def test_demo_runs_end_to_end(tmp_path):
    if not (REPO / ".venv" / "bin" / "python").exists():
        pytest.skip("the demo runs from the repository's .venv (make install creates it)")
    env = {**os.environ, "OUT": str(tmp_path / "demo"), "CPMTOOL": str(Path(sys.executable).parent / "cpmtool")}
    p = subprocess.run(["bash", "pipelines/demo.sh"], cwd=REPO, env=env, capture_output=True, text=True,
                       timeout=1800)
    assert p.returncode == 0, p.stdout[-2000:] + p.stderr[-2000:]
    assert "Traceback" not in p.stderr and ": error:" not in p.stderr, p.stderr[-2000:]
    # every step printed its result: graded greedy answers, the vote, the chat answers
    assert "cpm-tiny greedy: " in p.stdout and "majority-vote accuracy" in p.stdout
    assert "The capital of France is Paris" in p.stdout
    # synth-if -> annotate-pref -> train-dpo on three Alpaca seeds (the chain)
    if "alpaca_seed.jsonl not found" not in p.stdout:
        assert "preference pairs (pass vs fail)" in p.stdout and ": chosen " in p.stdout
        assert "dpo step 2: loss" in p.stdout
    assert p.stdout.rstrip().endswith(f"demo outputs are in {tmp_path / 'demo'}/")
