# The README's commands. Each installs the pinned stack into .venv/ first (a no-op when
# it is already there).
PYTHON := .venv/bin/python

.PHONY: install demo engine-demo test

install:
	bash tools/install_stack.sh

# The main job: BlockCopy on a real video against dense and the baselines (ARGS: extra options, e.g.
# ARGS="--frames 120 --warmup 60 --taus 0.3" for a quick look).
demo: install
	$(PYTHON) tools/run_video.py $(ARGS)

engine-demo: install
	$(PYTHON) tools/engine_demo.py

test: install
	$(PYTHON) -m pytest -q tests
