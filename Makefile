# One-command set-up: every target creates .venv when it is missing.
PY ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
DEMO_WS ?= workspace/demo

.PHONY: test demo proto bench lint clean

$(STAMP): pyproject.toml
	test -d $(VENV) || $(PY) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	# torch is pinned to 2.13.0 in pyproject.toml: that release is the CPU wheel here (an unpinned torch pulls CUDA).
	$(BIN)/pip install -q -e '.[test,examples]'
	touch $(STAMP)

test: $(STAMP)
	$(BIN)/python -m pytest -q

demo: $(STAMP)
	$(BIN)/fedadmin poc run examples/digits --clients 2 --workspace $(DEMO_WS) $(if $(DEMO_KEEP),--keep)

proto: $(STAMP)
	$(BIN)/python scripts/gen_proto.py

bench: $(STAMP)
	$(BIN)/python benchmarks/suite.py
	$(BIN)/python benchmarks/privacy_bench.py

lint: $(STAMP)
	$(BIN)/ruff check .

clean:
	rm -rf $(VENV) workspace bench-out
