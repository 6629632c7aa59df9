# Every target creates the virtual environment when it is missing, so a fresh clone needs only `make demo`
# or `make test`.
PY ?= python3.11
VENV ?= .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: setup demo test lint bench browser

$(STAMP): pyproject.toml
	@test -x $(BIN)/python || $(PY) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet "torch==2.14.1" "torchvision==0.29.1"
	$(BIN)/python -m pip install --quiet -e ".[dev]"
	@touch $(STAMP)

setup: $(STAMP)

# dvc.yaml's commands call `dsmd`: put the environment's bin first on PATH for them.
demo: $(STAMP)
	PATH="$(abspath $(BIN)):$$PATH" $(BIN)/dvc repro
	$(BIN)/dvc metrics show
	@echo "report: runs/evaluate/report.html"

# The report test renders HTML in headless Chromium through chromedriver: install whichever of the two is missing
# from Debian (root, as in CI). A machine with chromium but no driver would otherwise skip that test silently.
browser:
	@if command -v chromium >/dev/null 2>&1 && command -v chromedriver >/dev/null 2>&1; then :; \
	elif [ "$$(id -u)" = 0 ]; then apt-get update -qq && apt-get install -y -qq chromium chromium-driver >/dev/null; \
	else echo "chromium or chromedriver missing and not root: the report rendering test will be skipped"; fi

test: $(STAMP) browser
	$(BIN)/python -m pytest -q

# lint-imports: the layering contracts in pyproject.toml ([tool.importlinter]).
lint: $(STAMP)
	$(BIN)/ruff check pipeline stages store tests benchmarks
	$(BIN)/lint-imports

bench: $(STAMP)
	$(BIN)/python benchmarks/store_throughput.py --rows 50000
	$(BIN)/python benchmarks/extract_throughput.py
	$(BIN)/python benchmarks/extract_end_to_end.py
	$(BIN)/python benchmarks/distill_throughput.py
	$(BIN)/python benchmarks/evaluate.py
	$(BIN)/python benchmarks/deploy.py --quick
