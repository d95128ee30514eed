"""bench score: pass@k, maj@k, token economy against values computed by hand; the CLI on real files;
bench eval end to end on cpm-tiny, its accuracy equal to grading the samples it wrote."""

import math
import subprocess
import sys

import orjson
import pytest

from cpmtool.bench.score import (
    budget_accuracy,
    default_ks,
    load_samples,
    majority_correct,
    pass_at_k,
    sample_problem,
    score_samples,
    summarize,
)

CPMTOOL = [sys.executable, "-m", "cpmtool"]


# ---------------------------------------------------------------- pass@k


@pytest.mark.parametrize(("n", "c", "k", "want"), [
    (5, 2, 1, 2 / 5),  # pass@1 is c/n
    (5, 2, 2, 1 - 3 / 10),  # 1 - C(3,2)/C(5,2)
    (4, 1, 2, 1 - 3 / 6),  # 1 - C(3,2)/C(4,2)
    (4, 2, 2, 1 - 1 / 6),  # 1 - C(2,2)/C(4,2)
    (3, 0, 1, 0.0),
    (4, 3, 2, 1.0),  # n - c < k: every k-subset holds a correct sample
    (4, 4, 4, 1.0),
    (4, 1, 4, 1.0),
    (8, 1, 4, 1 - 35 / 70),  # 1 - C(7,4)/C(8,4)
])
def test_pass_at_k_by_hand(n, c, k, want):
    assert pass_at_k(n, c, k) == pytest.approx(want, abs=1e-12)


def test_pass_at_k_equals_the_binomial_form():
    for n in range(1, 12):
        for c in range(n + 1):
            for k in range(1, n + 1):
                assert pass_at_k(n, c, k) == pytest.approx(1 - math.comb(n - c, k) / math.comb(n, k), abs=1e-12)


@pytest.mark.parametrize(("n", "c", "k"), [(4, 5, 1), (4, 1, 5), (4, 1, 0), (4, -1, 1)])
def test_pass_at_k_rejects_impossible_counts(n, c, k):
    with pytest.raises(ValueError):
        pass_at_k(n, c, k)


def test_default_ks():
    assert default_ks(1) == [1]
    assert default_ks(8) == [1, 2, 4, 8]
    assert default_ks(6) == [1, 2, 4, 6]


# ---------------------------------------------------------------- maj@k


def test_majority_correct_on_literal_answers():
    # 18 and 18.0 are one answer (two votes) and beat 17; the first sample that gave it is graded
    assert majority_correct(["18", "18.0", "17", None], [True, True, False, False]) is True
    assert majority_correct(["3", "4", "4"], [True, False, False]) is False
    assert majority_correct(["5", "6"], [False, True]) is False  # a tie goes to the answer seen first
    assert majority_correct(["6", "5"], [True, False]) is True
    assert majority_correct([None, None], [False, False]) is False  # no answer: no majority to be right
    assert majority_correct(["1"], [None]) is None  # nothing graded


def _s(group, sample, completion, correct, n_tokens, finish="stop", **kw):
    return {"group": group, "sample": sample, "completion": completion, "correct": correct, "n_tokens": n_tokens,
            "finish_reason": finish, **kw}


# two prompts of 4 samples; see test_summarize_by_hand for the arithmetic
SAMPLES = [
    _s("a", 0, "so \\boxed{7}", True, 10),
    _s("a", 1, "\\boxed{7}", True, 20),
    _s("a", 2, "\\boxed{8}", False, 30),
    _s("a", 3, "I keep going and going", False, 100, "length"),
    _s("b", 3, "\\boxed{2}", False, 5),  # out of order on purpose: maj@k takes samples 0..k-1
    _s("b", 0, "\\boxed{1}", True, 5),
    _s("b", 1, "\\boxed{2}", False, 5),
    _s("b", 2, "The answer is 2.", False, 5),
]


