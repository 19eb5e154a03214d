"""Benchmarks, measured and never asserted by tests: `python -m bench <what>` (bench/__main__.py); the
full-size SD3.5-M measurements are bench/sd35m.py, each run in its own process."""
