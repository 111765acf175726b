# Entry points for developers and CI. `make test` is the project's test command; CI runs it through
# .ci/run. Targets install what they need first: Debian packages and a running Docker engine
# (`system`, needs root), the virtual environment (`venv`) and the Python test image (`image`).

PYTHON ?= python3
VENV := .venv
PYTEST_ARGS ?=
# Touched after a successful install; pip runs again only when pyproject.toml changes.
VENV_STAMP := $(VENV)/.installed-stamp

.PHONY: venv system image test demo faults
# The prerequisites below must run in order (system packages before the venv, the venv before the image).
.NOTPARALLEL:

venv: $(VENV_STAMP)

$(VENV_STAMP): pyproject.toml
	@echo ">>> Installing prefect-mig and its dev extras into $(VENV) (takes minutes on a fresh machine)"
	$(PYTHON) -m venv $(VENV)
	$(VENV)/bin/pip install --quiet -e '.[dev]'
	touch $@

system:
	@echo ">>> Checking redis-server, docker.io, debootstrap and a running Docker engine (.ci/install-system)"
	bash .ci/install-system

image: system venv
	@echo ">>> Ensuring the Python test image (the first build runs debootstrap: about a minute)"
	$(VENV)/bin/python -m prefect_mig.launchers.images ensure-image

test: system venv image
	@echo ">>> Running the tests: pytest -q $(PYTEST_ARGS)"
	$(VENV)/bin/python -m pytest -q $(PYTEST_ARGS)

demo: system venv image
	@echo ">>> Running the demo"
	$(VENV)/bin/prefect-mig demo

# A randomized fault campaign against the allocator (its own redis-server on 127.0.0.1, about
# FAULTS_SECONDS + 10 s); fails when two holders used one slice at once.
FAULTS_SECONDS ?= 180
# Its faults, kills and workers' choices follow this seed: another seed, another campaign.
FAULTS_SEED ?= 1
faults: system venv
	@echo ">>> Running the allocator fault campaign for $(FAULTS_SECONDS) s, seed $(FAULTS_SEED) (tests/faults/campaign.py)"
	$(VENV)/bin/python -m tests.faults.campaign --seconds $(FAULTS_SECONDS) --seed $(FAULTS_SEED)
