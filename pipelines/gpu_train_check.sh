#!/usr/bin/env bash
# The trainers on CUDA, a few steps each on cpm-tiny: train-rl with GRPO and PRIME (rollouts by the
# native engine in-process on the GPU, PRIME's implicit PRM beside the policy) and train-sft.
# Called by gpu_check.sh; alone: bash pipelines/gpu_train_check.sh [OUTDIR]
set -uo pipefail
out=${1:-gpu-check}/train
py=${PYTHON:-python3}
mkdir -p "$out"
status=0
$py -m cpmtool models tasks --task arithmetic --split train --n 64 --seed 1 --level 1 --solution >"$out/tasks.jsonl" || exit 1
$py -c "import json, sys; [print(json.dumps({'prompt': r['prompt'], 'completion': r['solution']})) for r in map(json.loads, open(sys.argv[1]))]" \
  "$out/tasks.jsonl" >"$out/sft.jsonl"
for algo in grpo prime; do
  echo "== train-rl --algo $algo on cuda"
  $py -m cpmtool train-rl --model cpm-tiny --prompts "$out/tasks.jsonl" --algo $algo --steps 3 --batch-size 4 --n 4 \
    --max-tokens 48 --device cuda --out "$out/$algo" 2>&1 | tail -4 || status=1
done
echo "== train-sft on cuda"
$py -m cpmtool train-sft --model cpm-tiny --data "$out/sft.jsonl" --steps 5 --batch-size 8 --device cuda --out "$out/sft" \
  2>&1 | tail -3 || status=1
exit $status
