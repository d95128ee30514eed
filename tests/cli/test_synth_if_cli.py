"""`cpmtool synth-if` end to end through the CLI with smollm2-135m on Alpaca seeds: the stream
contracts of each stage, nothing lost (in = out + rejected), and a cached rerun making no model call."""

import json
from pathlib import Path

import orjson
import pytest

ALPACA = Path("/work/shared/data/alpaca_seed.jsonl")
if not ALPACA.exists():
    ALPACA = Path(__file__).resolve().parents[3] / "shared" / "data" / "alpaca_seed.jsonl"

# decomposed records as `decompose` writes them: the pool compose draws from
POOL = [
    {"id": "pool-1", "query": "Explain tides simply in two sentences.", "constraints": [
        {"type": "stylistic", "constraint": "explain it simply", "simplified_query": "Explain tides in two sentences.",
         "question": "Is the explanation simple?"},
        {"type": "numerical", "constraint": "in two sentences", "simplified_query": "Explain tides simply.",
         "question": "Does the response have exactly two sentences?"}]},
    {"id": "pool-2", "query": "Name a fruit without a comma.", "constraints": [
        {"type": "format", "constraint": "no commas", "simplified_query": "Name a fruit.", "question": None}]},
]


@pytest.fixture(scope="module")
def smollm2_tokenizer():
    from cpmtool.errors import ModelError
    from cpmtool.model.tokenizer import load_tokenizer

    try:
        return load_tokenizer("smollm2-135m")
    except ModelError as e:
        pytest.skip(f"smollm2-135m is not pulled ({e}); `make test` pulls it first")


@pytest.fixture(autouse=True)
def _env(monkeypatch):
    # CPMTOOL_HOME stays: smollm2-135m lives there; every run names its own --cache directory
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")


def write(path: Path, recs: list[dict]) -> Path:
    path.write_bytes(b"".join(orjson.dumps(r) + b"\n" for r in recs))
    return path


def read(path: Path) -> list[dict]:
    return [orjson.loads(x) for x in path.read_bytes().splitlines() if x.strip()]


def seeds(tmp_path: Path, n: int) -> Path:
    """The first n Alpaca records without an `input` (the shortest prompts)."""
    if not ALPACA.exists():
        pytest.skip(f"{ALPACA} is missing")
    recs = [r for r in map(json.loads, ALPACA.read_text().splitlines()) if not r["input"]][:n]
    return write(tmp_path / "seeds.jsonl", recs)


def cli(capsys, *args) -> tuple[int, str]:
    """`cpmtool synth-if ARGS` in this process; (exit code, stderr)."""
    from cpmtool.cli.app import main

    with pytest.raises(SystemExit) as e:
        main(["synth-if", *map(str, args)])
    return e.value.code, capsys.readouterr().err


def stats(path: Path) -> dict:
    s = json.loads(path.read_text())
    assert s["complete"] and s["in"] == s["out"] + s["rejected"], s
    return s


def test_compose_cli_without_a_model(tmp_path, capsys):
    src = seeds(tmp_path, 3)
    pool = write(tmp_path / "pool.jsonl", POOL)
    code, err = cli(capsys, "compose", "--pool", pool, "--rounds", 2, "--pool-ratio", 0.5, src, "-o", tmp_path / "c.jsonl",
                    "--stats", tmp_path / "s.json")
    assert code == 0, err
    s = stats(tmp_path / "s.json")
    assert (s["in"], s["out"], s["pool_constraints"]) == (3, 3, 2)  # pool-2's constraint has no question
    for rec in read(tmp_path / "c.jsonl"):
        assert rec["prompt"].startswith(rec["instruction"]) and rec["query"] == rec["instruction"]
        assert 1 <= len(rec["added_constraints"]) <= 2
        assert all(a["text"] in rec["prompt"] for a in rec["added_constraints"])
        pooled = [a["question"] for a in rec["added_constraints"] if a["source"] == "pool"]
        assert rec["eval_questions"] == pooled
        assert rec.get("instruction_id_list", []) == [a["id"] for a in rec["added_constraints"]
                                                      if a["source"] == "ifeval"]
    # same seed, same composition
    code, _ = cli(capsys, "compose", "--pool", pool, "--rounds", 2, src, "-o", tmp_path / "c2.jsonl")
    assert code == 0 and (tmp_path / "c2.jsonl").read_bytes() == (tmp_path / "c.jsonl").read_bytes()


