# Two commands on a fresh clone: `make demo` and `make test`.
# Both create .venv on first use: the demo installs the project and what the demo uses (grad-cam for
# its heatmaps); the tests add the test extras (pytest, submitit, TensorBoard, MLflow, pydicom, ONNX).

PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed
TEST_STAMP := $(VENV)/.installed-test
PIP    := -m pip install --quiet --disable-pip-version-check
# The torch build the project is tested with; override for another platform or CUDA version,
# e.g. make test TORCH="torch==2.9.1 torchvision==0.24.1"; on a machine without a GPU PyTorch's CPU
# build is a tenth of the size: make demo TORCH="torch==2.14.1 torchvision==0.29.1 --index-url https://download.pytorch.org/whl/cpu"
TORCH  ?= torch==2.14.1 torchvision==0.29.1

.PHONY: demo test test-fast ablations bench clean

$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python $(PIP) $(TORCH)
	$(BIN)/python $(PIP) -e '.[explain]'
	touch $(STAMP)

$(TEST_STAMP): $(STAMP)
	$(BIN)/python $(PIP) -e '.[test]'
	touch $(TEST_STAMP)

# The demo: trains; after an interruption (Ctrl-C, a kill) continues where it stopped; once finished
# prints its report (make clean, then make demo, trains it again).
DEMO_CONFIG := configs/experiments/demo_synthetic.yaml
DEMO_RUN    := runs/demo_synthetic
demo: $(STAMP)
	@if [ -f $(DEMO_RUN)/models/demo_synthetic_resume.pth ]; then \
	  echo "continuing the interrupted demo in $(DEMO_RUN)"; \
	  $(BIN)/python train.py --config $(DEMO_CONFIG) --output_dir $(DEMO_RUN) --resume; \
	elif [ -f $(DEMO_RUN)/metrics.json ]; then \
	  echo "$(DEMO_RUN) holds the finished demo (make clean, then make demo, trains it again); its report:"; \
	  cat $(DEMO_RUN)/report.md; \
	else \
	  $(BIN)/python train.py --config $(DEMO_CONFIG) --output_dir $(DEMO_RUN); \
	fi

# One pytest worker per core (pytest-xdist), each test file on one worker so that its module
# fixtures are built once; conftest gives each worker one thread (docs/architecture.md: the figures).
PYTEST := $(BIN)/python -m pytest -q -n auto --dist loadfile

test: $(TEST_STAMP)
	$(BIN)/lint-imports --no-cache
	$(PYTEST)

test-fast: $(TEST_STAMP)
	$(PYTEST) -m "not slow"

bench: $(TEST_STAMP)
	$(BIN)/python bench/memory_bench.py
	$(BIN)/python bench/data_bench.py

# The demo's baseline and memory variants on the synthetic set (CPU), three seeds each, then their
# summary (runs/demo_ablation/summary.md): configs/sweeps/demo_ablation.yaml, one run after another.
# Finished runs are skipped and interrupted ones resumed, so running it again after a stop finishes it.
ablations: $(STAMP)
	$(BIN)/python -m cxrmem.sweep configs/sweeps/demo_ablation.yaml

clean:
	rm -rf runs data/synthetic_demo
