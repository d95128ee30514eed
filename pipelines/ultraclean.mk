# UltraClean (MiniCPM4 / Ultra-FineWeb) on the shared web sample: clean, dedup across shards,
# train the quality classifier, verify the cleaned data by short annealing, compare with datatrove.
#
#   make -f pipelines/ultraclean.mk all        # clean + sharded dedup + classifier + verify
#   make -f pipelines/ultraclean.mk verify     # efficient verification only (~15 min on a busy 2-core box)
#   make -f pipelines/ultraclean.mk bench      # cpmtool vs datatrove, same rules, same documents
#   make -f pipelines/ultraclean.mk FAST=1 all # smoke run (tests/pipelines): a few training steps, out/ultraclean-fast
#
# Efficient verification (cpmtool clean verify; method in cpmtool/data/clean/verify.py): a
# byte-level model of the cpm-tiny family is trained on the baseline mix (the raw documents)
# through warmup and the stable phase, then annealed from that state on the baseline mix alone
# and once per candidate with SHARE of each batch from it. The report gives held-out bits per
# byte on a reference set of good text (Alpaca-GPT4 answers here) for each; delta_bpb > 0 means
# the candidate helps. The candidates are the cleaned documents and, as a negative control, the
# rejected ones, which should help less (smaller or negative delta). One reference model serves
# both. SEEDS=3 repeats everything with other seeds, so the deltas can be read against the noise.

# FAST=1: every stage, with a few verification steps; set before the defaults, which `?=` leaves alone
ifeq ($(FAST),1)
OUT      ?= out/ultraclean-fast
PRETRAIN ?= 4
ANNEAL   ?= 2
# the held-out reference set: 50 answers instead of 1000 (it is scored after every anneal)
REFSET_N ?= 50
endif

PYTHON   ?= .venv/bin/python
CPMTOOL  ?= $(PYTHON) -m cpmtool
RAW      ?= ../shared/data/web_docs_sample.jsonl
REFSET   ?= ../shared/data/alpaca_seed.jsonl
OUT      ?= out/ultraclean
SHARE    ?= 0.3
PRETRAIN ?= 300
ANNEAL   ?= 100
SEEDS    ?= 1
THREADS  ?= 1
SHARDS   ?= 2

.PHONY: all clean-data sharded classifier scored verify bench

all: clean-data sharded classifier scored verify

# 1. the rule pipeline: kept documents, rejects with <stage>:<rule>, stats per stage and rule
$(OUT)/clean.jsonl: $(RAW)
	@mkdir -p $(OUT)
	$(CPMTOOL) clean $(RAW) -o $@ --rejects $(OUT)/rejects.jsonl --stats $(OUT)/stats.json
clean-data: $(OUT)/clean.jsonl

# 2. the same run as shards: the input cut into 4 files (sharding is by file), pass 1 per shard,
#    pass 2 once, pass 3 per shard; the final shards hold exactly the documents of clean.jsonl
sharded: $(RAW)
	@mkdir -p $(OUT)/shards/in
	split -n l/4 -d --additional-suffix=.jsonl $(RAW) $(OUT)/shards/in/part-
	for i in $$(seq 0 $$(($(SHARDS) - 1))); do \
	  $(CPMTOOL) clean $(OUT)/shards/in/part-*.jsonl --shard $$i/$(SHARDS) --signatures $(OUT)/shards/sigs \
	    -o $(OUT)/shards/kept-$$i.jsonl --rejects $(OUT)/shards/rejects-$$i.jsonl || exit 1; done
	$(CPMTOOL) clean dedup-merge $(OUT)/shards/sigs -o $(OUT)/shards/drops.jsonl --stats $(OUT)/shards/dedup.json
	for i in $$(seq 0 $$(($(SHARDS) - 1))); do \
	  $(CPMTOOL) clean dedup-apply $(OUT)/shards/kept-$$i.jsonl --drops $(OUT)/shards/drops.jsonl --shard $$i/$(SHARDS) \
	    -o $(OUT)/shards/final-$$i.jsonl --rejects $(OUT)/shards/dedup-rejects-$$i.jsonl || exit 1; done

# 3. the quality classifier: kept documents as positives, rule rejects as negatives (a toy seed
#    pool; UltraClean picks seeds with the verification below), then score and filter with it
$(OUT)/clf/classifier.json: $(OUT)/clean.jsonl
	$(CPMTOOL) clean train-classifier --pos $(OUT)/clean.jsonl --neg $(OUT)/rejects.jsonl --out $(OUT)/clf
classifier: $(OUT)/clf/classifier.json
scored: $(OUT)/clf/classifier.json
	$(CPMTOOL) clean $(RAW) --stages normalise --classifier $(OUT)/clf --threshold 0.5 -o $(OUT)/scored.jsonl \
	  --rejects $(OUT)/scored-rejects.jsonl

# 4. efficient verification
$(OUT)/refset.jsonl: $(REFSET)
	@mkdir -p $(OUT)
	$(if $(REFSET_N),head -n $(REFSET_N),cat) $(REFSET) \
	  | $(PYTHON) -c "import json,sys; [print(json.dumps({'text': json.loads(l)['output']})) for l in sys.stdin]" > $@
verify: $(OUT)/clean.jsonl $(OUT)/refset.jsonl
	$(CPMTOOL) clean verify --candidate $(OUT)/clean.jsonl --candidate $(OUT)/rejects.jsonl --baseline $(RAW) \
	  --eval $(OUT)/refset.jsonl --share $(SHARE) --pretrain-steps $(PRETRAIN) --anneal-steps $(ANNEAL) \
	  --seeds $(SEEDS) --threads $(THREADS) | tee $(OUT)/verify.json

# 5. the rule set in datatrove and in cpmtool (needs: pip install 'cpmtool[datatrove]')
bench:
	$(CPMTOOL) bench clean --compare datatrove $(RAW)
