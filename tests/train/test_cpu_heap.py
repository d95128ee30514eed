"""`train.cpu_heap`: glibc keeps a training step's freed activations for the next step."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

# A step's activations: four 42 MB tensors alive at once, then all freed (41,000 pages of 4 KiB). glibc's
# dynamic mmap threshold stops at 32 MB, so by default blocks this big are always mmap'd and unmapped on
# free (a large model's logits, say); smaller ones come and go with the heap top, depending on what else
# sits there. The figure printed is the minor page faults of five such steps after four first ones, per step.
STEPS = """
import resource, torch
torch.set_num_threads(1)
from cpmtool.train.cpu_heap import keep_freed_memory
state = keep_freed_memory()
def step():
    live = [torch.ones(10_500_000) for _ in range(4)]
    return sum(float(t[0]) for t in live)
for _ in range(4):  # the heap grows to its working size over the first steps
    step()
f0 = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
for _ in range(5):
    step()
print(state, (resource.getrusage(resource.RUSAGE_SELF).ru_minflt - f0) / 5)
"""
PAGES = 4 * 10_500_000 * 4 // 4096


def _faults(**env) -> tuple[str, float]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("MALLOC_") and k != "CPMTOOL_MALLOC_TUNE"} | env
    out = subprocess.run([sys.executable, "-c", STEPS], env=env, capture_output=True, text=True, check=True)
    state, faults = out.stdout.split()
    return state, float(faults)


@pytest.mark.skipif(sys.platform != "linux", reason="glibc's mallopt")
def test_freed_activations_are_reused_instead_of_faulted_in_again():
    # each process sets its own allocator, so each variant runs in a fresh one
    kept, kept_faults = _faults()
    off, off_faults = _faults(CPMTOOL_MALLOC_TUNE="0")
    assert (kept, off) == ("kept", "disabled")
    # glibc's defaults give the memory back at the end of every step: every page faults in again
    assert off_faults > 0.9 * PAGES
    assert kept_faults < PAGES / 10


@pytest.mark.parametrize(("env", "state"), [
    ({"CPMTOOL_MALLOC_TUNE": "0"}, "disabled"),
    ({"MALLOC_TRIM_THRESHOLD_": "1000000"}, "user_setting"),
    ({"LD_PRELOAD": "/usr/lib/x86_64-linux-gnu/libjemalloc.so.2"}, "user_setting"),
])
def test_a_user_choice_is_left_alone(monkeypatch, env, state):
    from cpmtool.train import cpu_heap

    for k, v in env.items():
        monkeypatch.setenv(k, v)
    assert cpu_heap._apply() == state  # decided before any mallopt call: this process is untouched
