PYTHON ?= python3
# The CPU build of torch; GPU images keep their own torch and skip this pin.
TORCH_SPEC ?= torch==2.13.0
# The Kubernetes API the deploy/ manifests are checked against (schemas ship with kubernetes-validate).
KUBERNETES_VERSION ?= 1.30.0
# NVIDIA Dynamo's frontend, installed without its dependencies: they are the `dynamo` extra, less aisimulate
# (Dynamo's planner only; it does not install from PyPI).
DYNAMO_SPEC ?= ai-dynamo==1.6.1

.PHONY: install test lint demo clean

install:
	$(PYTHON) -m pip install "$(TORCH_SPEC)"
	$(PYTHON) -m pip install -e ".[dev,dynamo]"
	$(PYTHON) -m pip install --no-deps "$(DYNAMO_SPEC)"

test:
	$(PYTHON) -m pytest -q --durations=15

demo: install
	$(PYTHON) tools/demo.py

lint:
	$(PYTHON) -m ruff check .
	hadolint docker/Dockerfile
	kubernetes-validate --kubernetes-version $(KUBERNETES_VERSION) --strict --quiet deploy/*.yaml
	bash -n docker/entrypoint.sh tests/gpu/run_device_checks.sh .ci/run

clean:
	rm -rf build *.egg-info .pytest_cache .ruff_cache
