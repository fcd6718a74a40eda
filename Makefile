# The two commands of the README: `make demo` (main job end to end) and `make test`.
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
RUN_DIR ?= runs/demo

.PHONY: venv demo test lint clean-runs

venv: $(VENV)/.installed

# torchrec is installed with --no-deps: its metadata requires the CUDA `fbgemm-gpu`, which cannot be
# imported without an NVIDIA driver and would overwrite `fbgemm-gpu-cpu` (see pyproject.toml).
$(VENV)/.installed: pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	$(BIN)/python -m pip install -q -e '.[cpu,dev]'
	$(BIN)/python -m pip install -q --no-deps torchrec==1.9.2
	$(BIN)/python -c "import fbgemm_gpu, torchrec, faiss"  # fail here, not in the first test
	touch $@

demo: venv
	WANDB_MODE=$${WANDB_MODE:-offline} $(BIN)/funnel demo --run-dir $(RUN_DIR)

test: venv
	WANDB_MODE=offline $(BIN)/python -m pytest -q -p no:cacheprovider

lint: venv
	$(BIN)/ruff check .
