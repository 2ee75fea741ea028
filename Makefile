# make demo: the recycling demo on scikit-learn's digits (2 CPU procs): a
#   dense ViT pretrained on classes 0-4, recycled into MoEs, fine-tuned on 5-9
# make test: lint + the test suite
# make gpu-suite: benchmarks/gpu_suite.sh (CUDA bf16 benchmarks with floors and
#   the device tests on CUDA, JSON in work_dirs/gpu_suite; <= 8 minutes)
# Both create .venv in the checkout if it is missing and install what is
# needed once (the stamp file makes a second run fast).

PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.moe_plugin-installed
TORCH := torch==2.14.1 torchvision==0.29.1
MMCV_LITE := mmcv-lite>=2.0.0rc4,<2.4
LINT_DIRS := $(wildcard moe_plugin tools tests benchmarks)

.PHONY: all install demo test lint gpu-suite

all: test

$(PY):
	$(PYTHON) -m venv $(VENV)

# mmcv-lite only when no mmcv (full or lite) is importable: a full mmcv
# built for the local CUDA must never be replaced.
$(STAMP): $(PY) setup.py
	$(PY) -m pip install --quiet $(TORCH)
	$(PY) -c 'import mmcv' 2>/dev/null || \
		$(PY) -m pip install --quiet '$(MMCV_LITE)'
	$(PY) -m pip install --quiet -e '.[dev]'
	touch $(STAMP)

install: $(STAMP)

demo: $(STAMP)
	PATH="$(abspath $(VENV))/bin:$$PATH" \
		$(PY) tools/demo/recycling_demo.py --gpus 2

lint: $(STAMP)
	$(PY) -m flake8 $(LINT_DIRS) configs setup.py
	$(PY) -m isort --check-only --diff --line-length 79 -m 0 \
		-p moe_plugin $(LINT_DIRS) setup.py

test: lint
	$(PY) -m pytest tests

gpu-suite: $(STAMP)
	PYTHON=$(abspath $(PY)) benchmarks/gpu_suite.sh work_dirs/gpu_suite
