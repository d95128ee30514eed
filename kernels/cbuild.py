"""Build a kernel's C source with the system C compiler on first use and load it with ctypes.

The shared library is cached under `$CPMTOOL_HOME/kernels/` (default ~/.cache/cpmtool), named by a
hash of the source, the flags, the compiler and the machine, so an edit or another CPU rebuilds it;
a build goes to a temporary name and is renamed into place, so concurrent first uses are safe.
Plain C and ctypes rather than a torch C++ extension: no torch headers, so a build takes about a
second. `-march=native` is deliberate: the library is built on the machine that runs it.

No compiler, a failed build or `CPMTOOL_CPU_KERNELS=0` gives None (callers keep their torch path);
the reason is logged once and kept in `build_error(name)`.
"""

from __future__ import annotations

import ctypes
import hashlib
import logging
import os
import platform
import re
import shlex
import shutil
import subprocess
import tempfile
from pathlib import Path

from cpmtool.model.registry import cpmtool_home

log = logging.getLogger(__name__)

FLAGS = ["-O3", "-march=native", "-fPIC", "-shared", "-std=c11"]
_loaded: dict[str, ctypes.CDLL | None] = {}
_errors: dict[str, str] = {}


def enabled() -> bool:
    """False when `CPMTOOL_CPU_KERNELS=0`: every caller runs its torch path."""
    return os.environ.get("CPMTOOL_CPU_KERNELS", "1") != "0"


def _cpu_id() -> bytes:
    """The CPU's model and feature flags (what -march=native compiles for)."""
    try:
        lines = Path("/proc/cpuinfo").read_text().splitlines()
    except OSError:
        return platform.processor().encode()
    keep = [x for x in lines if x.startswith(("model name", "flags"))][:2]
    return "\n".join(keep).encode()


def _compile(cc: list[str], src: Path, out: Path) -> str | None:
    """Build src into out (OpenMP when the compiler has it); None on success, else the error."""
    err = ""
    for extra in (["-fopenmp"], []):
        fd, tmp = tempfile.mkstemp(suffix=".so", dir=out.parent)
        os.close(fd)
        r = subprocess.run([*cc, *FLAGS, *extra, "-o", tmp, str(src)], capture_output=True, text=True)
        if r.returncode == 0:
            os.replace(tmp, out)
            return None
        os.unlink(tmp)
        lines = r.stderr.strip().splitlines() or [f"exit status {r.returncode}"]
        err = next((x for x in lines if "error" in x), lines[-1])  # the first error, not a trailing note
    return f"{cc[0]} failed on {src.name}: {err}"


_INCLUDE = re.compile(rb'^\s*#\s*include\s+"([^"]+)"', re.M)


def _source_bytes(src: Path, seen: set | None = None) -> bytes:
    """The source with every local `#include "..."` file it pulls in, so a header edit rebuilds too."""
    seen = set() if seen is None else seen
    src = src.resolve()
    if src in seen or not src.is_file():
        return b""
    seen.add(src)
    text = src.read_bytes()
    return text + b"".join(_source_bytes(src.parent / m.decode(), seen) for m in _INCLUDE.findall(text))


def load(src: Path) -> ctypes.CDLL | None:
    """The library built from C source `src` (cached per process), or None when it cannot be built."""
    name = str(src)
    if name in _loaded:
        return _loaded[name]
    lib, err = None, None
    cc = shlex.split(os.environ.get("CC", "")) or [shutil.which("cc") or shutil.which("gcc") or ""]  # $CC may hold flags
    if not enabled():
        err = "disabled by CPMTOOL_CPU_KERNELS=0"
    elif not cc[0]:
        err = "no C compiler (cc/gcc) on PATH"
    else:
        text = _source_bytes(src)
        key = hashlib.sha256(b"\0".join([text, " ".join(FLAGS + cc).encode(),
                                         platform.machine().encode(), _cpu_id()])).hexdigest()[:16]
        out = cpmtool_home() / "kernels" / f"{src.stem}-{key}.so"
        try:
            if not out.exists():
                out.parent.mkdir(parents=True, exist_ok=True)
                err = _compile(cc, src, out)
            if err is None:
                lib = ctypes.CDLL(str(out))
        except OSError as e:
            err = f"cannot build or load {out}: {e}"
    if err:
        _errors[name] = err
        if enabled():
            log.warning("C kernel %s unavailable (%s); using the torch path", src.name, err)
    _loaded[name] = lib
    return lib


def build_error(src: Path) -> str | None:
    """Why `load(src)` gave None (None when it loaded or was never asked)."""
    return _errors.get(str(src))
