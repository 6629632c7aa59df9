# Every target creates the virtual environment when it is missing, so a fresh clone needs only `make demo`
# or `make test`.
PY ?= python3.11
VENV ?= .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: setup demo test lint bench browser gpu-wheels gpu-acceptance-dry

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
	$(BIN)/python benchmarks/teacher_load_memory.py

# GPU acceptance (README, "GPU acceptance"): the device image has python3.12, torch, transformers, timm, pyarrow and
# h5py but no zarr, dask, dvc or faiss, and installs nothing. benchmarks/gpu_acceptance.py keeps to what runs
# there (an HDF5 store; nothing on its path imports dask, dvc or faiss), so the only wheel it lacks is
# google-crc32c (the store's block checksums). The wheels go to .whl/ (git-ignored), which the device call carries.
GPU_WHEELS := google-crc32c==1.9.0
gpu-wheels: $(STAMP)
	rm -rf .whl && mkdir -p .whl
	$(BIN)/python -m pip download --quiet --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
		--platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 \
		-d .whl $(GPU_WHEELS)
	@du -sh .whl

# The same script with tiny models on the CPU (what tests/test_gpu_acceptance.py runs).
gpu-acceptance-dry: $(STAMP)
	$(BIN)/python benchmarks/gpu_acceptance.py --dry-run --out runs/gpu-acceptance-dry
