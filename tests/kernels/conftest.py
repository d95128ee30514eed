"""Kernel tests: without a GPU, Triton kernels run in its interpreter on CPU tensors.

TRITON_INTERPRET must be set before `triton` is imported (the `@triton.jit` decorator reads it).
"""

import os

import pytest
import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")


@pytest.fixture(autouse=True)
def _home(tmp_path, monkeypatch):
    monkeypatch.setenv("CPMTOOL_HOME", str(tmp_path / "home"))
