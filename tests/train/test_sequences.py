"""Response log-probs: the packed and the shared-prompt forwards against one row at a time."""

from __future__ import annotations

import pytest
import torch

from cpmtool.model import transformer
from cpmtool.model.loader import load_model
from cpmtool.train import sequences
from cpmtool.train.sequences import response_logprobs


@pytest.fixture(scope="module")
def model():
    m, _ = load_model("cpm-tiny")
    return m.train()


def _batch(shared: bool, shuffled: bool = False):
    """Four prompts of different lengths, three responses each (lengths 1 to 9); with `shared` off
    every row gets its own prompt (the group's prompt with a different last token). `shuffled`
    interleaves the groups' rows (a prompt's responses no longer side by side)."""
    g = torch.Generator().manual_seed(1)
    prompts, responses = [], []
    for gi in range(4):
        p = torch.randint(5, 300, (3 + 2 * gi,), generator=g).tolist()
        for j in range(3):
            prompts.append(p if shared else p[:-1] + [5 + 10 * gi + j])
            responses.append(torch.randint(5, 300, ((gi * 3 + j) % 9 + 1,), generator=g).tolist())
    if shuffled:
        order = torch.randperm(len(prompts), generator=g).tolist()
        prompts, responses = [prompts[i] for i in order], [responses[i] for i in order]
    return prompts, responses


def _one_row_at_a_time(model, prompts, responses):
    out = []
    for p, r in zip(prompts, responses, strict=True):
        logits = model(torch.tensor([p + r]))[0, len(p) - 1: len(p) + len(r) - 1]  # (len(r), V)
        out.append(logits.log_softmax(-1).gather(1, torch.tensor(r)[:, None])[:, 0])
    return out


def _grads(model, loss):
    model.zero_grad(set_to_none=True)
    loss.backward()
    return [p.grad.clone() for p in model.parameters()]


@pytest.mark.parametrize("packed", [True, False], ids=["varlen-kernel", "sdpa-padded"])
@pytest.mark.parametrize(("shared", "shuffled"), [(True, False), (True, True), (False, False)],
                         ids=["shared-prompts", "shared-prompts-interleaved", "distinct-prompts"])
def test_response_logprobs_and_gradients_match_one_row_at_a_time(model, shared, shuffled, packed, monkeypatch):
    # side by side, a prompt's K/V fan out to its responses as an expand; interleaved, by index. On
    # this CPU attention runs packed (kernels/varlen_attention) unless switched off: SDPA on padded rows
    if not packed:
        monkeypatch.setattr(transformer, "_varlen_kernel", False)
    elif not transformer._varlen_ok(model.config, model.model.embed_tokens.weight):
        pytest.skip("the varlen kernel is not built here")
    prompts, responses = _batch(shared, shuffled)
    calls = []
    real = sequences._shared_prompts
    monkeypatch.setattr(sequences, "_shared_prompts", lambda *a: calls.append(real(*a)) or calls[-1])
    logp, ent, mask = response_logprobs(model, prompts, responses)
    assert (calls[0] is not None) == shared  # the path under test is the one that ran
    ref = _one_row_at_a_time(model, prompts, responses)
    for b, want in enumerate(ref):
        n = len(want)
        assert mask[b, :n].all() and not mask[b, n:].any()
        assert torch.allclose(logp[b, :n], want, atol=2e-5), b
        assert (logp[b, n:] == 0).all() and (ent[b, n:] == 0).all()
    # the gradients of a weighted sum: the n rows of a prompt add up in its (shared) activations
    w = torch.linspace(0.5, 2.0, logp.numel()).view_as(logp)
    got = _grads(model, (logp * w).sum())
    want = _grads(model, sum((lp * w[b, : len(lp)]).sum() for b, lp in enumerate(ref)))
    for a, b in zip(got, want, strict=True):
        assert torch.allclose(a, b, rtol=1e-4, atol=1e-6 * float(b.abs().max()))


def test_two_token_responses_without_autograd(model):
    # one response token fed per row: without autograd the response pass takes the CPU decode
    # kernels, which read the prompt's K/V by slot (prompt token i at slot i, the response at slot P)
    prompts, responses = _batch(True)
    responses = [r[:1] + [7] for r in responses]
    with torch.no_grad():
        logp, _, _ = response_logprobs(model, prompts, responses)
        ref = _one_row_at_a_time(model, prompts, responses)
    for b, want in enumerate(ref):
        assert torch.allclose(logp[b], want, atol=2e-5), b


def test_entropy_is_that_of_the_tempered_distribution(model):
    prompts, responses = _batch(True)
    _, ent, _ = response_logprobs(model, prompts, responses, temperature=0.7)
    p, r = prompts[4], responses[4]
    logits = model(torch.tensor([p + r]))[0, len(p) - 1: len(p) + len(r) - 1] / 0.7
    want = -(logits.softmax(-1) * logits.log_softmax(-1)).sum(-1)
    assert torch.allclose(ent[4, : len(r)], want, atol=2e-5)


def test_any_other_module_gets_the_plain_forward(model):
    # a module that is not our Transformer (here: a wrapper taking input ids only) is called with
    # the padded ids alone, and the values are the same
    class Plain(torch.nn.Module):
        def __init__(self, inner):
            super().__init__()
            self.inner = inner

        def forward(self, ids):
            return self.inner(ids)

    prompts, responses = _batch(True)
    got, _, _ = response_logprobs(Plain(model), prompts, responses)
    want, _, _ = response_logprobs(model, prompts, responses)
    assert torch.allclose(got, want, atol=2e-5)


def test_fan_out_is_an_expand_for_side_by_side_groups():
    from cpmtool.model.transformer import _fan_out

    x = torch.arange(6.0).view(3, 2).requires_grad_()
    for group in ([0, 0, 1, 1, 2, 2], [0, 1, 0, 2, 1, 2], [0, 0, 1, 2]):
        idx = torch.tensor(group)
        y = _fan_out(idx, 3)(x)
        assert torch.equal(y, x.index_select(0, idx))
        (gx,) = torch.autograd.grad((y * torch.arange(1.0, y.numel() + 1).view_as(y)).sum(), x)
        # row r's gradient: the sum of the weights of the rows fanned out from it
        w = torch.arange(1.0, y.numel() + 1).view_as(y)
        assert torch.equal(gx, torch.zeros(3, 2).index_add(0, idx, w))
        assert (y.grad_fn.name().startswith("IndexSelect")) == (group != [0, 0, 1, 1, 2, 2])