def test_summarize_by_hand():
    r = summarize(SAMPLES, ks=(1, 2, 4), budgets=(8, 25))
    assert (r["prompts"], r["samples"], r["graded"], r["correct"]) == (2, 8, 8, 3)
    assert r["accuracy"] == pytest.approx(3 / 8)
    # pass@1 = mean(2/4, 1/4); pass@2 = mean(1 - 1/6, 1 - 3/6); pass@4 = 1 for both
    assert r["pass@k"] == pytest.approx({"1": 3 / 8, "2": (5 / 6 + 1 / 2) / 2, "4": 1.0})
    # maj@1: the first samples (7 right, 1 right); maj@2: {7,7} right, {1,2} tie -> 1 right;
    # maj@4: a: 7 beats 8 (right), b: 2 has three votes (wrong)
    assert r["maj@k"] == pytest.approx({"1": 1.0, "2": 1.0, "4": 0.5})
    assert r["mean_tokens"] == pytest.approx(180 / 8)
    assert r["mean_tokens_correct"] == pytest.approx((10 + 20 + 5) / 3)
    assert r["tokens_per_correct"] == pytest.approx(180 / 3)
    assert r["over_length_rate"] == pytest.approx(1 / 8)
    # budget 8: only b's correct sample (5 tokens) fits; four samples are longer than 8
    assert r["budgets"]["8"] == pytest.approx({"accuracy": 1 / 8, "over_budget_rate": 4 / 8})
    # budget 25: a0 (10), a1 (20), b0 (5) are correct within it; 30 and 100 are over
    assert r["budgets"]["25"] == pytest.approx({"accuracy": 3 / 8, "over_budget_rate": 2 / 8})


def test_budget_accuracy_edges():
    recs = [_s("a", 0, "x", True, 64), _s("a", 1, "x", True, 65), _s("a", 2, "x", None, 1)]
    assert budget_accuracy(recs, 64) == 0.5  # exactly the budget fits; ungraded samples do not count
    assert budget_accuracy(recs, 65) == 1.0
    assert budget_accuracy([_s("a", 0, "x", None, 1)], 10) is None


def test_ungraded_prompts_and_groups_smaller_than_k():
    recs = [_s("a", 0, "\\boxed{1}", True, 3), _s("a", 1, "\\boxed{2}", False, 3),
            _s("u", 0, "\\boxed{1}", None, 3), _s("u", 1, "\\boxed{1}", None, 3),
            _s("c", 0, "\\boxed{4}", False, 3)]
    r = summarize(recs, ks=(1, 2))
    assert r["prompts"] == 3 and r["graded"] == 3
    assert r["accuracy"] == pytest.approx(1 / 3)
    assert r["pass@k"]["1"] == pytest.approx((1 / 2 + 0) / 2)  # u has no grades: left out
    assert r["pass@k"]["2"] == pytest.approx(1.0)  # only a has 2 samples
    assert summarize([], ks=(1,))["accuracy"] is None


def test_score_samples_one_row_per_model_with_the_same_ks():
    recs = [dict(r, model="m1") for r in SAMPLES] + [
        _s("a", 0, "\\boxed{7}", True, 12, model="m2"), _s("a", 1, "\\boxed{9}", False, 12, model="m2")]
    rows = score_samples(recs)
    assert [r["model"] for r in rows] == ["m1", "m2"]
    assert list(rows[0]["pass@k"]) == list(rows[1]["pass@k"]) == ["1", "2", "4"]
    assert rows[1]["pass@k"] == {"1": 0.5, "2": 1.0, "4": None}
    assert rows[1]["tokens_per_correct"] == 24.0
    rows = score_samples(recs, by="group")
    assert [r["group"] for r in rows] == ["a", "b"]


def test_sample_problem_reasons():
    assert sample_problem(_s("a", 0, "x", True, 3)) is None
    assert sample_problem({"n_tokens": 3}) == "no_completion"
    assert sample_problem(_s("a", 0, "x", True, "3")) == "bad_n_tokens"
    assert sample_problem(_s("a", 0, "x", True, -1)) == "bad_n_tokens"
    assert sample_problem(_s("a", 0, "x", "yes", 3)) == "bad_correct"


