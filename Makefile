# make demo: the recycling demo on scikit-learn's digits (2 CPU procs): a
#   dense ViT pretrained on classes 0-4, recycled into MoEs, fine-tuned on 5-9
# make test: lint + the test suite, dense prediction included
# make dense-demo: detection and segmentation with a dense and a recycled
#   MoE backbone on digits pasted on a canvas (MMDetection, MMSegmentation)
# make gpu-suite: benchmarks/gpu_suite.sh (CUDA bf16 benchmarks with floors and
#   the device tests on CUDA, JSON in work_dirs/gpu_suite; <= 8 minutes)
# make benchmark-recycling: the recycling benchmark on Fashion-MNIST (3 seeds,
#   about an hour on 2 CPU cores); make benchmark-recycling-sweep: the
#   downstream training-set size sweep (1 seed); make fashion-mnist-data:
#   the data alone (Debian's dataset-fashion-mnist, installed if missing)
# All create .venv in the checkout if it is missing and install what is
# needed once (the stamp files make a second run fast). `test` and
# `dense-demo` also need the full mmcv 2.1 (compiled ops):
# tools/install_mmcv.sh builds it once per machine (about 23 min on 2
# cores) and caches the wheel in ~/.cache/moe_plugin; `demo` does not.

PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.moe_plugin-installed
DENSE_STAMP := $(VENV)/.moe_plugin-dense-installed
TORCH := torch==2.14.1 torchvision==0.29.1
# MMDetection 3.3 and MMSegmentation 1.2 refuse mmcv >= 2.2.
MMCV_LITE := mmcv-lite>=2.0.0rc4,<2.2
LINT_DIRS := $(wildcard moe_plugin tools tests benchmarks)

.PHONY: all install install-dense demo dense-demo test lint gpu-suite \
	fashion-mnist-data benchmark-recycling benchmark-recycling-sweep

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

# The full mmcv (kept if present, else the cached or freshly built wheel,
# replacing mmcv-lite) and MMDetection / MMSegmentation.
$(DENSE_STAMP): $(STAMP) tools/install_mmcv.sh
	tools/install_mmcv.sh $(PY)
	$(PY) -m pip install --quiet -e '.[dev,det,seg]'
	touch $(DENSE_STAMP)

install: $(STAMP)

install-dense: $(DENSE_STAMP)

demo: $(STAMP)
	PATH="$(abspath $(VENV))/bin:$$PATH" \
		$(PY) tools/demo/recycling_demo.py --gpus 2

lint: $(STAMP)
	$(PY) -m flake8 $(LINT_DIRS) configs setup.py
	$(PY) -m isort --check-only --diff --line-length 79 -m 0 \
		-p moe_plugin $(LINT_DIRS) setup.py

test: lint $(DENSE_STAMP)
	$(PY) -m pytest tests

gpu-suite: $(STAMP)
	PYTHON=$(abspath $(PY)) benchmarks/gpu_suite.sh work_dirs/gpu_suite

FMNIST_SRC ?= /usr/share/datasets/fashion-mnist
BENCH_OUT ?= work_dirs/recycling_benchmark

# Installs the Debian package where it is missing and apt-get may run (root,
# or sudo without a password); otherwise says how to get the four files.
fashion-mnist-data: $(STAMP)
	@if [ ! -f $(FMNIST_SRC)/train-images-idx3-ubyte.gz ] && \
		[ "$(FMNIST_SRC)" = /usr/share/datasets/fashion-mnist ]; then \
		if [ "$$(id -u)" = 0 ]; then SUDO=; \
		elif sudo -n true 2>/dev/null; then SUDO="sudo -n"; \
		else SUDO=none; fi; \
		if [ "$$SUDO" != none ] && command -v apt-get >/dev/null; then \
			$$SUDO apt-get install -y dataset-fashion-mnist; \
		else \
			echo "Fashion-MNIST is missing in $(FMNIST_SRC): run" \
			"'sudo apt-get install dataset-fashion-mnist', or put the four" \
			"*-ubyte.gz files in a folder and pass FMNIST_SRC=DIR"; \
			exit 1; \
		fi; \
	fi
	$(PY) -c 'from moe_plugin.datasets import prepare_fashion_mnist; \
		print(prepare_fashion_mnist("data/fashion_mnist", "$(FMNIST_SRC)"))'

benchmark-recycling: fashion-mnist-data
	PATH="$(abspath $(VENV))/bin:$$PATH" \
		$(PY) tools/demo/recycling_demo.py --dataset fashion_mnist \
		--seeds 3 --data-src $(FMNIST_SRC) --out $(BENCH_OUT)

benchmark-recycling-sweep: fashion-mnist-data
	PATH="$(abspath $(VENV))/bin:$$PATH" \
		$(PY) tools/demo/recycling_demo.py --dataset fashion_mnist \
		--seeds 1 --train-images-per-class 20 100 500 \
		--data-src $(FMNIST_SRC) --out $(BENCH_OUT)_sweep

dense-demo: $(DENSE_STAMP)
	PATH="$(abspath $(VENV))/bin:$$PATH" \
		$(PY) tools/demo/dense_prediction_demo.py --out work_dirs/dense_demo
