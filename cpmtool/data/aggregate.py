"""AFT propose-and-aggregate (Aggregation Fine-Tuning, arXiv 2501.11877; the loop of Linzwcs/AFT `MoA`).

With K proposals and L layers, for each prompt:

    P0 = K samples of the query                                  (proposals)
    P1 .. P(L-1) = K samples of AGG(query, P(l-1))              (intermediate aggregations)
    answers = n samples of AGG(query, P(L-1))                   (the sample records)

so `layers=1` is "K proposals, then n aggregations of them". Every sample record keeps
`proposals` (a list of L lists of K texts, P0 first) and `proposal_tokens` (their total length).

AGG(query, proposals) follows AFT's layout (the instruction can be replaced). A chat query (`messages`) gets a system turn made of
`AGGREGATOR_INSTRUCTION`, a blank line, `Responses from models:` and the numbered proposals
(`1. <p1>\\n2. <p2>...`), followed by the query's own turns (an existing system turn is appended
to the aggregator's, after a blank line). A plain-text query becomes the same text block, a blank
line, then the query:

    <AGGREGATOR_INSTRUCTION>

    Responses from models:
    1. <proposal 1>
    2. <proposal 2>

    <query>
"""

from __future__ import annotations

from collections.abc import Iterator

from cpmtool.data.rollout import derive_seed, refused, trajectory_of
from cpmtool.io import Reject

# The Mixture-of-Agents aggregator prompt that AFT's aggregation layers use.
AGGREGATOR_INSTRUCTION = (
    "You have been provided with a set of responses from various models to the latest user query. "
    "Your task is to synthesize these responses into a single, high-quality response. It is crucial to "
    "critically evaluate the information provided in these responses, recognizing that some of it may be "
    "biased or incorrect. Your response should not simply replicate the given answers but should offer a "
    "refined, accurate, and comprehensive reply to the instruction. Ensure your response is well-structured, "
    "coherent, and adheres to the highest standards of accuracy and reliability."
)


def aggregation_block(proposals: list[str], instruction: str = AGGREGATOR_INSTRUCTION) -> str:
    """The aggregator instruction followed by the numbered proposals."""
    numbered = "\n".join(f"{i}. {p}" for i, p in enumerate(proposals, 1))
    return f"{instruction}\n\nResponses from models:\n{numbered}"


def aggregation_query(query: dict, proposals: list[str], instruction: str = AGGREGATOR_INSTRUCTION) -> dict:
    """The query that asks the model to aggregate `proposals`: `{"messages"}` or `{"prompt"}` like `query`."""
    block = aggregation_block(proposals, instruction)
    if "messages" in query:
        msgs = list(query["messages"])
        if msgs and msgs[0].get("role") == "system":
            block = f"{block}\n\n{msgs[0]['content']}"
            msgs = msgs[1:]
        return {"messages": [{"role": "system", "content": block}, *msgs]}
    return {"prompt": f"{block}\n\n{query['prompt']}"}


def aggregate_stage(run, k: int, layers: int, instruction: str | None = None):
    """The rollout stage of propose-and-aggregate; `run` is the rollout's `_Run`.

    `instruction` replaces AGGREGATOR_INSTRUCTION (a model with a short context, like cpm-tiny's
    512 positions, has no room for the full text next to the proposals).
    """
    instruction = AGGREGATOR_INSTRUCTION if instruction is None else instruction
    def stage(records: Iterator[dict]) -> Iterator[dict | Reject]:
        for batch, rejected in run.batches(records, max(k, run.params.n)):
            yield from rejected
            first = [p.request for p in batch]
            for req in first:
                req.params = req.params.with_(n=k)
            results = run.engine.generate(first)
            yield from (refused(p, r) for p, r in zip(batch, results, strict=True) if r.error is not None)
            layers_of = [[[c.text for c in r.completions]] for r in results]
            tokens = [sum(len(c.token_ids) for c in r.completions) for r in results]
            alive = [i for i, r in enumerate(results) if r.error is None]
            finals = {}
            for layer in range(1, layers + 1):
                width = run.params.n if layer == layers else k
                reqs, keep = [], []
                for i in alive:
                    p = batch[i]
                    params = run.params.with_(n=width, seed=derive_seed(run.params.seed, p.group, "layer", layer))
                    req = run.make_request(aggregation_query(p.query, layers_of[i][-1], instruction), params, str(i))
                    if isinstance(req, str):
                        yield Reject(p.record, f"aggregate_{req}", p.position)
                        continue
                    reqs.append(req)
                    keep.append(i)
                alive = []
                for i, r in zip(keep, run.engine.generate(reqs), strict=True):
                    if r.error is not None:
                        yield refused(batch[i], r)
                        continue
                    alive.append(i)
                    if layer == layers:
                        finals[i] = r
                    else:
                        layers_of[i].append([c.text for c in r.completions])
                        tokens[i] += sum(len(c.token_ids) for c in r.completions)
            for i in alive:
                extra = {"proposals": layers_of[i], "proposal_tokens": tokens[i]}
                yield from run.group_records(batch[i], [trajectory_of(c) for c in finals[i].completions], extra)

    return stage