def _write(path, recs, extra=b""):
    path.write_bytes(b"".join(orjson.dumps(r) + b"\n" for r in recs) + extra)
    return path


def test_load_samples_labels_by_file_and_rejects(tmp_path):
    base = _write(tmp_path / "base.jsonl", SAMPLES[:4], b"not json\n" + orjson.dumps({"n_tokens": 3}) + b"\n")
    tuned = _write(tmp_path / "tuned.jsonl", [dict(SAMPLES[0], model="x")])
    models, stats = load_samples([str(base), str(tuned)], rejects=str(tmp_path / "rej.jsonl"))
    assert {k: len(v) for k, v in models.items()} == {"base": 4, "x": 1}
    assert (stats.n_in, stats.n_out, stats.n_rejected) == (7, 5, 2)
    rej = [orjson.loads(x) for x in (tmp_path / "rej.jsonl").read_bytes().splitlines()]
    assert sorted(r["reject_reason"] for r in rej) == ["bad_json", "no_completion"]


# ---------------------------------------------------------------- the CLI


def test_score_cli_json_table_and_plots(tmp_path):
    src = _write(tmp_path / "s.jsonl", [dict(r, model="m") for r in SAMPLES])
    r = subprocess.run([*CPMTOOL, "bench", "score", str(src), "--k", "1,2,4", "--budgets", "8,25", "--plot",
                        str(tmp_path / "plots")], capture_output=True, timeout=120)
    assert r.returncode == 0, r.stderr.decode()
    rows = [orjson.loads(x) for x in r.stdout.splitlines()]
    assert rows == score_samples([dict(x, model="m") for x in SAMPLES], ks=(1, 2, 4), budgets=(8, 25))
    assert "pass@4" in r.stderr.decode() and "acc@25" in r.stderr.decode()
    for name in ("accuracy_vs_budget.png", "pass_maj_at_k.png", "token_histogram.png"):
        assert (tmp_path / "plots" / name).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_score_cli_errors_are_one_line(tmp_path):
    src = _write(tmp_path / "s.jsonl", SAMPLES)
    r = subprocess.run([*CPMTOOL, "bench", "score", str(src), "--budgets", "8,x"], capture_output=True, timeout=60)
    assert r.returncode == 2
    assert r.stderr.decode().strip().splitlines()[-1].startswith("cpmtool bench: error: --budgets")
    r = subprocess.run([*CPMTOOL, "bench", "score", "-"], input=b"", capture_output=True, timeout=60)
    assert r.returncode == 2 and b"no sample records" in r.stderr


# ---------------------------------------------------------------- bench eval on cpm-tiny


def _tiny_installed() -> bool:
    from cpmtool.model.registry import REGISTRY

    return REGISTRY["cpm-tiny"].installed()


@pytest.mark.skipif(not _tiny_installed(), reason="cpm-tiny weights are not built")
def test_eval_cli_on_cpm_tiny_matches_grading_its_samples(tmp_path):
    from cpmtool.rewards.math import math_reward

    out = tmp_path / "samples.jsonl"
    r = subprocess.run([*CPMTOOL, "bench", "eval", "--model", "cpm-tiny", "--data", "arithmetic", "--level", "1",
                        "--n-prompts", "4", "--n", "2", "--temperature", "1", "--seed", "0", "--max-tokens", "64",
                        "--budgets", "40", "--threads", "1", "-o", str(out)], capture_output=True, timeout=600)
    assert r.returncode == 0, r.stderr.decode()
    (row,) = [orjson.loads(x) for x in r.stdout.splitlines()]
    samples = [orjson.loads(x) for x in out.read_bytes().splitlines()]
    assert row["model"] == "cpm-tiny" and row["prompts"] == 4 and row["samples"] == len(samples) == 8
    # regrade every written sample from its text: the reported accuracy is theirs
    regraded = [math_reward(s, s["completion"])[1] for s in samples]
    assert [s["correct"] for s in samples] == regraded
    assert row["accuracy"] == pytest.approx(sum(regraded) / 8)
    assert row["budgets"]["40"]["accuracy"] == pytest.approx(
        sum(ok and s["n_tokens"] <= 40 for ok, s in zip(regraded, samples, strict=True)) / 8)
    # and `bench score` on the written samples says the same
    s = subprocess.run([*CPMTOOL, "bench", "score", str(out), "--budgets", "40"], capture_output=True, timeout=120)
    assert s.returncode == 0, s.stderr.decode()
    (again,) = [orjson.loads(x) for x in s.stdout.splitlines()]
    assert {k: v for k, v in again.items() if k != "model"} == {k: v for k, v in row.items() if k != "model"}


