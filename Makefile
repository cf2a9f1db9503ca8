# The two commands of the README: `make demo` (ask the demo model about a picture)
# and `make test` (the test-suite). Both set up .venv on first use; `make demo`
# installs only what running needs, `make test` adds the test tools and dev/.
VENV ?= .venv
PY := $(VENV)/bin/python
RUN := $(VENV)/.installed-run
DEV := $(VENV)/.installed-dev
SUDO := $(shell [ "$$(id -u)" = 0 ] || echo sudo)

.PHONY: demo test lint clean chromium arm64-check

$(RUN): pyproject.toml scripts/install-llama-cpp.sh scripts/build_progress.py scripts/build_requires.py
	python3 -m venv $(VENV)
	scripts/install-llama-cpp.sh $(PY)
	$(PY) -m pip install -e ".[llama-cpp]"
	touch $(RUN)

# The development package (dev/: GGUF writer, numpy reference, libmtmd runner) is
# installed beside the library, never inside its wheel.
$(DEV): $(RUN) dev/pyproject.toml
	$(PY) -m pip install -e ".[llama-cpp,ui,dev]"
	$(PY) -m pip install -e ./dev
	touch $(DEV)

demo: $(RUN)
	$(VENV)/bin/llava-local ask --backend llama_cpp examples/digit.png "What digit is this?"

test: $(DEV) chromium
	$(PY) -m pytest

# The web page's tests drive Debian's Chromium (never a browser Playwright downloads).
chromium:
	@command -v chromium >/dev/null || { \
	  echo "installing Debian's chromium for the web page's tests"; \
	  $(SUDO) apt-get update -qq && \
	  $(SUDO) env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium; }

# The project on an emulated Raspberry Pi 4 and Pi 5 (qemu-user, a Debian arm64 root,
# cross-built llama.cpp wheels): see scripts/arm64_check.py. Hours cold, minutes warm,
# so it is not part of `make test` or .ci/run; the cache is ~/.cache/llava-local/arm64.
arm64-check:
	$(SUDO) python3 scripts/arm64_check.py

lint: $(DEV)
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .
	$(VENV)/bin/mypy
	$(VENV)/bin/lint-imports

clean:
	rm -rf $(VENV) build *.egg-info
