"""Ternary matmul: the packing format by hand, the CPU path and the module against the reference."""

import pytest
import torch
from cpmtool.kernels.ternary_matmul import (
    PackedTernaryLinear,
    act_quant,
    dequantize,
    pack_ternary,
    ternary_matmul,
    unpack_ternary,
)
from cpmtool.kernels.ternary_matmul import reference as ref
from cpmtool.kernels.ternary_matmul.cpu import DenseCache, ternary_matmul_cpu


def test_pack_layout_by_hand():
    # codes w+1: [-1, 0, 1, 1 | 0, -1] -> [0, 1, 2, 2 | 1, 0, pad 1, pad 1]
    q = torch.tensor([[-1, 0, 1, 1, 0, -1]], dtype=torch.int8)
    p = pack_ternary(q)
    assert p.dtype == torch.uint8 and p.shape == (1, 2)
    assert p.tolist() == [[0 | 1 << 2 | 2 << 4 | 2 << 6, 1 | 0 << 2 | 1 << 4 | 1 << 6]]  # [164, 81]
    assert unpack_ternary(p, 6).tolist() == q.tolist()


@pytest.mark.parametrize("n, k", [(1, 1), (5, 7), (33, 128), (3, 130)])
def test_pack_round_trip(n, k):
    q = torch.randint(-1, 2, (n, k), dtype=torch.int8, generator=torch.Generator().manual_seed(k))
    assert torch.equal(unpack_ternary(pack_ternary(q), k), q)


def test_dequantize_groups_by_hand():
    q = torch.tensor([[1, -1, 0, 1], [0, 1, 1, -1]], dtype=torch.int8)
    scale = torch.tensor([[0.5, 2.0], [3.0, 0.25]])  # groups of 2 inputs
    want = torch.tensor([[0.5, -0.5, 0.0, 2.0], [0.0, 3.0, 0.25, -0.25]])
    torch.testing.assert_close(dequantize(pack_ternary(q), scale, 4), want)
    torch.testing.assert_close(dequantize(pack_ternary(q), torch.tensor([[2.0]]), 4), 2.0 * q.float())


def test_act_quant_by_hand():
    x = torch.tensor([[1.0, -0.5, 0.26, 0.0]])
    # s = 127 / 1 -> round(127, -63.5, 33.02, 0) = (127, -64, 33, 0) (round half to even), / 127
    torch.testing.assert_close(act_quant(x, 8), torch.tensor([[127.0, -64.0, 33.0, 0.0]]) / 127)
    assert act_quant(x, 16) is x  # float activations
    y = torch.tensor([[0.0, 0.0]])  # all-zero token: scale clamps, no NaN
    assert torch.equal(act_quant(y, 8), y)


def test_matmul_by_hand():
    q = torch.tensor([[1, 0, -1], [1, 1, 1]], dtype=torch.int8)
    x = torch.tensor([[2.0, 3.0, 4.0]])
    y = ref.ternary_matmul(x, pack_ternary(q), torch.tensor([[0.5]]), 3, act_bits=16, bias=torch.tensor([1.0, 0.0]))
    torch.testing.assert_close(y, torch.tensor([[0.5 * (2 - 4) + 1.0, 0.5 * 9]]))


CASES = [(1, 5, 7, 0), (3, 17, 64, 32), (8, 64, 130, 0), (2, 33, 96, 16)]


@pytest.mark.parametrize("m, n, k, group", CASES)
@pytest.mark.parametrize("act_bits", [8, 16])
def test_cpu_path_matches_reference(m, n, k, group, act_bits):
    gen = torch.Generator().manual_seed(m * n + k)
    q = torch.randint(-1, 2, (n, k), dtype=torch.int8, generator=gen)
    scale = torch.rand(n, k // group, generator=gen) + 0.1 if group else torch.tensor([[0.37]])
    x, bias = torch.randn(2, m, k, generator=gen), torch.randn(n, generator=gen)
    p = pack_ternary(q)
    want = ref.ternary_matmul(x, p, scale, k, act_bits, bias)
    cache = DenseCache()
    torch.testing.assert_close(ternary_matmul_cpu(x, p, scale, k, act_bits, bias, cache), want, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(ternary_matmul(x, p, scale, k, act_bits, bias, cache), want, atol=1e-5, rtol=1e-5)


def test_cache_follows_in_place_updates():
    q = torch.ones(2, 4, dtype=torch.int8)
    p, s, cache, x = pack_ternary(q), torch.tensor([[1.0]]), DenseCache(), torch.ones(1, 4)
    assert ternary_matmul_cpu(x, p, s, 4, 16, cache=cache).tolist() == [[4.0, 4.0]]
    p.copy_(pack_ternary(-q))  # a load_state_dict into the buffer must not serve the stale weight
    assert ternary_matmul_cpu(x, p, s, 4, 16, cache=cache).tolist() == [[-4.0, -4.0]]


def test_module_state_dict_and_forward():
    lin = PackedTernaryLinear(10, 3, bias=True, group_size=5, act_bits=8)
    assert lin.weight_packed.shape == (3, 3) and lin.weight_scale.shape == (3, 2)
    assert set(lin.state_dict()) == {"weight_packed", "weight_scale", "bias"}
    q = torch.randint(-1, 2, (3, 10), dtype=torch.int8, generator=torch.Generator().manual_seed(1))
    lin.load_state_dict({"weight_packed": pack_ternary(q), "weight_scale": torch.full((3, 2), 0.2),
                         "bias": torch.tensor([1.0, 2.0, 3.0])})
    x = torch.randn(4, 10)
    torch.testing.assert_close(lin(x), ref.ternary_matmul(x, lin.weight_packed, lin.weight_scale, 10, 8, lin.bias))
    with pytest.raises(ValueError, match="group_size"):
        PackedTernaryLinear(10, 3, group_size=4)


def test_shared_activation_quant_recomputes_after_changes():
    from cpmtool.kernels.ternary_matmul.cpu import act_quant_shared

    x = torch.tensor([[1.0, -0.5, 0.26]])
    a = act_quant_shared(x, 8)
    assert act_quant_shared(x, 8) is a  # the same tensor again (q, k, v projections)
    x.mul_(2.0)  # an in-place change bumps the version: recomputed
    torch.testing.assert_close(act_quant_shared(x, 8), act_quant(x, 8))
    y = x.clone()  # equal values, another tensor: recomputed, same result
    assert act_quant_shared(y, 8) is not a and torch.equal(act_quant_shared(y, 8), act_quant(x, 8))
    assert not torch.equal(act_quant_shared(x, 4), act_quant(x, 8))  # the bit width is part of the key
