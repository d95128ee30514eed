import pytest


@pytest.fixture(autouse=True)
def _isolated(tmp_path, monkeypatch):
    monkeypatch.setenv("CPMTOOL_HOME", str(tmp_path / "home"))
    monkeypatch.setenv("CPMTOOL_PROGRESS", "0")
