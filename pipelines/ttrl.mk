# TTRL on cpm-tiny: label-free test-time RL. The policy trains on the test prompts themselves with
# rewards from the majority vote of VOTE_N samples (the first N are trained on); the gold answers
# stay in the records only to log label accuracy and to measure greedy accuracy before/after.
#
#   make -f pipelines/ttrl.mk ttrl      # <= MINUTES of TTRL, eval_accuracy at step 0 and the end
#   make -f pipelines/ttrl.mk report
#
# THREADS=2 is the 2-core budget; on a machine shared with other jobs THREADS=1 is faster.

PYTHON  ?= .venv/bin/python
CPMTOOL ?= $(PYTHON) -m cpmtool
MODEL   ?= cpm-tiny
OUT     ?= runs/ttrl
THREADS ?= 2
MINUTES ?= 10
LR      ?= 5e-5
SEED    ?= 0
STEPS   ?= 400
TEST_N  ?= 200
VOTE_N  ?= 16
LEVELS  ?= --level 1 --level 2 --level 3
N       ?= 8

.PHONY: data ttrl report clean

data: $(OUT)/test.jsonl

$(OUT)/test.jsonl:
	mkdir -p $(OUT)
	$(CPMTOOL) models tasks --task arithmetic --split test --n $(TEST_N) --seed 0 $(LEVELS) > $@

ttrl: data
	$(CPMTOOL) --progress train-rl --algo ttrl --model $(MODEL) --prompts $(OUT)/test.jsonl \
	  --eval-prompts $(OUT)/test.jsonl --vote-n $(VOTE_N) --group-size $(N) --steps $(STEPS) --batch-size 8 \
	  --max-tokens 96 --temperature 1.0 --lr $(LR) --weight-decay 0.0 --max-minutes $(MINUTES) \
	  --threads $(THREADS) --seed $(SEED) --save-every 20 --out $(OUT)/ttrl

report:
	$(CPMTOOL) train-rl report $(patsubst %/run.json,%,$(wildcard $(OUT)/*/run.json))

clean:
	rm -rf $(OUT)
