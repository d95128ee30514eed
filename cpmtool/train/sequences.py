"""Token sequences for training: prompts and responses to padded tensors, response log-probs.

A training row is `prompt_ids + response_ids`, right-padded. Right padding keeps every real token
before every pad, so plain causal attention never lets a real token see padding, and positions
start at 0 for every row.
"""

from __future__ import annotations

import torch

from cpmtool.errors import InputError
from cpmtool.train.losses import logprobs_and_entropy


def prompt_query(record: dict, *, chat: bool = False) -> dict:
    """The request fields of a prompt record: {"messages": [...]} or {"prompt": "..."}.

    A plain `prompt` goes through the chat template as a user turn when `chat` is set.

    Raises:
        InputError: the record has no usable prompt.
    """
    msgs = record.get("messages")
    if msgs is not None:
        if not (isinstance(msgs, list) and msgs and all(isinstance(m, dict) and isinstance(m.get("content"), str)
                                                        for m in msgs)):
            raise InputError("bad_messages")
        return {"messages": msgs}
    text = record.get("prompt")
    if not isinstance(text, str) or not text.strip():
        raise InputError("no_prompt")
    return {"messages": [{"role": "user", "content": text}]} if chat else {"prompt": text}


def encode_query(tokenizer, query: dict) -> list[int]:
    if "messages" in query:
        from cpmtool.model.tokenizer import encode_chat

        return encode_chat(tokenizer, query["messages"])
    return tokenizer.encode(query["prompt"], add_special_tokens=False)


def eos_id(tokenizer, model_config) -> int:
    """The token that ends an assistant turn: the tokenizer's EOS, else the model's first EOS."""
    if getattr(tokenizer, "eos_token_id", None) is not None:
        return int(tokenizer.eos_token_id)
    ids = model_config.eos_ids
    if not ids:
        raise InputError("the model has no EOS token to end a response with")
    return int(ids[0])


def pad_rows(rows: list[list[int]], pad_id: int, device=None) -> torch.Tensor:
    width = max(len(r) for r in rows)
    out = torch.full((len(rows), width), pad_id, dtype=torch.long, device=device)
    for i, r in enumerate(rows):
        out[i, : len(r)] = torch.tensor(r, dtype=torch.long, device=device)
    return out


def response_logprobs(model, prompts: list[list[int]], responses: list[list[int]], *, temperature: float = 1.0,
                      with_entropy: bool = True, pad_id: int = 0):
    """Log-probabilities (and entropies) of each response token given its prompt, (B, L) each.

    Returns (logp, entropy or None, mask), L = the longest response; mask is 1 on real response
    tokens. The logits are divided by `temperature` (the rollout's), as verl does.
    """
    dev = next(model.parameters()).device
    lens = [len(r) for r in responses]
    width = max(lens)
    ids = pad_rows([p + r for p, r in zip(prompts, responses, strict=True)], pad_id, dev)  # (B, T)
    logits = model(ids)  # (B, T, V)
    # logits at position len(prompt) - 1 + l predict response token l
    start = torch.tensor([len(p) - 1 for p in prompts], device=dev)
    idx = (start[:, None] + torch.arange(width, device=dev)[None]).clamp(max=ids.shape[1] - 1)  # (B, L)
    mask = torch.arange(width, device=dev)[None] < torch.tensor(lens, device=dev)[:, None]  # (B, L)
    sel = logits.gather(1, idx[..., None].expand(-1, -1, logits.shape[-1]))  # (B, L, V)
    targets = pad_rows(responses, pad_id, dev)  # (B, L)
    logp, ent = logprobs_and_entropy(sel, targets, temperature, with_entropy)
    zero = torch.zeros_like(logp)
    logp = torch.where(mask, logp, zero)
    if ent is not None:
        ent = torch.where(mask, ent, zero)
    return logp, ent, mask.to(logp.dtype)


def padded(values: list[list[float]], width: int | None = None) -> torch.Tensor:
    """Ragged float lists -> (B, L) right-padded with 0."""
    width = width or max(len(v) for v in values)
    out = torch.zeros(len(values), width)
    for i, v in enumerate(values):
        out[i, : len(v)] = torch.tensor(v[:width], dtype=torch.float32)
    return out
