# The two commands a newcomer types: `make demo` and `make test`.
# Each creates .venv if missing, installs torch==2.13.0 only when no torch is importable there
# (a torch you installed yourself is left alone), then the package with its extras.

PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.routesae-installed

.PHONY: test demo install lint clean-venv

$(PY):
	$(PYTHON) -m venv $(VENV)

$(STAMP): pyproject.toml | $(PY)
	@$(PY) -c "import torch" 2>/dev/null && echo "torch found: $$($(PY) -c 'import torch; print(torch.__version__)') (left alone)" \
		|| $(PY) -m pip install "torch==2.13.0"
	$(PY) -m pip install -e ".[dev]"
	@touch $(STAMP)

install: $(STAMP)

test: $(STAMP)
	$(PY) -m pytest -q

demo: $(STAMP)
	$(VENV)/bin/routesae demo

lint: $(STAMP)
	$(VENV)/bin/ruff check routesae tests bench analyses dashboards

clean-venv:
	rm -rf $(VENV)
