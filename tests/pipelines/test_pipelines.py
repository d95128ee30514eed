"""Each pipelines/*.mk recipe runs end to end at its FAST=1 smoke-test sizes, into a scratch OUT.

A recipe joins this test by being in pipelines/: it must honour FAST=1 (shrink every size, write
only under OUT) and have an `all` goal. The checks below look at the files each known recipe
leaves; any other recipe is checked for a clean exit and some output.
"""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
RECIPES = sorted(p.name for p in (REPO / "pipelines").glob("*.mk"))


def _shared(name: str) -> Path | None:
    for d in (os.environ.get("CPMTOOL_DATA"), REPO.parent / "shared" / "data", "/work/shared/data"):
        if d and (Path(d) / name).is_file():
            return Path(d) / name
    return None


def _jsonl(path: Path) -> list[dict]:
    return [json.loads(x) for x in path.read_text().splitlines() if x.strip()]


def _check_cpm_tiny(out: Path):
    assert (out / "model.safetensors").stat().st_size > 0
    card = json.loads((out / "card.json").read_text())
    assert card["params"] > 0


def _check_rlvr(out: Path, run: str = "grpo"):
    assert (out / run / "model" / "config.json").is_file()
    assert _jsonl(out / run / "metrics.jsonl")
    rows = {r["model"]: r for r in _jsonl(out / "bench.jsonl")}
    assert set(rows) == {"eval-base", f"eval-{run}"}
    assert all(r["samples"] == r["prompts"] * 2 and r["accuracy"] is not None for r in rows.values())
    assert (out / "plots" / "pass_maj_at_k.png").is_file()


def _check_ultraclean(out: Path):
    kept = _jsonl(out / "clean.jsonl")
    assert kept and (out / "rejects.jsonl").stat().st_size > 0
    # the shards hold exactly the documents of the one-process run
    finals = [r["id"] for p in sorted((out / "shards").glob("final-*.jsonl")) for r in _jsonl(p)]
    assert sorted(finals) == sorted(r["id"] for r in kept)
    assert (out / "clf" / "classifier.json").is_file() and (out / "scored.jsonl").is_file()
    assert json.loads((out / "verify.json").read_text().splitlines()[-1])


def _check_serve_bench(out: Path):
    for c in (1, 4):
        r = json.loads((out / f"speed-c{c}.json").read_text())
        assert r["max_concurrency"] == c and r["completed"] == 4 and r["output_throughput"] > 0
    assert len((out / "report.txt").read_text().splitlines()) == 3


CHECKS = {
    "cpm-tiny.mk": _check_cpm_tiny,
    "rlvr.mk": _check_rlvr,
    "ttrl.mk": lambda out: _check_rlvr(out, "ttrl"),
    "ultraclean.mk": _check_ultraclean,
    "serve-bench.mk": _check_serve_bench,
}


@pytest.mark.slow
@pytest.mark.parametrize("recipe", RECIPES)
def test_recipe_runs_fast(recipe, tmp_path):
    text = (REPO / "pipelines" / recipe).read_text()
    if "FAST" not in text:
        pytest.fail(f"pipelines/{recipe} has no FAST=1 mode: give it smoke-test sizes under `ifeq ($(FAST),1)` "
                    "so this test can run it in a minute or two")
    out = tmp_path / "out"
    args = ["make", "-f", f"pipelines/{recipe}", "FAST=1", f"OUT={out}", f"PYTHON={sys.executable}"]
    if "../shared/data" in text:
        for var, name in (("RAW", "web_docs_sample.jsonl"), ("REFSET", "alpaca_seed.jsonl")):
            if f"{var} " in text:
                path = _shared(name)
                if path is None:
                    pytest.skip(f"{name} is not in the shared data directory")
                args.append(f"{var}={path}")
    env = dict(os.environ, CPMTOOL_HOME=os.environ.get("CPMTOOL_HOME", str(Path.home() / ".cache" / "cpmtool")),
               CPMTOOL_PROGRESS="0")
    r = subprocess.run([*args, "all"], cwd=REPO, capture_output=True, timeout=1800, env=env)
    assert r.returncode == 0, f"{' '.join(args)} all failed:\n{r.stderr.decode()[-3000:]}"
    assert out.is_dir() and any(out.iterdir()), f"pipelines/{recipe} wrote nothing under OUT"
    if recipe in CHECKS:
        CHECKS[recipe](out)
