VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed

.PHONY: install test test-fast lint lock demo cloud-test screenshot clean

$(STAMP): pyproject.toml
	test -x $(PY) || python3 -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q torch==2.13.0
	$(PY) -m pip install -q -e '.[train,dev]'
	touch $(STAMP)

install: $(STAMP)

lint: $(STAMP)
	$(VENV)/bin/ruff check launcher trainer tests bench
	$(VENV)/bin/ruff format --check launcher trainer tests bench
	$(VENV)/bin/hadolint Dockerfile

# Four workers on CI's two cores: the suite mostly waits (emulated operations, subprocesses, sockets);
# the CPU-bound trainer tests share one of them (tests/conftest.py).
WORKERS ?= 4
PYTEST_PARALLEL := -n $(WORKERS) --dist loadgroup

test: lint
	$(VENV)/bin/pytest -q $(PYTEST_PARALLEL)

# The inner loop: every test not marked slow, without the lint.
test-fast: $(STAMP)
	$(VENV)/bin/pytest -q $(PYTEST_PARALLEL) -m "not slow"

# README.md's picture of the report page (docs/report.png), from the tiny model's real run.
screenshot: $(STAMP)
	GEMMA_LAUNCH_SCREENSHOT=$(abspath docs/report.png) $(VENV)/bin/pytest -q \
		tests/trainer/test_report_page.py -k every_section

# The real-cloud suite (tests/cloud): costs money, needs a project of yours and ADC.
cloud-test: $(STAMP)
	@test -n "$$GEMMA_LAUNCH_TEST_PROJECT" || { echo "Set GEMMA_LAUNCH_TEST_PROJECT to a project of yours (and run gcloud auth application-default login)."; exit 2; }
	$(VENV)/bin/pytest -q -rs -s -m cloud tests/cloud

# The image's dependencies for its platform (Linux x86_64, glibc 2.28+, CPython 3.12), pinned with hashes.
lock: $(STAMP)
	$(VENV)/bin/uv pip compile pyproject.toml requirements-image.in --extra train --python-version 3.12 \
		--python-platform x86_64-manylinux_2_28 --generate-hashes --output-file requirements.lock

demo: $(STAMP)
	PATH=$(abspath $(VENV))/bin:$$PATH bash scripts/demo.sh

clean:
	rm -rf $(VENV) .demo