@pytest.mark.parametrize(("args", "needle"), [
    (["compose", "--rounds", "0"], "--rounds must be >= 1"),
    (["compose", "--ifeval-ids", "keywords:nope"], "unknown IFEval ids: keywords:nope"),
    (["generate", "--k", "0"], "--k must be >= 1"),
    (["filter", "--pairs", "-"], "--pairs - must be a file other than the output"),
    (["decompose", "--engine", "openai", "--api-base", "http://127.0.0.1:9", "--model", "served-name", "--no-cache",
      "--prefill", "{"], "--prefill needs the model's tokenizer"),
])
def test_bad_flags_are_one_line_errors(tmp_path, capsys, args, needle):
    src = write(tmp_path / "x.jsonl", [{"prompt": "hi"}])
    code, err = cli(capsys, *args, src)
    lines = err.strip().splitlines()
    assert code == 2 and len(lines) == 1 and lines[0].startswith("cpmtool synth-if: error:") and needle in lines[0]


PREFILL = '{"Complex": true, "Basic Query": "'


@pytest.mark.slow
def test_pipeline_on_smollm2_and_cached_rerun(tmp_path, capsys, smollm2_tokenizer):
    src = seeds(tmp_path, 3)
    pool = write(tmp_path / "pool.jsonl", POOL)
    model = ["--model", "smollm2-135m", "--cache", tmp_path / "cache", "--max-batch", 8]

    def stage(name, inp, out, *extra):
        code, err = cli(capsys, name, *model, *extra, inp, "-o", tmp_path / out, "--rejects",
                        tmp_path / f"{name}.rej.jsonl", "--stats", tmp_path / f"{name}.stats.json")
        assert code == 0, err
        return stats(tmp_path / f"{name}.stats.json")

    runs = {
        "decompose": (src, "dec.jsonl", "--max-tokens", 48, "--prefill", PREFILL),
        "generate": (tmp_path / "comp.jsonl", "gen.jsonl", "--k", 2, "--max-tokens", 12),
        "filter": (tmp_path / "gen.jsonl", "sft.jsonl", "--max-tokens", 24, "--keep-unsatisfied", "--pairs",
                   tmp_path / "pairs.jsonl"),
    }
    first = {}
    first["decompose"] = stage("decompose", *runs["decompose"])
    assert first["decompose"]["in"] == 3 and first["decompose"]["cache"]["calls"] >= 1
    # smollm2-135m answers none of these in JSON on its own; started with the object's first keys
    # (and its 48-token answers repaired where cut off), some parse
    assert first["decompose"]["out"] >= 1
    for rec in read(tmp_path / "dec.jsonl"):
        assert isinstance(rec["constraints"], list) and rec["constraints"] and isinstance(rec["eval_questions"], list)
    for rej in read(tmp_path / "decompose.rej.jsonl"):
        assert rej["reject_reason"] in ("unparsable_decomposition", "no_constraints")
        assert isinstance(rej["raw"], str)  # the model's answer, kept for inspection

    code, err = cli(capsys, "compose", "--pool", pool, "--pool-ratio", 1.0, "--rounds", 2, src, "-o",
                    tmp_path / "comp.jsonl")
    assert code == 0, err
    comp = read(tmp_path / "comp.jsonl")
    assert len(comp) == 3 and all(r["eval_questions"] for r in comp)  # so the judge is asked

    first["generate"] = stage("generate", *runs["generate"])
    gen = read(tmp_path / "gen.jsonl")
    assert first["generate"]["out"] == 3 and all(len(r["responses"]) == 2 for r in gen)
    assert all(set(r["finish_reasons"]) <= {"stop", "length"} for r in gen)

    first["filter"] = stage("filter", *runs["filter"])
    sft = read(tmp_path / "sft.jsonl")
    judged = sum(1 for g in gen for r in g["responses"] if r.strip())  # an empty response fails unjudged
    assert first["filter"]["out"] == 3
    assert first["filter"]["cache"]["hits"] + first["filter"]["cache"]["misses"] == judged
    for rec in sft:
        assert rec["completion"] in next(g["responses"] for g in gen if g["id"] == rec["id"])
        assert len(rec["verdicts"]) == 2 and "responses" not in rec
        assert rec["satisfied"] == any(v["pass"] for v in rec["verdicts"])
    pairs = read(tmp_path / "pairs.jsonl") if (tmp_path / "pairs.jsonl").exists() else []
    assert first["filter"].get("pairs", 0) == len(pairs)

    # the records feed train-sft and train-dpo as they are
    from cpmtool.train.sequences import preference_example, sft_example

    for rec in sft:
        sft_example(smollm2_tokenizer, rec, smollm2_tokenizer.eos_token_id, 1024)
    for rec in pairs:
        assert rec["score_chosen"] > rec["score_rejected"]
        preference_example(smollm2_tokenizer, rec, smollm2_tokenizer.eos_token_id, 1024)

    # a rerun with the same inputs and settings: the same records, and not one model call
    for name, (inp, out, *extra) in runs.items():
        before = (tmp_path / out).read_bytes()
        again = stage(name, inp, out, *extra)
        assert again["cache"]["calls"] == 0 and again["cache"]["misses"] == 0, (name, again)
        assert again["cache"]["hits"] == first[name]["cache"]["hits"] + first[name]["cache"]["misses"]
        assert (tmp_path / out).read_bytes() == before, name
