# starcoder2-train: `make quickstart` trains the tiny recipe on the CPU; `make test` runs the tests.
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
# The tested torch release; on a CUDA cluster pip takes its CUDA build from PyPI.
TORCH ?= torch==2.13.0
QUICKSTART ?= outputs/quickstart
EXTRAS ?= dev

.PHONY: install quickstart test test-fast style quality benchmark clean

$(VENV)/.installed: setup.cfg pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet "$(TORCH)"
	$(BIN)/python -m pip install --quiet -e ".[$(EXTRAS)]"
	touch $@

install: $(VENV)/.installed

# The embedded default run: no download, no GPU. Ingests the standard library of this Python, trains a
# tokenizer on it, trains recipes/tiny/pretrain.yaml, saves the model and infills a held-out file.
quickstart: install
	HF_HUB_OFFLINE=1 $(BIN)/python scripts/quickstart.py --output $(QUICKSTART)

test: install
	HF_HUB_OFFLINE=1 $(BIN)/python -m pytest tests -q

test-fast: install
	HF_HUB_OFFLINE=1 $(BIN)/python -m pytest tests -q -m "not slow"

style: install
	$(BIN)/ruff format src scripts tests
	$(BIN)/ruff check --fix src scripts tests

quality: install
	$(BIN)/ruff check src scripts tests
	$(BIN)/ruff format --check src scripts tests

# Throughput figures (docs/benchmarks.md): the data pipeline, then training against the plain path, on the
# quickstart's data and tokenizer (run `make quickstart` first).
benchmark: install
	RAYON_NUM_THREADS=1 HF_HUB_OFFLINE=1 $(BIN)/python scripts/benchmark_data.py
	HF_HUB_OFFLINE=1 $(BIN)/python scripts/benchmark.py --recipe recipes/tiny/pretrain.yaml --seq_length 4096 \
		--per_device_train_batch_size 2 --steps 3 --warmup 1 --baseline \
		--dataset_name_or_path $(QUICKSTART)/data --tokenizer_name_or_path $(QUICKSTART)/tokenizer

clean:
	rm -rf $(QUICKSTART) .pytest_cache
