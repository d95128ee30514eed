# AIR on a few Alpaca seeds: responses from two models (cpm-tiny and smollm2-135m, `cpmtool rollout`),
# point-wise judging by smollm2-135m, variance filter and pair selection (`cpmtool annotate-pref`),
# then DPO on the pairs, all on a CPU.
#
#   make -f pipelines/air.mk all            # SEEDS seeds, N responses per model; runs/air
#   make -f pipelines/air.mk pairwise       # the UltraFeedback-style comparison baseline on the same responses
#   make -f pipelines/air.mk report         # counts of each stage (from the --stats files)
#   make -f pipelines/air.mk FAST=1 all     # smoke run (tests/pipelines): 3 seeds, short answers, 2 steps
#
# Judge answers are cached in $(OUT)/cache: rerunning annotate-pref with other selection settings
# (KEEP, MIN_CHOSEN, MARGIN) makes no model call. A 135M judge is a poor one: many of its answers
# carry no score in range (the rejects keep them), and the thresholds below are set for its scores.

ifeq ($(FAST),1)
OUT       ?= out/air-fast
SEEDS     ?= 3
N         ?= 1
GEN_TOK   ?= 16
JUDGE_TOK ?= 6
SAMPLES   ?= 2
KEEP      ?= 1
STEPS     ?= 2
THREADS   ?= 1
endif

PYTHON     ?= .venv/bin/python
CPMTOOL    ?= $(PYTHON) -m cpmtool
JUDGE      ?= smollm2-135m
POLICY     ?= smollm2-135m
SHARED     ?= $(firstword $(wildcard ../shared/data /work/shared/data))
OUT        ?= runs/air
SEEDS      ?= 16
N          ?= 2
GEN_TOK    ?= 96
JUDGE_TOK  ?= 16
SAMPLES    ?= 3
KEEP       ?= 0.5
MIN_CHOSEN ?= 5
MARGIN     ?= 1,9
STEPS      ?= 20
THREADS    ?= 2
SEED       ?= 0
JUDGING    ?= --model $(JUDGE) --cache $(OUT)/cache --seed $(SEED) --prompt-field instruction --prefill Score: \
              --max-tokens $(JUDGE_TOK)

.PHONY: all responses pairwise report clean

all: $(OUT)/dpo.done report

responses: $(OUT)/cpm-tiny.jsonl $(OUT)/smollm2.jsonl

# Alpaca seeds without an `input` field, so the instruction alone is the prompt
$(OUT)/seeds.jsonl:
	mkdir -p $(OUT)
	grep '"input": ""' $(SHARED)/alpaca_seed.jsonl | head -n $(SEEDS) > $@

$(OUT)/cpm-tiny.jsonl: $(OUT)/seeds.jsonl
	$(CPMTOOL) rollout -m cpm-tiny --prompt-field instruction --n $(N) --max-tokens $(GEN_TOK) --temperature 1.0 \
	  --seed $(SEED) $< -o $@

$(OUT)/smollm2.jsonl: $(OUT)/seeds.jsonl
	$(CPMTOOL) rollout -m smollm2-135m --chat --prompt-field instruction --n $(N) --max-tokens $(GEN_TOK) \
	  --temperature 1.0 --seed $(SEED) $< -o $@

$(OUT)/pairs.jsonl: $(OUT)/cpm-tiny.jsonl $(OUT)/smollm2.jsonl
	$(CPMTOOL) annotate-pref $(JUDGING) --judge-samples $(SAMPLES) --keep-top-variance $(KEEP) \
	  --min-chosen $(MIN_CHOSEN) --margin $(MARGIN) $^ -o $@ --rejects $(OUT)/pairs.rejects.jsonl \
	  --stats $(OUT)/pairs.stats.json

$(OUT)/pairs-pairwise.jsonl: $(OUT)/cpm-tiny.jsonl $(OUT)/smollm2.jsonl
	$(CPMTOOL) annotate-pref $(filter-out --prefill Score:,$(JUDGING)) --prefill Better: --mode pairwise $^ -o $@ \
	  --rejects $(OUT)/pairwise.rejects.jsonl --stats $(OUT)/pairwise.stats.json

pairwise: $(OUT)/pairs-pairwise.jsonl

# DPO needs at least one pair; a small judge may give none on a few seeds: say so
$(OUT)/dpo.done: $(OUT)/pairs.jsonl
	if [ -s $< ]; then \
	  $(CPMTOOL) train-dpo --model $(POLICY) --data $< --out $(OUT)/dpo --steps $(STEPS) --batch-size 2 \
	    --max-len 512 --threads $(THREADS); \
	else echo "air: no preference pairs (see $(OUT)/pairs.rejects.jsonl); DPO skipped"; fi
	touch $@

report:
	@for s in pairs pairwise; do [ -f $(OUT)/$$s.stats.json ] || continue; printf '%-9s ' $$s; \
	  $(PYTHON) -c 'import json,sys; d=json.load(open(sys.argv[1])); print({k: d[k] for k in ("in", "out", "rejected_by_reason", "judge", "cache")})' $(OUT)/$$s.stats.json; done

clean:
	rm -rf $(OUT)
