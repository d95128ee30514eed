"""Kernel tests: without a GPU, Triton kernels run in its interpreter on CPU tensors.

TRITON_INTERPRET must be set before `triton` is imported (the `@triton.jit` decorator reads it).
"""

import ctypes
import os
import shutil
import subprocess

import pytest
import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")


@pytest.fixture(autouse=True)
def _home(tmp_path, monkeypatch):
    monkeypatch.setenv("CPMTOOL_HOME", str(tmp_path / "home"))


@pytest.fixture
def stub_build(tmp_path):
    """build(src) -> the C source compiled for a CPU without AVX2/FMA (no -march=native), loaded:
    its functions are then the stubs that send every caller to the torch path."""
    if shutil.which("cc") is None:
        pytest.skip("no C compiler")

    def build(src):
        so = tmp_path / f"{src.stem}-stub.so"
        subprocess.run(["cc", "-O2", "-fPIC", "-shared", "-std=c11", "-o", str(so), str(src)], check=True)
        return ctypes.CDLL(str(so))

    return build
