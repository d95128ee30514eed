"""The trainers' AdamW: the fused kernel where torch has one, with the for-loop's update."""

import torch

from cpmtool.train.optim import adamw


def test_fused_adamw_matches_the_for_loop_update():
    gen = torch.Generator().manual_seed(0)
    start = [torch.randn(7, 5, generator=gen), torch.randn(5, generator=gen)]
    a = [torch.nn.Parameter(x.clone()) for x in start]
    b = [torch.nn.Parameter(x.clone()) for x in start]
    ours = adamw(a, lr=1e-2, weight_decay=0.1)
    plain = torch.optim.AdamW(b, lr=1e-2, weight_decay=0.1, foreach=False)
    assert ours.param_groups[0]["fused"] is True
    for _ in range(5):
        grads = [torch.randn(x.shape, generator=gen) for x in start]
        for p, q, g in zip(a, b, grads, strict=True):
            p.grad, q.grad = g.clone(), g.clone()
        ours.step()
        plain.step()
    for p, q, x in zip(a, b, start, strict=True):
        assert not torch.equal(p, x)  # it moved
        assert torch.allclose(p, q, atol=1e-6, rtol=1e-6)
    # and its state reloads into the plain optimizer (checkpoints stay interchangeable)
    plain.load_state_dict(ours.state_dict())


def test_parameters_torch_cannot_fuse_take_the_plain_path():
    p = torch.nn.Parameter(torch.zeros(3, dtype=torch.float64))
    assert not adamw([p], lr=1e-3).param_groups[0]["fused"]
