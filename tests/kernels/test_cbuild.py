"""kernels/cbuild.py: C kernels built with the system compiler on first use, cached, and a clear reason
(and the torch path) when they cannot be."""

import shutil

import pytest
from cpmtool.kernels import cbuild

pytestmark = pytest.mark.skipif(shutil.which("cc") is None and shutil.which("gcc") is None,
                                reason="no C compiler")


def test_builds_caches_and_calls_a_kernel(tmp_path, monkeypatch):
    src = tmp_path / "addk.c"
    src.write_text("int add3(int a, int b, int c) { return a + b + c; }\n")
    lib = cbuild.load(src)
    assert lib is not None and lib.add3(1, 2, 39) == 42
    built = list((tmp_path / "home" / "kernels").glob("addk-*.so"))
    assert len(built) == 1  # under $CPMTOOL_HOME/kernels (conftest points it at tmp_path/home)
    assert cbuild.load(src) is lib  # once per process
    cbuild._loaded.clear()
    mtime = built[0].stat().st_mtime_ns
    assert cbuild.load(src).add3(1, 1, 1) == 3
    assert built[0].stat().st_mtime_ns == mtime  # the cached library, not a rebuild
    src.write_text("int add3(int a, int b, int c) { return a + b + c + 1; }\n")
    cbuild._loaded.clear()
    assert cbuild.load(src).add3(1, 1, 1) == 4  # an edited source builds anew
    assert len(list((tmp_path / "home" / "kernels").glob("addk-*.so"))) == 2


def test_a_broken_source_gives_none_and_the_compiler_error(tmp_path):
    src = tmp_path / "broken.c"
    src.write_text("int f(void) { return missing_symbol_xyz; }\n")
    assert cbuild.load(src) is None
    err = cbuild.build_error(src)
    assert "broken.c" in err and "missing_symbol_xyz" in err


def test_disabled_by_environment(tmp_path, monkeypatch):
    monkeypatch.setenv("CPMTOOL_CPU_KERNELS", "0")
    src = tmp_path / "ok.c"
    src.write_text("int one(void) { return 1; }\n")
    assert cbuild.load(src) is None
    assert "CPMTOOL_CPU_KERNELS=0" in cbuild.build_error(src)


def test_cc_may_carry_flags_and_a_missing_one_is_a_clear_reason(tmp_path, monkeypatch):
    src = tmp_path / "flagged.c"
    src.write_text("int seven(void) { return SEVEN; }\n")
    monkeypatch.setenv("CC", f"{shutil.which('cc') or shutil.which('gcc')} -DSEVEN=7")
    assert cbuild.load(src).seven() == 7
    other = tmp_path / "other.c"
    other.write_text("int one(void) { return 1; }\n")
    monkeypatch.setenv("CC", "/nonexistent/cc")
    assert cbuild.load(other) is None
    assert "/nonexistent/cc" in cbuild.build_error(other)


def test_an_edited_header_rebuilds(tmp_path):
    (tmp_path / "inc").mkdir()
    hdr = tmp_path / "inc" / "k.h"
    hdr.write_text("#define K 5\n")
    src = tmp_path / "useh.c"
    src.write_text('#include "inc/k.h"\nint k(void) { return K; }\n')
    assert cbuild.load(src).k() == 5
    hdr.write_text("#define K 6\n")
    cbuild._loaded.clear()
    assert cbuild.load(src).k() == 6  # the header is part of the cache key
    assert len(list((tmp_path / "home" / "kernels").glob("useh-*.so"))) == 2
