"""`cpmtool annotate-pref` end to end through the CLI: responses from two generators (cpm-tiny and
smollm2-135m, made by `cpmtool rollout` from alpaca seeds), smollm2-135m as the judge (native, and
behind a real `cpmtool serve` with --engine openai), the answer cache on a rerun, nothing lost."""

import json
import subprocess
import sys
from pathlib import Path

import orjson
import pytest

from cpmtool.data.air import parse_score, parse_verdict

CPMTOOL = [sys.executable, "-m", "cpmtool"]
ALPACA = Path("/work/shared/data/alpaca_seed.jsonl")
if not ALPACA.exists():
    ALPACA = Path(__file__).resolve().parents[3] / "shared" / "data" / "alpaca_seed.jsonl"


def _smollm2_pulled() -> bool:
    from cpmtool.model.registry import REGISTRY

    return REGISTRY["smollm2-135m"].installed() and REGISTRY["cpm-tiny"].installed()


pytestmark = [
    pytest.mark.skipif(not _smollm2_pulled(), reason="smollm2-135m is not pulled (`make test` pulls it)"),
    pytest.mark.skipif(not ALPACA.exists(), reason="shared/data/alpaca_seed.jsonl is not here"),
]


def cli(*args, timeout=900):
    return subprocess.run([*CPMTOOL, *map(str, args)], capture_output=True, timeout=timeout)


def jsonl(path: Path) -> list[dict]:
    return [orjson.loads(x) for x in path.read_bytes().splitlines() if x.strip()]


@pytest.fixture(scope="module")
def rollouts(tmp_path_factory):
    """Two alpaca seeds answered by cpm-tiny (plain prompt) and smollm2-135m (chat), 8 tokens each."""
    d = tmp_path_factory.mktemp("air")
    seeds = [json.loads(x) for x in ALPACA.read_text().splitlines()]
    seeds = [{"id": f"a{i}", "instruction": r["instruction"]} for i, r in enumerate(s for s in seeds if not s["input"])]
    (d / "seeds.jsonl").write_text("".join(json.dumps(r) + "\n" for r in seeds[:2]))
    for model, extra in (("cpm-tiny", []), ("smollm2-135m", ["--chat"])):
        r = cli("rollout", "-m", model, *extra, "--prompt-field", "instruction", "--max-tokens", 8, "--temperature", 0,
                "-o", d / f"{model}.jsonl", d / "seeds.jsonl")
        assert r.returncode == 0, r.stderr.decode()
    return d


def _annotate(d: Path, tag: str, *args):
    out, rej, st = d / f"{tag}.jsonl", d / f"{tag}-rej.jsonl", d / f"{tag}-stats.json"
    r = cli("annotate-pref", "--prompt-field", "instruction", "--rejects", rej, "--stats", st, "-o", out,
            "--max-tokens", 6, *args, d / "cpm-tiny.jsonl", d / "smollm2-135m.jsonl")
    assert r.returncode == 0, r.stderr.decode()
    return jsonl(out), jsonl(rej), json.loads(st.read_text()), out.read_bytes()


def _nothing_lost(pairs, rejects, stats):
    """Each of the 4 input lines is in a pair's instruction or in the rejects, once."""
    assert stats["in"] == 4 and stats["out"] == len(pairs) and stats["complete"]
    used = [(x["generator"], x["id"]) for p in pairs for x in p["responses"]]
    lost = [(Path(r["reject_source"]).stem, r["id"]) for r in rejects]
    assert sorted(used + lost) == sorted((g, f"a{i}-0") for g in ("cpm-tiny", "smollm2-135m") for i in range(2))
    assert sum(stats["rejected_by_reason"].values()) == len(rejects)


