"""`bench clean`: the same rules in datatrove and in cpmtool agree on the web sample."""

import importlib.util
from pathlib import Path

import pytest

from cpmtool.bench.clean import bench_clean

SAMPLE = Path(__file__).parents[3] / ".." / "shared" / "data" / "web_docs_sample.jsonl"
HAVE_DATATROVE = (
    importlib.util.find_spec("datatrove") is not None and importlib.util.find_spec("spacy") is not None
)


@pytest.mark.slow
@pytest.mark.skipif(
    not HAVE_DATATROVE, reason="datatrove and spaCy not installed (pip install 'cpmtool[datatrove]')"
)
def test_bench_agrees_with_datatrove_on_the_sample():
    if not SAMPLE.exists():
        pytest.skip(f"{SAMPLE} not found (shared/ must sit beside the repository)")
    r = bench_clean(SAMPLE, limit=12)
    assert r["docs"] == 12 and r["rules"] == ["gopher_repetition", "gopher_quality", "c4", "fineweb"]
    assert r["agreement"] == 1.0 and r["rule_agreement"] == 1.0 and r["disagreements"] == []
    assert r["datatrove"]["kept"] == r["cpmtool"]["kept"] < 12
    assert r["datatrove"]["docs_per_s"] > 0 and r["cpmtool"]["docs_per_s"] > 0 and r["speedup"] > 0


def test_bench_says_how_to_install_datatrove_when_missing(monkeypatch):
    import builtins

    from cpmtool.errors import MissingDependencyError

    real = builtins.__import__

    def no_datatrove(name, *a, **kw):
        if name.startswith("datatrove"):
            raise ImportError(name)
        return real(name, *a, **kw)

    monkeypatch.setattr(builtins, "__import__", no_datatrove)
    with pytest.raises(MissingDependencyError, match=r"pip install 'cpmtool\[datatrove\]'"):
        bench_clean(SAMPLE)
