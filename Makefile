# The README's commands live here. `make test` works on a bare machine: it creates .venv/,
# installs everything, lints and runs the tests.
VENV   ?= .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.installed
# CPU machines get the CPU wheel of torch; on a CUDA machine pick your own build first, e.g.
#   make install TORCH_SPEC="torch --index-url https://download.pytorch.org/whl/cu124"
TORCH_SPEC ?= $(shell command -v nvidia-smi >/dev/null 2>&1 && echo "torch" || echo "torch==2.13.0")
PYTEST_ARGS ?=

.PHONY: install test test-heavy test-integration lint demo bench clean

$(STAMP): pyproject.toml
	test -x $(PY) || python3 -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q "$(TORCH_SPEC)"
	$(PY) -m pip install -q -e ".[dev]"
	touch $(STAMP)

install: $(STAMP)

# ruff for style and likely bugs; mypy type-checks platform/nic ([tool.mypy] in pyproject.toml).
lint: $(STAMP)
	$(VENV)/bin/ruff check platform tests jobs benchmarks
	$(VENV)/bin/mypy

# Everything but the heavy tier, the whole-study tests included (a tiny pipeline and Tune search,
# a 2-node cluster). The heavy tier (a study killed and re-run, a study or search in a bucket, a
# pipeline job on a head) re-runs whole studies: `make test-heavy`, about 25 more minutes.
test: lint
	$(PY) -m pytest -m "not heavy" $(PYTEST_ARGS)

test-heavy: $(STAMP)
	$(PY) -m pytest -m heavy $(PYTEST_ARGS)

# Only the whole-study tests (also part of `make test`): about 4 minutes on 2 CPUs.
test-integration: $(STAMP)
	$(PY) -m pytest -m integration $(PYTEST_ARGS)

demo: $(STAMP)
	$(VENV)/bin/nic pipeline --config configs/demo/pipeline.yaml

bench: $(STAMP)
	$(PY) benchmarks/run_all.py

clean:
	rm -rf $(VENV) .pytest_cache .ruff_cache build *.egg-info platform/*.egg-info