def test_pointwise_on_two_generators_then_a_rerun_is_served_from_the_cache(rollouts):
    d, cache = rollouts, rollouts / "cache"
    flags = ["--cache", cache, "--prefill", "Score:", "--judge-samples", 2, "--temperature", 1.0, "--seed", 3,
             "--min-chosen", 1, "--margin", "0,9"]
    pairs, rejects, stats, raw = _annotate(d, "pw", *flags)
    _nothing_lost(pairs, rejects, stats)
    # 4 responses x 2 judgments, each counted once as scored or under its failure reason
    assert sum(stats["judge"].values()) == 8
    assert stats["cache"] == {"hits": 0, "misses": 4, "calls": 1}
    judged = [x for p in pairs for x in p["responses"]] + rejects
    for x in judged:
        assert len(x["judgments"]) == 2 and all(j.startswith("Score:") for j in x["judgments"])
        vals = [parse_score(j)[0] for j in x["judgments"]]
        assert x["judge_scores"] == vals
        got = [v for v in vals if v is not None]
        assert x["score"] == (round(sum(got) / len(got), 6) if got else None)
    assert stats["judge"].get("scored", 0) == sum(v is not None for x in judged for v in x["judge_scores"])
    for p in pairs:  # with --min-chosen 1 --margin 0,9 any two scored responses make a pair
        assert p["id"] in ("a0", "a1") and p["prompt"] == p["instruction"] and p["annotation"] == "pointwise"
        assert p["chosen"] != p["rejected"] or p["generator_chosen"] != p["generator_rejected"]
        assert p["margin"] == pytest.approx(p["score_chosen"] - p["score_rejected"]) and 0 <= p["margin"] <= 9
        assert p["score_chosen"] == max(x["score"] for x in p["responses"] if x["score"] is not None)
        assert {p["generator_chosen"], p["generator_rejected"]} <= {"cpm-tiny", "smollm2-135m"}
    for r in rejects:
        assert r["reject_reason"] in ("too_few_scores", "no_pair")

    # a rerun with another selection makes no model call: --keep-top-variance 0.5 of the m
    # instructions with two scores keeps ceil(m / 2), the highest variance first; the others'
    # lines are low_variance rejects, and the kept ones give the same pairs as before
    pairs2, rejects2, stats2, _ = _annotate(d, "pw2", *flags, "--keep-top-variance", 0.5)
    assert stats2["cache"] == {"hits": 4, "misses": 0, "calls": 0}
    _nothing_lost(pairs2, rejects2, stats2)
    variance = {p["id"]: p["score_variance"] for p in pairs}
    variance.update({r["group"]: r["score_variance"] for r in rejects if "score_variance" in r})
    kept = sorted(variance, key=lambda g: (-variance[g], g))[:(len(variance) + 1) // 2]
    assert pairs2 == [p for p in pairs if p["id"] in kept]
    low = sorted(r["group"] for r in rejects2 if r["reject_reason"] == "low_variance")
    assert low == sorted(g for g in variance if g not in kept for _ in range(2))


@pytest.mark.slow
def test_pairwise_both_orders(rollouts):
    pairs, rejects, stats, _ = _annotate(rollouts, "pair", "--cache", rollouts / "cache", "--mode", "pairwise",
                                         "--prefill", "Better:")
    _nothing_lost(pairs, rejects, stats)
    # one comparison per instruction, asked in both orders
    assert sum(stats["judge"].values()) == 4 and stats["cache"]["misses"] == 4
    for p in pairs:
        assert p["annotation"] == "pairwise" and p["score_chosen"] == 1.0 and p["score_rejected"] == 0.0
        verdicts = [parse_verdict(j)[0] for j in p["responses"][0]["judgments"]]
        # chosen won: A when shown first, B when shown second; an order without a verdict leaves
        # the other one's (a contrary verdict, or a tie, would have made no pair)
        first = p["responses"][0]["generator"] == p["generator_chosen"]
        expected = ["A", "B"] if first else ["B", "A"]
        assert all(v in (e, None) for v, e in zip(verdicts, expected, strict=True)) and verdicts != [None, None]
    for r in rejects:
        assert r["reject_reason"] == "no_pair"


def test_bad_flags_are_one_line_errors(tmp_path):
    (tmp_path / "x.jsonl").write_text('{"prompt": "p", "responses": ["a", "b"]}\n')
    for args, msg in [(["--margin", "3"], "--margin takes lo,hi"),
                      (["--keep-top-variance", "0"], "--keep-top-variance must be in (0, 1]"),
                      (["--mode", "pairwise", "--min-chosen", "8"], "--min-chosen: point-wise settings"),
                      (["--judge-samples", "2", "--temperature", "0"], "needs --temperature > 0")]:
        r = cli("annotate-pref", *args, tmp_path / "x.jsonl")
        assert r.returncode == 2
        err = r.stderr.decode().strip()
        assert err.startswith("cpmtool annotate-pref: error:") and msg in err and "\n" not in err


@pytest.mark.slow
def test_openai_engine_against_cpmtool_serve(rollouts, tmp_path):
    from cpmtool.serve.process import launch_server

    with launch_server("smollm2-135m", args=["--served-model-name", "smollm2-135m", "--threads", "1"],
                       startup_timeout=600) as srv:
        flags = ["--engine", "openai", "--api-base", srv.url, "--model", "smollm2-135m", "--cache", tmp_path / "c",
                 "--prefill", "Score:", "--min-chosen", 1, "--margin", "0,9"]
        pairs, rejects, stats, raw = _annotate(rollouts, "oa", *flags)
        _nothing_lost(pairs, rejects, stats)
        assert stats["cache"] == {"hits": 0, "misses": 4, "calls": 1}
        judged = [x for p in pairs for x in p["responses"]] + rejects
        assert len(judged) == 4 and all(len(x["judgments"]) == 1 and x["judgments"][0].startswith("Score:")
                                        for x in judged)
        _, _, stats2, raw2 = _annotate(rollouts, "oa2", *flags)
        assert stats2["cache"] == {"hits": 4, "misses": 0, "calls": 0} and raw2 == raw
