# The two commands of the README: `make demo` (ask the demo model about a picture)
# and `make test` (the test-suite). Both set up .venv on first use.
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed

.PHONY: demo test lint clean

$(STAMP): pyproject.toml scripts/install-llama-cpp.sh
	python3 -m venv $(VENV)
	scripts/install-llama-cpp.sh $(PY)
	$(PY) -m pip install -e ".[llama-cpp,dev]"
	touch $(STAMP)

demo: $(STAMP)
	$(VENV)/bin/llava-local ask --backend llama_cpp examples/digit.png "What digit is this?"

test: $(STAMP)
	$(PY) -m pytest

lint: $(STAMP)
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .
	$(VENV)/bin/mypy

clean:
	rm -rf $(VENV) build *.egg-info
