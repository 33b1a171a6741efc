# The two set-up commands from the README: `make demo` and `make test`.
# CPU machines get the CPU wheel of torch; GPU users: `make demo TORCH=torch` (PyPI's default
# Linux wheels are CUDA builds) or install their CUDA build into .venv first.
PYTHON ?= python3
TORCH ?= torch==2.13.0
VENV := .venv
export PATH := $(CURDIR)/$(VENV)/bin:$(PATH)

.PHONY: venv demo test lint bench clean-demo

$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(VENV)/bin/pip install --quiet --upgrade pip
	$(VENV)/bin/pip install --quiet $(TORCH)
	$(VENV)/bin/pip install --quiet -e '.[dev]'
	touch $@

venv: $(VENV)/.installed

demo: venv
	dvc repro
	python -m pipeline show

lint: venv
	ruff check .
	ruff format --check .

test: lint
	python -m pytest

bench: venv
	python benchmarks/extract_bench.py
	python benchmarks/evaluate_bench.py

clean-demo:
	rm -rf data/demo data/tiny-clip cache/manifest.parquet cache/embeddings cache/predict cache/extract.json models metrics plots
