# Two commands do all set-up: `make demo` (the main job: pipeline.py) and `make test` (the test suite).
PY := .venv/bin/python

.venv/installed: requirements.txt
	python3 -m venv .venv
	.venv/bin/pip install -q -r requirements.txt
	touch .venv/installed

demo: .venv/installed
	$(PY) pipeline.py

sample: .venv/installed
	$(PY) -m lab sample --model miniature/base --out results/base

test: .venv/installed
	$(PY) -m pytest -q tests

.PHONY: demo sample test
