# UltraIF on a few Alpaca seeds: synth-if decompose -> compose -> generate -> filter, then SFT on the
# passing responses and DPO on the pass/fail pairs, all with one small model on a CPU.
#
#   make -f pipelines/ultraif.mk all            # SEEDS seeds, K responses each; runs/ultraif
#   make -f pipelines/ultraif.mk report         # counts of every stage (from the --stats files)
#   make -f pipelines/ultraif.mk FAST=1 all     # smoke run (tests/pipelines): 3 seeds, short answers, 2 steps
#
# Model answers are cached in $(OUT)/cache: rerunning a stage with the same settings makes no
# model call. A small model writes poor decompositions and judgments; the rejects files keep them.
# DEC_PREFILL starts each decomposition answer with the JSON object's first keys (smollm2-135m
# answers 0 of 8 Alpaca seeds in JSON without it, 6 of 8 parseable with it); DEC_PREFILL= turns it off.

ifeq ($(FAST),1)
OUT       ?= out/ultraif-fast
SEEDS     ?= 3
K         ?= 2
DEC_TOK   ?= 64
GEN_TOK   ?= 24
JUDGE_TOK ?= 24
ROUNDS    ?= 1
STEPS     ?= 2
THREADS   ?= 1
endif

PYTHON    ?= .venv/bin/python
CPMTOOL   ?= $(PYTHON) -m cpmtool
MODEL     ?= smollm2-135m
SHARED    ?= $(firstword $(wildcard ../shared/data /work/shared/data))
OUT       ?= runs/ultraif
SEEDS     ?= 16
K         ?= 4
DEC_TOK   ?= 384
GEN_TOK   ?= 192
JUDGE_TOK ?= 192
ROUNDS    ?= 2
STEPS     ?= 20
THREADS   ?= 2
SEED      ?= 0
DEC_PREFILL ?= {"Complex": true, "Basic Query": "
ENGINE    ?= --model $(MODEL) --cache $(OUT)/cache --seed $(SEED)

.PHONY: all data report clean

all: $(OUT)/sft/model/config.json $(OUT)/dpo.done

data: $(OUT)/sft.jsonl

$(OUT)/seeds.jsonl:
	mkdir -p $(OUT)
	head -n $(SEEDS) $(SHARED)/alpaca_seed.jsonl > $@

$(OUT)/dec.jsonl: $(OUT)/seeds.jsonl
	$(CPMTOOL) synth-if decompose $(ENGINE) --max-tokens $(DEC_TOK) $(if $(DEC_PREFILL),--prefill '$(DEC_PREFILL)') $< -o $@ \
	  --rejects $(OUT)/dec.rejects.jsonl --stats $(OUT)/dec.stats.json

# compose every seed (not only those the model decomposed), drawing from the decomposed pool and IFEval
$(OUT)/comp.jsonl: $(OUT)/seeds.jsonl $(OUT)/dec.jsonl
	$(CPMTOOL) synth-if compose --pool $(OUT)/dec.jsonl --rounds $(ROUNDS) --seed $(SEED) $< -o $@ \
	  --rejects $(OUT)/comp.rejects.jsonl --stats $(OUT)/comp.stats.json

$(OUT)/gen.jsonl: $(OUT)/comp.jsonl
	$(CPMTOOL) synth-if generate $(ENGINE) --k $(K) --max-tokens $(GEN_TOK) $< -o $@ \
	  --rejects $(OUT)/gen.rejects.jsonl --stats $(OUT)/gen.stats.json

# --keep-unsatisfied: a small model rarely satisfies everything; its records say `satisfied: false`
$(OUT)/sft.jsonl: $(OUT)/gen.jsonl
	$(CPMTOOL) synth-if filter $(ENGINE) --max-tokens $(JUDGE_TOK) --keep-unsatisfied $< -o $@ \
	  --pairs $(OUT)/pairs.jsonl --rejects $(OUT)/filter.rejects.jsonl --stats $(OUT)/filter.stats.json

$(OUT)/sft/model/config.json: $(OUT)/sft.jsonl
	$(CPMTOOL) train-sft --model $(MODEL) --data $< --out $(OUT)/sft --steps $(STEPS) --batch-size 2 \
	  --max-len 512 --threads $(THREADS)

# DPO needs at least one pair (a prompt with a passing and a failing response); say so when there is none
$(OUT)/dpo.done: $(OUT)/sft.jsonl
	if [ -s $(OUT)/pairs.jsonl ]; then \
	  $(CPMTOOL) train-dpo --model $(MODEL) --data $(OUT)/pairs.jsonl --out $(OUT)/dpo --steps $(STEPS) \
	    --batch-size 2 --max-len 512 --threads $(THREADS); \
	else echo "ultraif: no preference pairs (every prompt's responses all passed or all failed); DPO skipped"; fi
	touch $@

report:
	@for s in dec comp gen filter; do printf '%-7s ' $$s; $(PYTHON) -c 'import json,sys; d=json.load(open(sys.argv[1])); print({k: d[k] for k in d if k not in ("inputs", "seconds", "complete", "empty_lines")})' $(OUT)/$$s.stats.json; done
	@echo "pairs: $$(cat $(OUT)/pairs.jsonl 2>/dev/null | wc -l)"

clean:
	rm -rf $(OUT)
