# a2jax: `make test` and `make demo` work from a clean clone (they create .venv and install).
PYTHON ?= python3.11
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed-stamp
# The CPU is the backend of tests and demos even though libtpu and the CUDA plugin are installed
# (they serve deviceless ahead-of-time compilation); 8 simulated devices exercise the sharding.
export JAX_PLATFORMS := cpu
# Collectives between simulated devices wait for every device thread: on a loaded 2-core machine
# that can take longer than XLA's default before it aborts, so allow more.
export XLA_FLAGS := --xla_force_host_platform_device_count=8 \
  --xla_cpu_collective_call_terminate_timeout_seconds=900 --xla_cpu_collective_timeout_seconds=900
export TF_CPP_MIN_LOG_LEVEL := 3
PYTEST_ARGS ?=
# Two pytest workers, each running whole test files (module fixtures built once): much of the
# suite is XLA compiling on one thread, so two workers keep both cores busy (on 2 cores the suite
# took 56 min instead of 78).
TEST_WORKERS ?= 2

DEMO := out/demo

.PHONY: test test-fast demo app clean-venv

$(STAMP): pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -e '.[test,tpu,cuda,convert,app]'
	touch $(STAMP)

test: $(STAMP)
	$(PY) -m pytest -q -rs --durations=25 -n $(TEST_WORKERS) --dist loadfile $(PYTEST_ARGS) tests

# Everything but the slow ahead-of-time compiles of the full-size model.
test-fast: $(STAMP)
	$(PY) -m pytest -q -rs -m 'not slow' -n $(TEST_WORKERS) --dist loadfile $(PYTEST_ARGS) tests

# A small A2 trained here on synthetic elements-to-video clips (python -m a2jax.demo), then sampled
# on held-out combinations: videos, PNG strips and fidelity scores under $(DEMO)/samples. A later
# run reuses the trained model; RETRAIN=1 trains again. One CPU device (the 8 simulated devices
# serve the tests).
RETRAIN ?=
demo: $(STAMP)
	XLA_FLAGS= $(PY) -m a2jax.demo --out $(DEMO) $(if $(RETRAIN),--retrain)

# The web app (python -m a2jax.app) on http://127.0.0.1:7860: CHECKPOINT=folder serves a converted
# folder; without it the make demo model, trained first if $(DEMO)/model is incomplete. One CPU device.
CHECKPOINT ?=
APP_ARGS ?=
app: $(STAMP)
	$(if $(CHECKPOINT),,test -d $(DEMO)/model/transformer || XLA_FLAGS= $(PY) -m a2jax.demo --out $(DEMO))
	XLA_FLAGS= $(PY) -m a2jax.app --checkpoint $(or $(CHECKPOINT),$(DEMO)/model) $(APP_ARGS)

clean-venv:
	rm -rf $(VENV)
