#!/usr/bin/env bash
# The trainers on CUDA, a few steps each on cpm-tiny: train-rl with GRPO and PRIME (rollouts by the
# native engine in-process on the GPU, its decode steps as CUDA graphs; PRIME's implicit PRM beside the
# policy) and train-sft; then `bench train-rl --device cuda`, against TRL's GRPOTrainer when trl is
# importable, and ours with the graphs off (CPMTOOL_CUDA_GRAPHS=0); `bench engine --device cuda`.
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
echo "== bench train-rl --device cuda"
compare=trl
$py -c "import trl, datasets" 2>/dev/null || compare=""
$py -m cpmtool bench train-rl --compare "$compare" --device cuda --model cpm-tiny --batch-size 8 --n 8 --max-tokens 64 \
  --repeat 5 >"$out/bench_rl.jsonl" || status=1
echo "== the same, ours with eager decode steps"
CPMTOOL_CUDA_GRAPHS=0 $py -m cpmtool bench train-rl --compare "" --device cuda --model cpm-tiny --batch-size 8 --n 8 \
  --max-tokens 64 --repeat 2 >"$out/bench_rl_eager.jsonl" || status=1
echo "== bench engine --device cuda: the engine with CUDA graphs and eager vs transformers generate"
$py -m cpmtool models tasks --task arithmetic --split test --n 64 --seed 5 >"$out/arith64.jsonl" || status=1
$py -m cpmtool bench engine --model cpm-tiny --device cuda --batch 64 --max-tokens 64 --repeats 3 \
  --prompts "$out/arith64.jsonl" >"$out/bench_engine.jsonl" || status=1
exit $status
