# The two README commands:  `make run`  and  `make test`.
# Both install everything first (uv + the locked environment in .venv), so they work on a fresh clone.
SHELL := /bin/bash
PYTHON ?= python3
UV := $(shell command -v uv 2>/dev/null || echo $(CURDIR)/.tools/bin/uv)
export UV_PYTHON_DOWNLOADS ?= never
PYTEST_ARGS ?=
# make test runs the suite on this many pytest-xdist workers, one test file per worker at a time
# (a file's tests share their module fixtures: one Triton, one flow run). 2 = the developer machine's cores.
TEST_WORKERS ?= 2

.PHONY: install run test check bench quality robustness demo-online serve predict clean

# uv is bootstrapped from PyPI into .tools/ when the machine has none.
$(CURDIR)/.tools/bin/uv:
	$(PYTHON) -m venv $(CURDIR)/.tools
	$(CURDIR)/.tools/bin/pip install --quiet uv

install: $(if $(findstring .tools,$(UV)),$(CURDIR)/.tools/bin/uv)
	$(UV) sync --frozen --python $(PYTHON)

## run: install, then the whole pipeline on the embedded synthetic default, ending in served predictions
run: install
	$(UV) run --frozen --no-sync recsys run $(ARGS)

## test: install, then the test suite (unit + integration with a real Triton and a real Prefect flow)
test: install
	$(UV) run --frozen --no-sync pytest -n $(TEST_WORKERS) --dist loadfile --no-loadscope-reorder $(PYTEST_ARGS)

## check: install, then the code checks (config in pyproject.toml); .ci/run runs them before the tests
##   ruff: pyflakes, bugbear, imports at the top; mypy: types; lint-imports: the stage layering of docs/architecture.md
check: install
	$(UV) run --frozen --no-sync ruff check pipeline_lib flows
	$(UV) run --frozen --no-sync mypy
	$(UV) run --frozen --no-sync lint-imports

## bench: install, then the benchmark suite (ETL, training, serving, end to end); results in benchmarks/results/
bench: install
	$(UV) run --frozen --no-sync python -m benchmarks.run $(ARGS)

## quality: install, then the quality table (every candidate, each family, each data set, test figures with
##   95% intervals, the issue's targets) into benchmarks/README.md; ARGS="--quick" for a smoke run
quality: install
	$(UV) run --frozen --no-sync python -m benchmarks.quality $(ARGS)

## robustness: install, then the robustness check (bad requests, load, promote/rollback under load, killed
##   processes) against a small ranking and retrieval version on loopback; ~4 min; benchmarks/results/robustness.json
robustness: install
	$(UV) run --frozen --no-sync python -m benchmarks.robustness $(ARGS)

## demo-online: install, then the closed loop on a small synthetic run: v1 served -> simulated users -> online
##   evaluation -> retrain on the feedback -> v2 promoted -> both versions' online CTR (docs/online.md); ~6 min
demo-online: install
	$(UV) run --frozen --no-sync python -m benchmarks.online_demo $(ARGS)

serve: install
	$(UV) run --frozen --no-sync recsys serve $(ARGS)

predict: install
	$(UV) run --frozen --no-sync recsys predict $(ARGS)

clean:
	rm -rf runs model_repository/recsys .pytest_cache .mypy_cache .ruff_cache
