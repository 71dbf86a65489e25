# mlx-serving. `make run` serves the demo model; `make test` runs the whole test suite.
# Both first set everything up: a .venv, the right MLX backend (Metal on macOS, CPU on Linux,
# CUDA 13 with MLX_SERVING_CUDA=1) and, on Linux CPU, OpenBLAS for fast fp32 matmuls.

PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
DEMO_MODEL ?= models/demo-small
PYTEST_ARGS ?=

UNAME_S := $(shell uname -s)
ifeq ($(UNAME_S),Darwin)
  EXTRAS := test
else ifeq ($(MLX_SERVING_CUDA),1)
  EXTRAS := test,cuda13
else
  EXTRAS := test,cpu
  NEEDS_OPENBLAS := 1
endif

# Environment for everything that runs MLX or starts Ray: offline hub, OpenBLAS preloaded where
# present (MLX's Linux CPU wheel bundles a reference BLAS ~30x slower for fp32 matmuls), and
# Serve's high-throughput mode (HAProxy, gRPC between replicas) where HAProxy can run
# (MLX_SERVING_SERVE_MODE=default keeps Serve's defaults; docs/DEPLOYMENT.md).
RUN_ENV = env HF_HUB_OFFLINE=1 $$($(PY) -m mlx_serving.engine.blas --env) \
	$$($(PY) -m mlx_serving.deployments.serve_env --env)

.PHONY: setup run test demo-model clean

setup: $(VENV)/.installed-$(EXTRAS) openblas

$(VENV)/.installed-%: pyproject.toml
	@test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -e '.[$(EXTRAS)]'
	@rm -f $(VENV)/.installed-*
	@touch $@

# Debian/Ubuntu as root: install the pthread OpenBLAS build if it is missing. Elsewhere this
# is skipped with a note; the engine then runs with MLX's own (slow) CPU BLAS.
.PHONY: openblas
openblas:
ifeq ($(NEEDS_OPENBLAS),1)
	@if ls /usr/lib/*-linux-gnu/openblas-pthread/libopenblas.so.0 >/dev/null 2>&1; then :; \
	elif [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null; then \
	  (apt-get install -y -q libopenblas0-pthread >/dev/null 2>&1 || \
	   (apt-get update -q >/dev/null && apt-get install -y -q libopenblas0-pthread >/dev/null)) || \
	  echo "note: could not install libopenblas0-pthread; CPU matmuls will be slow"; \
	else echo "note: libopenblas0-pthread is not installed (needs root and apt); CPU matmuls will be slow"; fi
endif

demo-model: setup
	@$(RUN_ENV) $(PY) -c "from mlx_serving.engine.modelgen import ensure_model; ensure_model('$(DEMO_MODEL)', size='small')"

# Serve the demo model on http://127.0.0.1:8000 (Ctrl-C stops it). RAY_ADDRESS=local starts
# a fresh local Ray even if another cluster is running; set RAY_ADDRESS to deploy onto one.
RAY_ADDRESS ?= local
run: demo-model
	$(RUN_ENV) RAY_ADDRESS=$(RAY_ADDRESS) $(VENV)/bin/serve run cluster.yaml

test: setup
	$(RUN_ENV) $(PY) -m pytest $(PYTEST_ARGS)

clean:
	rm -rf $(VENV) .cache .pytest_cache
