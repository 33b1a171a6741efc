# The two set-up commands from the README: `make demo` and `make test`.
# torch 2.14.1 + torchvision 0.29.1 (PyPI's Linux builds, CUDA-enabled; they run on CPU too) with
# the open_clip, timm and faces extras; constraints.txt keeps any extra from replacing that torch.
# A light install without torchvision: see the README ("Installing").
PYTHON ?= python3
TORCH ?= torch==2.14.1 torchvision==0.29.1
EXTRAS ?= dev,open_clip,timm,faces
VENV := .venv
export PATH := $(CURDIR)/$(VENV)/bin:$(PATH)

.PHONY: venv demo demo-video test lint bench clean-demo

$(VENV)/.installed: pyproject.toml constraints.txt
	$(PYTHON) -m venv $(VENV)
	$(VENV)/bin/pip install --quiet --upgrade pip
	$(VENV)/bin/pip install --quiet $(TORCH)
	$(VENV)/bin/pip install --quiet -c constraints.txt -e '.[$(EXTRAS)]'
	$(VENV)/bin/pip install --quiet --no-deps facenet-pytorch  # MTCNN; its torch<2.3 pin is stale
	touch $@

venv: $(VENV)/.installed

demo: venv
	dvc repro
	python -m pipeline show

# The video demo: FF++'s video layout, a real face photograph, face crops (examples/video/params.yaml).
demo-video: venv
	python -m pipeline demo --video --data-dir data/demo-video
	for stage in manifest extract train evaluate; do python -m pipeline $$stage --params examples/video/params.yaml || exit 1; done
	python -m pipeline show --params examples/video/params.yaml

lint: venv
	ruff check .
	ruff format --check .

test: lint
	python -m pytest

bench: venv
	python benchmarks/extract_bench.py
	python benchmarks/cli_dask_bench.py
	python -m benchmarks.families_bench
	python -m benchmarks.faces_bench
	python benchmarks/evaluate_bench.py
	python benchmarks/evaluate_bench.py --spectrum backbone
	python benchmarks/repro_bench.py

clean-demo:
	rm -rf data/demo data/tiny-clip cache/manifest.parquet cache/embeddings cache/predict cache/extract.json models metrics plots
