# Two entry points: `make demo` (the main job on the embedded checkpoint) and `make test`.
# Both create .venv and install what they need, so they work on a machine with only Python 3.11.
PYTHON ?= $(shell command -v python3.11 || command -v python3)
VENV := .venv
BIN := $(VENV)/bin
PYTEST_ARGS ?=
# one pytest worker per core (at most 4: each imports TensorFlow and torch, ~3 GB)
WORKERS ?= $(shell $(PYTHON) -c "import os; print(min(4, len(os.sched_getaffinity(0))))")

.PHONY: demo test bench install install-test clean

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip

$(VENV)/.installed: $(BIN)/python setup.cfg setup.py
	$(BIN)/pip install --quiet -e .
	touch $@

# JAX (tests/test_backends.py) goes into .venv/jax, on PYTHONPATH only in the processes that run
# Keras on it: TensorFlow imports jax whenever it can (tensorflow/lite/python/util.py), 0.8 s more
# in each of the suite's ~250 TensorFlow processes. --no-deps: what it needs (numpy, ml_dtypes,
# opt_einsum, scipy) comes with TensorFlow and scikit-image.
# torch's x86_64 wheel pulls in triton, which segfaults when imported into a process that has
# already loaded TensorFlow (transformers imports it lazily); PyTorch on CPU does not need it.
$(VENV)/.installed-test: $(VENV)/.installed
	$(BIN)/pip install --quiet torch==2.14.1 torchvision==0.29.1
	$(BIN)/pip install --quiet -e '.[test]'
	$(BIN)/pip uninstall --quiet --yes triton || true
	$(BIN)/pip install --quiet --no-deps --target $(VENV)/jax jax==0.10.2 jaxlib==0.10.2
	PYTHONPATH=$(VENV)/jax TF_CPP_MIN_LOG_LEVEL=3 $(BIN)/python -c "import jax.numpy"
	touch $@

# The LiteRT Task Library (tflite-support 0.4.4: the ImageClassifier an Android app runs, here
# through its Python binding) for tests/test_task_library.py, in a venv of its own: it pins
# protobuf 3, which TensorFlow 2.21 refuses, and installs on Python 3.11 only. It links
# libusb-1.0.so.0, which a fresh machine lacks (Debian's libusb-1.0-0): PyPI's libusb-package
# ships it, linked into $(TASKLIB)/libusb under that name for LD_LIBRARY_PATH (set by the test).
# The import below fails here, not in a test. Pillow as in .venv, so both sides decode and resize
# the photos alike.
TASKLIB := .venv-tasklib
$(TASKLIB)/.installed: $(VENV)/.installed
	$(PYTHON) -m venv $(TASKLIB)
	$(TASKLIB)/bin/pip install --quiet tflite-support==0.4.4 libusb-package==1.0.30.0 \
		pillow==$$($(BIN)/python -c "import PIL; print(PIL.__version__)")
	mkdir -p $(TASKLIB)/libusb
	ln -sf "$$($(TASKLIB)/bin/python -c "import libusb_package as p, os; print(os.path.dirname(p.__file__))")/libusb-1.0.so" \
		$(TASKLIB)/libusb/libusb-1.0.so.0
	LD_LIBRARY_PATH=$(TASKLIB)/libusb $(TASKLIB)/bin/python -c "from tflite_support.task import vision"
	touch $@

$(VENV)/.installed-bench: $(VENV)/.installed-test
	$(BIN)/pip install --quiet -e '.[test,bench]'
	$(BIN)/pip uninstall --quiet --yes triton || true
	touch $@

install: $(VENV)/.installed
install-test: $(VENV)/.installed-test $(TASKLIB)/.installed

demo: $(VENV)/.installed
	$(BIN)/python -m conversion.convert

test: $(VENV)/.installed-test $(TASKLIB)/.installed
	$(BIN)/python -m pytest -q -n $(WORKERS) --dist loadscope --durations=25 $(PYTEST_ARGS)

bench: $(VENV)/.installed-bench
	$(BIN)/python benchmarks/bench_inference.py

clean:
	rm -rf $(VENV) $(TASKLIB) build *.egg-info
