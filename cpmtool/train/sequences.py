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
                      with_entropy: bool = True, entropy_grad: bool = False, pad_id: int = 0):
    """Log-probabilities (and entropies) of each response token given its prompt, (B, L) each.

    Returns (logp, entropy or None, mask), L = the longest response; mask is 1 on real response
    tokens. The logits are divided by `temperature` (the rollout's), as verl does. The entropy has
    a gradient only with `entropy_grad` (see `logprobs_and_entropy`).

    On our Transformer (or a DDP wrapper of one) a prompt shared by several rows runs once
    (`Transformer.response_logits`), otherwise rows run packed with the LM head on response
    positions only; any other module gets the plain padded forward. All three give the same values.
    """
    from cpmtool.model.transformer import Transformer

    ours = isinstance(getattr(model, "module", model), Transformer)  # a DistributedDataParallel wrapper too
    dev = next(model.parameters()).device
    lens = [len(r) for r in responses]
    width = max(lens)
    mask = torch.arange(width, device=dev)[None] < torch.tensor(lens, device=dev)[:, None]  # (B, L)
    targets = pad_rows(responses, pad_id, dev)  # (B, L)
    rows = [p + r for p, r in zip(prompts, responses, strict=True)]
    if ours:
        # logits at the real response tokens only, (N, V): the padding skips the LM head and the softmax
        keep = mask.flatten().nonzero().flatten()  # (N,)
        shared = _shared_prompts(model, prompts, responses, targets, pad_id, keep)
        if shared is not None:
            sel = model(None, responses=shared)
        else:
            ids = pad_rows(rows, pad_id, dev)  # (B, T)
            # the padding costs attention only, and the LM head runs on the response positions only
            sel = model(ids, lengths=[len(r) for r in rows], select=_response_positions(prompts, width, dev, ids.shape[1]),
                        keep=keep)
        lp, en = logprobs_and_entropy(sel, targets.flatten().index_select(0, keep), temperature, with_entropy,
                                      entropy_grad)  # (N,) each
        flat = lp.new_zeros(mask.numel())
        logp = flat.index_copy(0, keep, lp).view(mask.shape)
        ent = flat.index_copy(0, keep, en).view(mask.shape) if en is not None else None
        return logp, ent, mask.to(logp.dtype)
    ids = pad_rows(rows, pad_id, dev)  # (B, T)
    logits = model(ids)  # (B, T, V)
    idx = _response_positions(prompts, width, dev, ids.shape[1])
    sel = logits.gather(1, idx[..., None].expand(-1, -1, logits.shape[-1]))  # (B, L, V)
    logp, ent = logprobs_and_entropy(sel, targets, temperature, with_entropy, entropy_grad)
    zero = torch.zeros_like(logp)
    logp = torch.where(mask, logp, zero)
    if ent is not None:
        ent = torch.where(mask, ent, zero)
    return logp, ent, mask.to(logp.dtype)


def _response_positions(prompts: list[list[int]], width: int, dev, t: int) -> torch.Tensor:
    # (B, L): the logits at position len(prompt) - 1 + l predict response token l
    start = torch.tensor([len(p) - 1 for p in prompts], device=dev)
    return (start[:, None] + torch.arange(width, device=dev)[None]).clamp(max=t - 1)


def _shared_prompts(model, prompts, responses, targets, pad_id, keep=None):
    """Our Transformer's batch as a SharedPrompts when some prompt repeats (a GRPO group, a DPO pair)
    and the model runs it (dense attention: the cache path of a sparse kernel has no backward)."""
    from cpmtool.model.transformer import SharedPrompts

    if getattr(model, "module", model).config.attention != "dense":
        return None
    rows: dict[tuple, int] = {}
    group = [rows.setdefault(tuple(p), len(rows)) for p in prompts]
    if len(rows) == len(prompts):
        return None
    dev = targets.device
    uniq = [list(p) for p in rows]
    return SharedPrompts(pad_rows(uniq, pad_id, dev), [len(p) for p in uniq], targets,
                         [len(r) for r in responses], torch.tensor(group, device=dev), keep)


def padded(values: list[list[float]], width: int | None = None) -> torch.Tensor:
    """Ragged float lists -> (B, L) right-padded with 0."""
    width = width or max(len(v) for v in values)
    out = torch.zeros(len(values), width)
    for i, v in enumerate(values):
        out[i, : len(v)] = torch.tensor(v[:width], dtype=torch.float32)
    return out


# ---------------------------------------------------------------- SFT / DPO examples


def _render(tokenizer, messages: list[dict], gen: bool) -> str:
    from cpmtool.model.tokenizer import chat_prompt

    return chat_prompt(tokenizer, messages, add_generation_prompt=gen) if messages else ""


