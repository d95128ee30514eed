#!/usr/bin/env bash
# `make demo`: the embedded models answer a few test prompts, with timings, through the same
# commands a user pipes together. Each landed issue adds its step here.
set -euo pipefail
cd "$(dirname "$0")/.."
CPMTOOL=${CPMTOOL:-.venv/bin/cpmtool}
SHARED=${SHARED:-../shared/data}
OUT=${OUT:-out/demo}
mkdir -p "$OUT"
step() { printf '\n== %s\n$ %s\n' "$1" "$2"; }
t() { local t0=$SECONDS; "$@"; echo "[${1##*/} ${2:-}: $((SECONDS - t0)) s]" >&2; }

step "the registry" "cpmtool models list; cpmtool models info cpm-tiny"
$CPMTOOL models list
$CPMTOOL models info cpm-tiny | grep -E "^(name|params|architecture|card\.)" || true

step "cpm-tiny answers arithmetic test prompts (greedy, graded)" \
  "cpmtool models tasks --task arithmetic --split test --n 12 | cpmtool rollout --model cpm-tiny --temperature 0 --reward math"
$CPMTOOL models tasks --task arithmetic --split test --n 12 --seed 0 > "$OUT/tasks.jsonl"
t $CPMTOOL rollout --model cpm-tiny --temperature 0 --max-tokens 160 --reward math "$OUT/tasks.jsonl" \
  > "$OUT/greedy.jsonl"
.venv/bin/python - "$OUT/greedy.jsonl" <<'PY'
import json, sys
rows = [json.loads(l) for l in open(sys.argv[1])]
for r in rows[:4]:
    print(f"> {r['prompt']}\n{r['completion']}\n[{'correct' if r['correct'] else 'wrong'}; gold {r['answer']}; {r['n_tokens']} tokens]")
print(f"cpm-tiny greedy: {sum(r['correct'] for r in rows)}/{len(rows)} correct")
PY

step "8 samples per prompt with a TTRL majority vote" \
  "cpmtool rollout --model cpm-tiny --n 8 --seed 0 --vote tasks.jsonl"
t $CPMTOOL rollout --model cpm-tiny --n 8 --seed 0 --max-tokens 160 --reward math --vote "$OUT/tasks.jsonl" \
  > "$OUT/vote.jsonl"
.venv/bin/python - "$OUT/vote.jsonl" <<'PY'
import json, sys
rows = [json.loads(l) for l in open(sys.argv[1])]
groups = {}
for r in rows:
    groups.setdefault(r["group"], []).append(r)
acc = sum(r["correct"] for r in rows) / len(rows)
passk = sum(any(r["correct"] for r in g) for g in groups.values()) / len(groups)
maj = sum(g[0].get("maj_correct", False) for g in groups.values()) / len(groups)
print(f"{len(rows)} samples: mean accuracy {acc:.0%}, pass@8 {passk:.0%}, majority-vote accuracy {maj:.0%}")
PY

step "smollm2-135m answers chat prompts (greedy)" \
  "printf '{\"prompt\": ...}' | cpmtool rollout --model smollm2-135m --chat --temperature 0"
printf '%s\n' '{"id":"q1","prompt":"What is the capital of France?"}' \
  '{"id":"q2","prompt":"Give me three tips for staying healthy."}' > "$OUT/chat.jsonl"
t $CPMTOOL rollout --model smollm2-135m --chat --temperature 0 --max-tokens 48 "$OUT/chat.jsonl" \
  > "$OUT/chat_out.jsonl"
.venv/bin/python - "$OUT/chat_out.jsonl" <<'PY'
import json, sys
for r in map(json.loads, open(sys.argv[1])):
    print(f"> {r['prompt']}\n{r['completion']}\n")
PY

step "UltraClean rules on real web documents" \
  "cpmtool clean $SHARED/web_docs_sample.jsonl --rejects rejects.jsonl --stats stats.json"
if [ -f "$SHARED/web_docs_sample.jsonl" ]; then
  t $CPMTOOL clean "$SHARED/web_docs_sample.jsonl" --rejects "$OUT/rejects.jsonl" --stats "$OUT/clean_stats.json" \
    > "$OUT/clean.jsonl"
  echo "kept $(wc -l < "$OUT/clean.jsonl") documents, rejected $(wc -l < "$OUT/rejects.jsonl"); top reasons:"
  .venv/bin/python -c 'import json,sys,collections; c=collections.Counter(json.loads(l)["reject_reason"] for l in open(sys.argv[1])); [print(f"  {n:4d}  {k}") for k,n in c.most_common(6)]' "$OUT/rejects.jsonl"
