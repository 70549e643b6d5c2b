# Two commands do everything on a fresh clone (each makes .venv on first use):
#   make run    the main job: the notebooks in order, on the default preset
#   make test   every test: pytest (unit + integration), then pytest --nbval on the notebooks
# Also: make lab (JupyterLab), make playground (the playground web app on http://127.0.0.1:7860).

PY      ?= python3
VENV    := .venv
BIN     := $(VENV)/bin
STAMP   := $(VENV)/.installed

NOTEBOOKS := 01_mla 02_moe_router 03_phase1_training 04_phase2_resume 05_playground 06_mtp
# CI runs the notebooks on the tiny preset for NB_STEPS steps, writing checkpoints and figures to a temporary
# folder (the committed figures/ and checkpoints/ are never touched by a test).
NB_STEPS ?= 20

.PHONY: run test unit nbval chromium lab playground clean

$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PY) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet -e ".[dev,hf,web]"
	touch $(STAMP)

# make install: only the .venv (dsv3 installed editable with every extra); then .venv/bin/python -m dsv3 --help
.PHONY: install
install: $(STAMP)

# The notebooks in order, executed in place (outputs saved): 174m on a CUDA GPU, else tiny (see notebook 03).
run: $(STAMP)
	@cd notebooks && for nb in $(NOTEBOOKS); do \
	  start=$$(date +%s); \
	  ../$(BIN)/jupyter nbconvert --to notebook --execute --inplace --ExecutePreprocessor.timeout=-1 $$nb.ipynb \
	    || exit 1; \
	  echo "run: $$nb.ipynb $$(( $$(date +%s) - start )) s"; \
	done

unit: $(STAMP)
	$(BIN)/python -m pytest -q

# Notebooks 01-02 strictly against their committed outputs; 03-06 in one session, in order (04 resumes 03's
# checkpoint, 05 loads it; 06 trains its own two runs), checking only their assert cells.
nbval: $(STAMP)
	@tmp=$$(mktemp -d) && trap 'rm -rf "$$tmp"' EXIT && \
	export DSV3_PRESET=tiny DSV3_STEPS=$(NB_STEPS) DSV3_CKPT_DIR="$$tmp/checkpoints" DSV3_FIG_DIR="$$tmp/figures" && \
	start=$$(date +%s) && \
	$(BIN)/python -m pytest -q -p no:cacheprovider --nbval --nbval-current-env \
	  --nbval-sanitize-with notebooks/nbval_sanitize.cfg notebooks/01_mla.ipynb notebooks/02_moe_router.ipynb && \
	$(BIN)/python -m pytest -q -p no:cacheprovider --nbval-lax --nbval-current-env \
	  notebooks/03_phase1_training.ipynb notebooks/04_phase2_resume.ipynb notebooks/05_playground.ipynb \
	  notebooks/06_mtp.ipynb && \
	echo "nbval: $$(( $$(date +%s) - start )) s"

# The browser test needs Debian's chromium; install it when we can (root + apt), else that test skips.
chromium:
	@command -v chromium >/dev/null || { [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null && \
	  { apt-get update -qq && apt-get install -y -qq chromium >/dev/null; } ; } || \
	  echo "chromium not installed: tests/test_playground_web.py will skip"

test: chromium unit nbval

# As root (containers, Colab) Jupyter refuses to start without --allow-root.
lab: $(STAMP)
	$(BIN)/jupyter lab notebooks/ $$([ "$$(id -u)" = 0 ] && echo --allow-root)

# The playground web app (notebook 05's widget alone, served by Voila) on http://127.0.0.1:7860 for the runs in
# checkpoints/. One kernel per visitor: at most as many as the free memory holds and 2 per core (it prints the
# number), then a "busy" page; closed pages' kernels end after 30 s idle. E.g. make playground PLAYGROUND_ARGS="--max-kernels 5".
PLAYGROUND_ARGS ?=
playground: $(STAMP)
	$(BIN)/python -m dsv3.playground_server --checkpoints checkpoints --port 7860 $(PLAYGROUND_ARGS)

clean:
	rm -rf $(VENV) .pytest_cache
