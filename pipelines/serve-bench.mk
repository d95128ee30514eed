# Serving benchmark: `cpmtool serve` (continuous batching) under load at several concurrencies,
# measured as vLLM's benchmark_serving measures a server (TTFT, TPOT, ITL, E2EL percentiles,
# request and token throughput), one JSON record per concurrency, then a summary table.
#
#   make -f pipelines/serve-bench.mk all                       # launch, load, stop, for each CONCURRENCY
#   make -f pipelines/serve-bench.mk all URL=http://host:8000  # any running OpenAI-compatible server (vllm serve, ...)
#   make -f pipelines/serve-bench.mk FAST=1 all                # smoke run (tests/pipelines): cpm-tiny, tiny loads
#
# With --launch each concurrency gets a fresh server, so one level's queue never spills into the next.

ifeq ($(FAST),1)
OUT         ?= out/serve-bench-fast
MODEL       ?= cpm-tiny
CONCURRENCY ?= 1 4
NUM_PROMPTS ?= 4
INPUT_LEN   ?= 16
OUTPUT_LEN  ?= 8
SERVE_ARGS  ?= --threads 1 --max-batch 4
endif

PYTHON      ?= .venv/bin/python
CPMTOOL     ?= $(PYTHON) -m cpmtool
OUT         ?= out/serve-bench
MODEL       ?= smollm2-135m
CONCURRENCY ?= 1 4 16
NUM_PROMPTS ?= 32
INPUT_LEN   ?= 128
OUTPUT_LEN  ?= 64
RANGE_RATIO ?= 0.25
SERVE_ARGS  ?= --max-batch 16
URL         ?=

TARGET = $(if $(URL),--url $(URL),--launch --model $(MODEL) --serve-args '$(SERVE_ARGS)')

.PHONY: all speed report clean

all: speed report

speed:
	@mkdir -p $(OUT)
	for c in $(CONCURRENCY); do \
	  $(CPMTOOL) bench speed $(TARGET) --concurrency $$c --num-prompts $(NUM_PROMPTS) --input-len $(INPUT_LEN) \
	    --output-len $(OUTPUT_LEN) --range-ratio $(RANGE_RATIO) -o $(OUT)/speed-c$$c.json > /dev/null || exit 1; done

# one line per concurrency: throughput and latency percentiles
report:
	@$(PYTHON) -c "import json,sys; \
	rows=[json.load(open(p)) for p in sys.argv[1:]]; \
	print(f'{\"conc\":>5} {\"req/s\":>7} {\"out tok/s\":>9} {\"TTFT p50\":>9} {\"TTFT p99\":>9} {\"TPOT p50\":>9} {\"ITL p99\":>8}'); \
	[print(f'{r[\"max_concurrency\"]:>5} {r[\"request_throughput\"]:>7.2f} {r[\"output_throughput\"]:>9.1f} ' \
	       f'{r[\"median_ttft_ms\"] or 0:>9.1f} {r[\"p99_ttft_ms\"] or 0:>9.1f} {r[\"median_tpot_ms\"] or 0:>9.1f} ' \
	       f'{r[\"p99_itl_ms\"] or 0:>8.1f}') for r in sorted(rows, key=lambda r: r['max_concurrency'])]" \
	  $(wildcard $(OUT)/speed-c*.json) | tee $(OUT)/report.txt

clean:
	rm -rf $(OUT)
