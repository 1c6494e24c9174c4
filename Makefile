# The two set-up commands of the README: `make demo` and `make test`.
# Both create .venv in the repo root with pip and install what they need.
PY ?= python3
VENV := .venv
BIN := $(VENV)/bin
# torch/torchvision: pip on these machines takes these builds from local disk (a CUDA
# build that runs on the CPU); other versions would be downloaded (gigabytes).
TORCH := torch==2.14.1 torchvision==0.29.1
# OpenCLIP's own trainer (open_clip_train) breaks with webdataset >= 0.2.96; pinning the
# last good release lets the tests read our shards with it. Our code works with either.
WDS := webdataset==0.2.86

.PHONY: venv demo test lint bench browser clean

$(BIN)/.installed: pyproject.toml Makefile
	test -x $(BIN)/python || $(PY) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/pip install -q $(TORCH)
	$(BIN)/pip install -q -e '.[test]' '$(WDS)' $(TORCH)
	# A second webdataset, outside the venv, for the test that our loader does not care.
	$(BIN)/pip install -q --no-deps --target .wds-new webdataset==0.2.111
	# And the current one, for the test that webdataset 1.x reads our shards.
	$(BIN)/pip install -q --no-deps --target .wds-1 webdataset==1.0.2
	touch $@

venv: $(BIN)/.installed

# Headless Chromium (Debian's) for the report test.
browser:
	@command -v chromium >/dev/null 2>&1 || { \
	  if [ "$$(id -u)" = 0 ]; then apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium >/dev/null; \
	  else echo "chromium missing: run 'sudo apt-get install chromium'"; exit 1; fi; }

demo: venv
	$(BIN)/python jobs/demo.py --out demo-out

test: venv browser
	$(BIN)/ruff check .
	$(BIN)/python -m pytest -q

# clip-retrieval (clip_inference, the reference of benchmarks/score.py) beside our pins, outside the venv:
# it pins numpy<2, pyarrow<16 and open-clip-torch<3, and pulls in a web back end the benchmark never uses.
.bench-clip-retrieval:
	$(BIN)/pip install -q --no-deps --target $@ clip-retrieval==2.45.0 all-clip==1.3.0 clip-anytorch==2.6.0 setuptools==80.9.0

bench: venv .bench-clip-retrieval
	$(BIN)/python benchmarks/ingest.py
	$(BIN)/python benchmarks/dedup.py --captions 50000 --images 5000
	$(BIN)/python benchmarks/train.py
	$(BIN)/python benchmarks/score.py

clean:
	rm -rf demo-out bench-out .pytest_cache
