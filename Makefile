# The two set-up commands of the README. Both install the pinned stack into .venv/ first (a no-op when
# it is already there).
PYTHON := .venv/bin/python

.PHONY: install demo test

install:
	bash tools/install_stack.sh

demo: install
	$(PYTHON) tools/engine_demo.py

test: install
	$(PYTHON) -m pytest -q tests
