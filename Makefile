# mlres_jax: set-up, the main job and the tests.
#   make run    installs everything and trains the Fashion-MNIST multi-level config
#   make test   installs everything and runs the test suite
#   make docs   writes docs/results.md and the README's results table from docs/results/*.json
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
FASHION_MNIST_DIR := /usr/share/datasets/fashion-mnist
WORKDIR ?= runs/fashion_mnist

.PHONY: install data run test test-slow bench docs clean

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip

$(VENV)/.installed: pyproject.toml | $(BIN)/python
	$(BIN)/pip install --quiet -e '.[test]'
	touch $@

install: $(VENV)/.installed

# Fashion-MNIST from Debian's package (see the README). Elsewhere: download the four
# IDX .gz files from https://github.com/zalandoresearch/fashion-mnist and pass
# --config.fashion_mnist_dir=FOLDER.
data:
	@if [ -f $(FASHION_MNIST_DIR)/train-images-idx3-ubyte.gz ]; then \
	  echo "Fashion-MNIST found in $(FASHION_MNIST_DIR)"; \
	elif command -v apt-get >/dev/null 2>&1; then \
	  SUDO=$$( [ "$$(id -u)" = 0 ] || echo sudo ); \
	  $$SUDO apt-get install -y dataset-fashion-mnist || \
	  { $$SUDO apt-get update && $$SUDO apt-get install -y dataset-fashion-mnist; }; \
	else \
	  echo "No apt-get here: download the four Fashion-MNIST IDX .gz files from"; \
	  echo "https://github.com/zalandoresearch/fashion-mnist and pass --config.fashion_mnist_dir=FOLDER"; \
	  exit 1; \
	fi

run: install data
	$(BIN)/python -m mlres_jax.main --config=configs/fashion_mnist.py --workdir=$(WORKDIR)

test: install
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .
	$(BIN)/python -m pytest -q -n 2 --dist loadfile

test-slow: install
	$(BIN)/python -m pytest -q -m slow

BENCH_DIR ?= runs/bench
BENCH_ARGS ?=
# Per-depth costs, then the study (Table 3 and the growth rules) on Fashion-MNIST (the CPU
# preset; docs/benchmarks.md): tables, JSON and the curves plot in $(BENCH_DIR).
# After an interruption: make bench BENCH_ARGS=--resume
bench: install data
	$(BIN)/python -m benchmarks.throughput --families=8,resnet,wresnet --output_dir=$(BENCH_DIR)/throughput
	$(BIN)/python -m benchmarks.study --output_dir=$(BENCH_DIR)/study $(BENCH_ARGS)

# The results page and the README's headline table, from the JSON in docs/results/
# (benchmarks/results.py): nothing in them is typed by hand.
docs: install
	$(BIN)/python -m benchmarks.results

clean:
	rm -rf $(VENV) *.egg-info
