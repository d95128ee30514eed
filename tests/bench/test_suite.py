"""bench all: the suite runs its benchmarks as processes, a failing one is a skipped row with its reason,
and the report (report.md, PNGs, machine.json, raw rows) is written; never a timing assertion."""

import json
import subprocess
import sys

import pytest

from cpmtool.bench.suite import (
    Outcome,
    SubBench,
    default_suite,
    generic_table,
    render_report,
    run_bench,
    run_suite,
    select,
)
from cpmtool.errors import ConfigError

CPMTOOL = [sys.executable, "-m", "cpmtool"]


def test_a_failing_benchmark_is_a_skipped_row_with_its_reason(tmp_path):
    suite = [
        SubBench("engine", ["--batch", "0"], "native vs hf"),  # exits 2 with a one-line ConfigError
        SubBench("nope", [], "no such bench"),  # the CLI's usage error
        SubBench("ternary", [], "ternary vs dense", skip="`cpmtool bench ternary` is not in this build yet"),
    ]
    report = run_suite(suite, out_dir=tmp_path / "r")
    res = {r["bench"]: r for r in report["results"]}
    assert [r["status"] for r in report["results"]] == ["skipped"] * 3
    assert res["engine"]["reason"].startswith("exit 2: ") and "--batch" in res["engine"]["reason"]
    assert res["nope"]["reason"].startswith("exit 2")
    assert res["ternary"]["reason"] == "`cpmtool bench ternary` is not in this build yet"
    md = (tmp_path / "r" / "report.md").read_text()
    assert "| engine | skipped | exit 2: " in md and "Skipped: `cpmtool bench ternary` is not" in md
    machine = json.loads((tmp_path / "r" / "machine.json").read_text())
    assert {"cpu", "cores", "ram_gib", "torch", "gpu", "load_avg", "host"} <= set(machine)
    assert (tmp_path / "r" / "engine.log").read_text().strip()  # its stderr is kept


def test_a_benchmark_past_its_timeout_is_skipped(tmp_path):
    o = run_bench(SubBench("attention", ["--context", "64k,128k", "--repeats", "5"], "x"), tmp_path, timeout=2)
    assert (o.status, o.reason) == ("skipped", "timed out after 2 s")


def test_default_suite_detects_optional_parts():
    names = [b.name for b in default_suite(quick=True)]
    assert names == ["engine", "spec", "attention", "train-rl", "clean", "speed", "eval", "ternary"]
    tern = default_suite(quick=True)[-1]
    assert tern.skip and "not in this build" in tern.skip
    tern = default_suite(quick=True, commands={"ternary": {"--quick", "--model"}})[-1]
    assert tern.skip is None and tern.args == ["--quick"]
    assert default_suite(quick=False, commands={"ternary": {"--quick"}})[-1].args == []
    # no --quick of its own: the smoke sizes go through the flags it has
    tern = default_suite(quick=True, threads=1, commands={"ternary": {"--max-tokens", "--threads"}})[-1]
    assert tern.args == ["--max-tokens", "16", "--threads", "1"]
    try:
        import vllm  # noqa: F401
    except ImportError:
        eng = default_suite(quick=True)[0]
        assert "vllm" in eng.skipped_peers and "--compare" not in eng.args


def test_default_suite_on_a_gpu_passes_the_device():
    suite = {b.name: b for b in default_suite(quick=True, threads=2, device="cuda")}
    for name in ("engine", "train-rl"):
        assert suite[name].args[-2:] == ["--device", "cuda"], suite[name].args
    assert suite["speed"].args[-2:] == ["--serve-args", "--threads 2 --device cuda"]
    assert "--device" not in suite["clean"].args + suite["eval"].args + suite["spec"].args
    assert "--serve-args" not in {b.name: b for b in default_suite(quick=True)}["speed"].args
    with pytest.raises(ConfigError, match="valid: cpu, cuda"):
        default_suite(device="tpu")


def test_select_names():
    suite = default_suite(quick=True)
    assert [b.name for b in select(suite, ["clean", "engine"])] == ["engine", "clean"]
    assert "clean" not in [b.name for b in select(suite, skip=["clean"])]
    with pytest.raises(ConfigError, match="unknown benchmark"):
        select(suite, ["cleaning"])


def test_generic_table_and_report_of_an_unknown_bench():
    rows = [{"model": "m", "ratio": 2.5, "nested": {"a": 1}}, {"model": "n", "extra": True}]
    assert generic_table(rows) == (["model", "ratio", "extra"], [["m", "2.5", ""], ["n", "", "True"]])
    b = SubBench("ternary", [], "ternary vs dense")
    md = render_report([b], [Outcome("ternary", "ok", 1.0, rows)], {"date": "d", "cpu": "c", "cores": 2,
                       "cores_usable": 2, "ram_gib": 1, "gpu": [], "python": "3", "torch": "t", "cpmtool": "0",
                       "load_avg": [1, 1, 1]}, quick=True, pngs={})
    assert "| model | ratio | extra |" in md and "| m | 2.5 |  |" in md


@pytest.mark.slow
def test_bench_all_quick_subset_writes_the_report(tmp_path):
    r = subprocess.run([*CPMTOOL, "bench", "all", "--quick", "--only", "clean,attention", "--threads", "1",
                        "--out", str(tmp_path)], capture_output=True, timeout=600)
    assert r.returncode == 0, r.stderr.decode()
    report = json.loads(r.stdout)
    (d,) = list(tmp_path.iterdir())
    assert report["dir"] == str(d)
    res = {x["bench"]: x for x in report["results"]}
    assert set(res) == {"clean", "attention"}
    att = res["attention"]
    assert att["status"] == "ok" and {x["context"] for x in att["rows"]} == {1024, 4096}
    md = (d / "report.md").read_text()
    assert "| context | phase | dense ms | InfLLM v2 ms | speedup |" in md and "![attention](attention.png)" in md
    assert (d / "attention.png").read_bytes()[:4] == b"\x89PNG"
    if res["clean"]["status"] == "ok":
        assert "| cpmtool / datatrove |" in md and (d / "clean.png").exists()
        assert res["clean"]["rows"][0]["docs"] == 100
    else:  # datatrove is an optional peer: its absence is a reason, not a crash
        assert "pip install" in res["clean"]["reason"] or "cannot find" in res["clean"]["reason"]
    assert json.loads((d / "machine.json").read_text())["cores"] >= 1
    assert json.loads((d / "results.json").read_text())[0]["bench"] == "attention"
