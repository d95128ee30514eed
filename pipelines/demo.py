"""`make demo`: the embedded models answer a few test prompts, with timings.

Each landed issue adds its step here. Output goes to stdout as a readable report; the data
commands it runs are the same ones a user pipes together.
"""

from __future__ import annotations

import time

import torch

from cpmtool.data.tasks import generate_tasks, grade
from cpmtool.model.loader import load_model
from cpmtool.model.tokenizer import load_tokenizer


def answer(model, tok, messages, max_new_tokens):
    ids = tok.apply_chat_template(messages, add_generation_prompt=True, tokenize=True)
    ids = list(ids["input_ids"] if isinstance(ids, dict) else ids)
    t0 = time.perf_counter()
    out = model.greedy(ids, max_new_tokens)
    dt = time.perf_counter() - t0
    return tok.decode(out, skip_special_tokens=True).strip(), len(out), dt


def section(title):
    print(f"\n== {title} " + "=" * max(0, 70 - len(title)))


def main():
    torch.set_num_threads(2)
    section("cpm-tiny: arithmetic test split (greedy)")
    t0 = time.perf_counter()
    model, cfg = load_model("cpm-tiny")
    tok = load_tokenizer("cpm-tiny")
    print(f"loaded cpm-tiny ({model.num_parameters() / 1e6:.1f} M params, {cfg.family}) "
          f"in {time.perf_counter() - t0:.2f}s")
    n_ok = 0
    records = list(generate_tasks("arithmetic", split="test", n=6, seed=0))
    for rec in records:
        text, n, dt = answer(model, tok, [{"role": "user", "content": rec["prompt"]}], 160)
        ok = grade(rec, text)
        n_ok += ok
        print(f"\n> {rec['prompt']}\n{text}\n[{'correct' if ok else 'wrong'}; gold {rec['answer']}; "
              f"{n} tokens in {dt:.2f}s = {n / dt:.0f} tok/s]")
    print(f"\ncpm-tiny: {n_ok}/{len(records)} correct")

    section("smollm2-135m: chat (greedy)")
    t0 = time.perf_counter()
    model, cfg = load_model("smollm2-135m")
    tok = load_tokenizer("smollm2-135m")
    print(f"loaded smollm2-135m ({model.num_parameters() / 1e6:.0f} M params) in {time.perf_counter() - t0:.2f}s")
    for q in ["What is the capital of France?", "Give me three tips for staying healthy.",
              "Write a haiku about the sea."]:
        text, n, dt = answer(model, tok, [{"role": "user", "content": q}], 64)
        print(f"\n> {q}\n{text}\n[{n} tokens in {dt:.2f}s = {n / dt:.0f} tok/s]")


if __name__ == "__main__":
    main()
