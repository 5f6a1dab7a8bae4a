# One-command set-up: every target creates .venv when it is missing.
PY ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
DEMO_WS ?= workspace/demo

.PHONY: test demo proto bench lint docs clean

$(STAMP): pyproject.toml
	test -d $(VENV) || $(PY) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	# Pinned here, not in pyproject.toml: torch 2.13.0 is the CPU wheel on this registry (an unpinned torch pulls
	# CUDA), and the generated wire code must match grpcio-tools exactly (tests/test_wire_drift.py).
	$(BIN)/pip install -q torch==2.13.0 grpcio-tools==1.85.1
	# `examples` brings MONAI and nibabel (examples/segmentation-3d); after the pin, so they keep this torch.
	$(BIN)/pip install -q -e '.[server,site,test,examples,tracking]'
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

$(VENV)/.docs-installed: $(STAMP)
	$(BIN)/pip install -q -e '.[docs]'
	touch $@

# The reference site: fails on a warning, a broken build or a dead internal link.
docs: $(VENV)/.docs-installed
	NO_MKDOCS_2_WARNING=1 $(BIN)/mkdocs build --strict --site-dir site

lint: $(STAMP)
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .

clean:
	rm -rf $(VENV) workspace bench-out site
