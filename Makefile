# Two commands on a fresh clone: `make demo` and `make test`.
# Both create .venv on first use and install the project with its test extras.

PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed
# The torch build the project is tested with; override for another platform or CUDA version,
# e.g. make test TORCH="torch==2.9.1 torchvision==0.24.1"
TORCH  ?= torch==2.14.1 torchvision==0.29.1

.PHONY: demo test test-fast ablations bench clean

$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --disable-pip-version-check $(TORCH)
	$(BIN)/python -m pip install --quiet --disable-pip-version-check -e '.[test]'
	touch $(STAMP)

demo: $(STAMP)
	$(BIN)/python train.py --config configs/experiments/demo_synthetic.yaml

test: $(STAMP)
	$(BIN)/python -m pytest -q

test-fast: $(STAMP)
	$(BIN)/python -m pytest -q -m "not slow"

bench: $(STAMP)
	$(BIN)/python bench/memory_bench.py
	$(BIN)/python bench/data_bench.py

# The demo's baseline and memory variants on the synthetic set (CPU), then their comparison.
# Each entry is name:override[,override...]; every run uses the demo config otherwise, with a
# fixed phase-1 learning rate instead of the LR finder (all variants share one schedule) and
# five phase-2 epochs, so that the six runs fit in about 15 minutes on 2 CPU cores.
ABLATION_COMMON := --set phase1.use_lr_finder=false --set phase1.base_lr=0.001 --set phase2.epochs=5
ABLATIONS := baseline:memory.use_memory=false \
             rarity:memory.update_strategy=rarity \
             diversity:memory.update_strategy=diversity,memory.rarity_threshold=0.25 \
             fifo:memory.update_strategy=fifo \
             bank32:memory.bank_size=32 \
             topk1:memory.top_k=1
ABLATION_RUNS := runs/ablations

ablations: $(STAMP)
	@mkdir -p $(ABLATION_RUNS); set -e; for entry in $(ABLATIONS); do \
	  name=$${entry%%:*}; sets=$$(echo "$${entry#*:}" | tr ',' ' '); \
	  args=""; for s in $$sets; do args="$$args --set $$s"; done; \
	  echo "== ablation $$name:$$args"; \
	  $(BIN)/python train.py --config configs/experiments/demo_synthetic.yaml --output_dir $(ABLATION_RUNS)/$$name \
	    --set experiment_name=demo_$$name $(ABLATION_COMMON) $$args --overwrite > $(ABLATION_RUNS)/$$name.log 2>&1 \
	    || { tail -5 $(ABLATION_RUNS)/$$name.log; exit 1; }; \
	  grep "Mean AUC Score" $(ABLATION_RUNS)/$$name.log; \
	done
	$(BIN)/python -m cxrmem.compare $(addprefix $(ABLATION_RUNS)/,$(foreach e,$(ABLATIONS),$(firstword $(subst :, ,$(e))))) \
	  --split test --out $(ABLATION_RUNS)/comparison.md

clean:
	rm -rf runs data/synthetic_demo
