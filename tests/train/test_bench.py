"""`cpmtool bench train-rl`: our GRPO throughput, and TRL's on the same configuration when installed."""

from __future__ import annotations

import json

import pytest


def test_bench_ours_alone(tiny_model_dir, arith_prompts):
    from cpmtool.train.bench import bench_train_rl

    seen = []
    rows = bench_train_rl(str(tiny_model_dir), prompts=str(arith_prompts[0]), compare=None, batch_size=2, n=4,
                          max_tokens=8, steps=2, warmup=1, threads=1, repeat=3, progress=seen.append)
    assert len(rows) == 1 and rows[0]["trainer"] == "cpmtool"
    r = rows[0]
    assert r["steps"] == 2 and r["samples"] == 16 and r["samples_per_s"] > 0 and r["n"] == 4
    # the step's split adds up to the step: 2 steps of rollout + update in `seconds`
    assert r["rollout_s_per_step"] > 0 and r["update_s_per_step"] > 0
    assert abs(2 * (r["rollout_s_per_step"] + r["update_s_per_step"]) - r["seconds"]) < 0.01
    # three rounds: the row is the median one, and every round's figure is kept
    assert r["rounds"] == 3 and sorted(r["samples_per_s_runs"])[1] == r["samples_per_s"]
    assert [s.split(":")[0] for s in seen] == ["round 1/3", "round 2/3", "round 3/3"]


def test_bench_rejects_unknown_comparison():
    from cpmtool.errors import ConfigError
    from cpmtool.train.bench import bench_train_rl

    with pytest.raises(ConfigError, match="valid: trl"):
        bench_train_rl("cpm-tiny", compare="openrlhf")
    with pytest.raises(ConfigError, match="valid: cpu, cuda"):
        bench_train_rl("cpm-tiny", compare=None, device="tpu")


def test_bench_on_cuda_needs_a_cuda_device():
    import torch

    from cpmtool.errors import ConfigError
    from cpmtool.train.bench import bench_train_rl

    if torch.cuda.is_available():
        pytest.skip("a CUDA device is present: pipelines/gpu_train_check.sh runs the bench on it")
    with pytest.raises(ConfigError, match="no CUDA device"):
        bench_train_rl("cpm-tiny", compare=None, device="cuda")


@pytest.mark.slow
def test_bench_against_trl(tiny_model_dir, arith_prompts, capfd):
    pytest.importorskip("trl")
    from cpmtool.train.bench import bench_train_rl

    rows = bench_train_rl(str(tiny_model_dir), prompts=str(arith_prompts[0]), compare="trl", batch_size=2, n=4,
                          max_tokens=8, steps=2, warmup=1, threads=1, repeat=3)
    assert [r["trainer"] for r in rows] == ["cpmtool", "trl", "ratio"]
    assert rows[1]["samples"] == 16 and rows[1]["samples_per_s"] > 0 and len(rows[1]["samples_per_s_runs"]) == 3
    # the ratio is the median of the per-round ratios
    per_round = [a / b for a, b in zip(rows[0]["samples_per_s_runs"], rows[1]["samples_per_s_runs"], strict=True)]
    assert rows[2]["ratio_runs"] == [round(x, 2) for x in per_round]
    assert rows[2]["samples_per_s_ratio"] == pytest.approx(sorted(per_round)[1], abs=0.006)
    # TRL runs in a worker process that shares our stdout: its log printer is removed, stdout stays for data
    assert capfd.readouterr().out == ""
    json.dumps(rows)


@pytest.mark.parametrize("bench", ["train-rl", "engine", "all"])
def test_a_bad_device_is_one_line_through_the_cli(capsys, bench):
    from cpmtool.cli.app import main

    with pytest.raises(SystemExit) as e:
        main(["bench", bench, "--device", "tpu"])
    err = capsys.readouterr().err.strip().splitlines()
    assert e.value.code == 2 and err == ["cpmtool bench: error: --device 'tpu': valid: cpu, cuda"]