else
  echo "(skipped: $SHARED/web_docs_sample.jsonl not found)"
fi
step "synth-if (UltraIF): IFEval constraints on Alpaca prompts, smollm2 answers, the checkers filter them" \
  "cpmtool synth-if compose seeds.jsonl | cpmtool synth-if generate --k 2 | cpmtool synth-if filter --pairs pairs.jsonl"
if [ -f "$SHARED/alpaca_seed.jsonl" ]; then
  head -n 3 "$SHARED/alpaca_seed.jsonl" > "$OUT/seeds.jsonl"
  $CPMTOOL synth-if compose --rounds 1 --seed 0 \
    --ifeval-ids punctuation:no_comma,change_case:english_lowercase,length_constraints:number_words \
    "$OUT/seeds.jsonl" > "$OUT/if_comp.jsonl"
  t $CPMTOOL synth-if generate --model smollm2-135m --k 2 --max-tokens 48 --cache "$OUT/cache" "$OUT/if_comp.jsonl" \
    > "$OUT/if_gen.jsonl"
  # only verifiable constraints: no judge to ask, so the model is not even loaded
  t $CPMTOOL synth-if filter --keep-unsatisfied --cache "$OUT/cache" --pairs "$OUT/if_pairs.jsonl" "$OUT/if_gen.jsonl" \
    > "$OUT/if_sft.jsonl"
  .venv/bin/python - "$OUT/if_sft.jsonl" "$OUT/if_pairs.jsonl" <<'PY'
import json, sys
for r in map(json.loads, open(sys.argv[1])):
    print(f"> {r['prompt']}")
    print("  " + ", ".join(f"{'PASS' if v['pass'] else 'fail'} {v['score']:.2f}" for v in r["verdicts"]))
    print(f"  sft completion: {r['completion'][:100]!r}")
print(f"{sum(1 for _ in open(sys.argv[2]))} preference pairs (pass vs fail)")
PY

  step "annotate-pref (AIR): smollm2 judges those responses point-wise, pairs by score; train-dpo on every pair" \
    "cpmtool annotate-pref if_gen.jsonl --prefill Score: > air_pairs.jsonl; cpmtool train-dpo --data pairs.jsonl"
  t $CPMTOOL annotate-pref --model smollm2-135m --cache "$OUT/cache" --prefill Score: --max-tokens 6 \
    --judge-samples 2 --min-chosen 5 --margin 1,9 --rejects "$OUT/air_rejects.jsonl" "$OUT/if_gen.jsonl" \
    > "$OUT/air_pairs.jsonl"
  .venv/bin/python - "$OUT/air_pairs.jsonl" <<'PY'
import json, sys
for r in map(json.loads, open(sys.argv[1])):
    print(f"> {r['prompt'][:70]!r}: chosen {r['score_chosen']} vs rejected {r['score_rejected']}")
PY
  cat "$OUT/if_pairs.jsonl" "$OUT/air_pairs.jsonl" > "$OUT/dpo_pairs.jsonl"
  if [ -s "$OUT/dpo_pairs.jsonl" ]; then
    rm -rf "$OUT/dpo"
    t $CPMTOOL train-dpo --model smollm2-135m --data "$OUT/dpo_pairs.jsonl" --out "$OUT/dpo" --steps 2 \
      --batch-size 2 --max-len 256 --lr 1e-5 --threads 2 > /dev/null
    .venv/bin/python - "$OUT/dpo/metrics.jsonl" <<'PY'
import json, sys
for m in map(json.loads, open(sys.argv[1])):
    print(f"dpo step {m['step']}: loss {m['loss']:.4f}, reward margin {m['reward_margin']:+.4f}, "
          f"pair accuracy {m['pair_accuracy']:.2f}")
PY
  else
    echo "(no preference pairs from these seeds: DPO skipped)"
  fi
else
  echo "(skipped: $SHARED/alpaca_seed.jsonl not found)"
fi

echo
echo "demo outputs are in $OUT/"