def test_eval_data_errors(tmp_path, monkeypatch):
    from cpmtool.bench.evaluate import eval_prompts, shared_data
    from cpmtool.errors import ConfigError, InputError

    with pytest.raises(ConfigError, match="not arithmetic, countdown, gsm8k"):
        eval_prompts(str(tmp_path / "missing.jsonl"), 3)
    monkeypatch.setenv("CPMTOOL_DATA", str(tmp_path))
    f = _write(tmp_path / "p.jsonl", [{"prompt": "1+1?", "answer": "2"}, {"prompt": "no gold"},
                                      {"question": "2+2?", "answer": "4"}])
    assert eval_prompts(str(f), 5) == [{"prompt": "1+1?", "answer": "2"}]
    assert eval_prompts(str(f), 5, prompt_field="question") == [{"question": "2+2?", "answer": "4"}]
    with pytest.raises(InputError, match="no records"):
        eval_prompts(str(_write(tmp_path / "e.jsonl", [{"prompt": "x"}])), 5)
    assert shared_data("p.jsonl") == f
    recs = eval_prompts("countdown", 3, level=[1])
    assert len(recs) == 3 and all(r["task"] == "countdown" and r["level"] == 1 for r in recs)


def test_eval_gsm8k_reads_the_shared_file():
    from cpmtool.bench.evaluate import eval_prompts
    from cpmtool.errors import InputError
    from cpmtool.rewards.math import gold_answer

    try:
        recs = eval_prompts("gsm8k", 3)
    except InputError:
        pytest.skip("gsm8k_test.jsonl is not in the shared data directory")
    assert [r["id"] for r in recs] == ["gsm8k-test-0", "gsm8k-test-1", "gsm8k-test-2"]
    assert gold_answer(recs[0]["answer"]) == "18"


@pytest.mark.slow
@pytest.mark.skipif(not _tiny_installed(), reason="cpm-tiny weights are not built")
def test_eval_through_an_openai_compatible_server(tmp_path):
    """--engine openai: the same eval against a real `cpmtool serve` process on 127.0.0.1."""
    from cpmtool.rewards.math import math_reward
    from cpmtool.serve.process import launch_server

    out = tmp_path / "samples.jsonl"
    with launch_server("cpm-tiny", args=["--threads", "1"], startup_timeout=600) as srv:
        r = subprocess.run([*CPMTOOL, "bench", "eval", "--engine", "openai", "--api-base", srv.url, "--model",
                            "cpm-tiny", "--data", "arithmetic", "--level", "1", "--n-prompts", "3", "--max-tokens",
                            "64", "-o", str(out)], capture_output=True, timeout=600)
    assert r.returncode == 0, r.stderr.decode()
    (row,) = [orjson.loads(x) for x in r.stdout.splitlines()]
    samples = [orjson.loads(x) for x in out.read_bytes().splitlines()]
    assert row["prompts"] == 3 and len(samples) == 3 and all(s["n_tokens"] > 0 for s in samples)
    assert row["accuracy"] == pytest.approx(sum(math_reward(s, s["completion"])[1] for s in samples) / 3)
