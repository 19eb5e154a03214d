# Two commands do all set-up: `make demo` (the main job: pipeline.py) and `make test` (the test suite).
# `make reproduce` retrains the published Stage 1 products too, and every row of the README's table.
PY := .venv/bin/python

.venv/installed: requirements.txt
	python3 -m venv .venv
	.venv/bin/pip install -q -r requirements.txt
	touch .venv/installed

demo: .venv/installed
	$(PY) pipeline.py

reproduce: .venv/installed
	$(PY) pipeline.py --from-scratch --full --mar-sweep

sample: .venv/installed
	$(PY) -m lab sample --model miniature/base --out results/base

test: .venv/installed
	$(PY) -m pytest -q tests

.PHONY: demo reproduce sample test
