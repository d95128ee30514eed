"""Ternary matmul Triton kernel against the reference: Triton's interpreter on CPU (small, odd shapes),
compiled on a GPU when there is one."""

import pytest
import torch
from cpmtool.kernels.ternary_matmul import pack_ternary
from cpmtool.kernels.ternary_matmul import reference as ref

pytest.importorskip("triton")
from cpmtool.kernels.ternary_matmul import triton as tri  # noqa: E402  (after the interpreter switch in conftest)

DEV = "cuda" if torch.cuda.is_available() else "cpu"
requires_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")


def case(m, n, k, group, seed=0):
    gen = torch.Generator().manual_seed(seed)
    q = torch.randint(-1, 2, (n, k), dtype=torch.int8, generator=gen)
    scale = torch.rand(n, k // group, generator=gen) + 0.1 if group else torch.tensor([[0.37]])
    x, bias = torch.randn(m, k, generator=gen), torch.randn(n, generator=gen)
    return x.to(DEV), pack_ternary(q).to(DEV), scale.to(DEV), bias.to(DEV)


@pytest.mark.parametrize("m, n, k, group", [(1, 5, 7, 0), (3, 70, 37, 0), (17, 33, 96, 32), (5, 123, 123, 41)])
@pytest.mark.parametrize("act_bits", [8, 16])
def test_kernel_matches_reference(m, n, k, group, act_bits):
    x, p, s, b = case(m, n, k, group, seed=m + n + k)
    want = ref.ternary_matmul(x, p, s, k, act_bits, b)
    torch.testing.assert_close(tri.ternary_matmul_fwd(x, p, s, k, act_bits, b), want, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(tri.ternary_matmul_fwd(x, p, s, k, act_bits), want - b, atol=1e-5, rtol=1e-5)


def test_kernel_keeps_leading_dims():
    x, p, s, _ = case(6, 9, 20, 0)
    got = tri.ternary_matmul_fwd(x.view(2, 3, 20), p, s, 20)
    torch.testing.assert_close(got, ref.ternary_matmul(x, p, s, 20).view(2, 3, 9), atol=1e-5, rtol=1e-5)


def test_settings_name_the_limit():
    with pytest.raises(RuntimeError, match="divisible"):
        tri.calculate_settings(1, 4, 10, 3)


@requires_cuda
@pytest.mark.gpu
def test_full_size_on_gpu():
    # smollm2-135m's MLP down projection, prefill and decode, bf16 activations
    for m in (1, 512):
        x, p, s, _ = case(m, 576, 1536, 64)
        want = ref.ternary_matmul(x, p, s, 1536)
        got = tri.ternary_matmul_fwd(x.bfloat16(), p, s, 1536).float()
        assert ((got - want).pow(2).mean().sqrt() / want.pow(2).mean().sqrt()).item() < 1e-2