def chat_pieces(tokenizer, messages: list[dict]) -> list[tuple[str, bool]]:
    """The chat-templated text of `messages` cut into (text, is_assistant_reply) pieces.

    A reply piece is what the template adds for an assistant turn after the generation prompt
    (its content and end-of-turn marker), so training on it teaches the model to end its turn.

    Raises:
        InputError: the template does not render prefixes consistently (cannot locate replies).
    """
    pieces, prev = [], ""
    for i, msg in enumerate(messages):
        if msg.get("role") != "assistant":
            continue
        head = _render(tokenizer, messages[:i], gen=True)
        full = _render(tokenizer, messages[: i + 1], gen=False)
        if not (head.startswith(prev) and full.startswith(head)):
            raise InputError("chat_template_not_prefix_stable")
        pieces += [(head[len(prev):], False), (full[len(head):], True)]
        prev = full
    return [(t, a) for t, a in pieces if t]


def as_messages(record: dict, tokenizer) -> list[dict] | None:
    """SFT record -> chat messages (messages, or prompt + completion as a user/assistant pair);
    None for prompt + completion on a tokenizer without a chat template (trained as raw text)."""
    msgs = record.get("messages")
    if msgs is not None:
        if not (isinstance(msgs, list) and msgs and all(isinstance(m, dict) and isinstance(m.get("content"), str)
                                                        and isinstance(m.get("role"), str) for m in msgs)):
            raise InputError("bad_messages")
        if not any(m["role"] == "assistant" for m in msgs):
            raise InputError("no_assistant_turn")
        return msgs
    prompt, completion = record.get("prompt"), record.get("completion")
    if not isinstance(prompt, str) or not isinstance(completion, str):
        raise InputError("no_messages_or_prompt_completion")
    if not getattr(tokenizer, "chat_template", None):
        return None
    return [{"role": "user", "content": prompt}, {"role": "assistant", "content": completion}]


def sft_example(tokenizer, record: dict, eos: int, max_len: int) -> tuple[list[int], list[int]]:
    """(input ids, labels) of one SFT record; labels are -100 except on the assistant replies.

    labels[t] is the target at position t (the next token), so they line up with the logits.

    Raises:
        InputError: a malformed record, or nothing left to learn after truncation to `max_len`.
    """
    msgs = as_messages(record, tokenizer)
    if msgs is None:
        pieces = [(record["prompt"], False), (record["completion"], True)]
    else:
        pieces = chat_pieces(tokenizer, msgs)
    ids, learn = [], []
    for text, reply in pieces:
        toks = tokenizer.encode(text, add_special_tokens=False)
        ids += toks
        learn += [reply] * len(toks)
    if msgs is None:
        ids.append(eos)
        learn.append(True)
    ids, learn = ids[:max_len], learn[:max_len]
    labels = [t if ok else -100 for t, ok in zip(ids[1:], learn[1:], strict=True)] + [-100]
    if all(x == -100 for x in labels):
        raise InputError("nothing_to_learn")
    return ids, labels


def preference_example(tokenizer, record: dict, eos: int, max_len: int) -> tuple[list[int], list[int], list[int]]:
    """(prompt ids, chosen reply ids, rejected reply ids) of a preference record.

    The prompt is `messages` (or `prompt` as a user turn) through the chat template with the
    generation prompt; a reply is what the template adds for the assistant turn (end marker
    included). Without a chat template: raw prompt text and reply + EOS. Replies are truncated so
    that prompt + reply fits `max_len`.
    """
    chosen, rejected = record.get("chosen"), record.get("rejected")
    if not isinstance(chosen, str) or not isinstance(rejected, str):
        raise InputError("no_chosen_rejected")
    msgs = record.get("messages")
    if msgs is None:
        if not isinstance(record.get("prompt"), str):
            raise InputError("no_prompt")
        msgs = [{"role": "user", "content": record["prompt"]}]
    if getattr(tokenizer, "chat_template", None):
        head = _render(tokenizer, msgs, gen=True)
        p_ids = tokenizer.encode(head, add_special_tokens=False)

        def reply(text: str) -> list[int]:
            full = _render(tokenizer, [*msgs, {"role": "assistant", "content": text}], gen=False)
            if not full.startswith(head):
                raise InputError("chat_template_not_prefix_stable")
            return tokenizer.encode(full[len(head):], add_special_tokens=False)
    else:
        p_ids = tokenizer.encode("\n".join(m["content"] for m in msgs), add_special_tokens=False)

        def reply(text: str) -> list[int]:
            return tokenizer.encode(text, add_special_tokens=False) + [eos]
    room = max_len - len(p_ids)
    if room < 1:
        raise InputError("prompt_too_long")
    c, r = reply(chosen)[:room], reply(rejected)[:room]
    return p_ids, c, r
