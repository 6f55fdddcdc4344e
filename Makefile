# Quick start:  make demo   (set up, then run the main job on built-in data)
#               make test   (set up, then run the test suite and timm's model tests for our models)
.PHONY: setup demo test bench

setup:
	bash scripts/setup.sh

demo: setup
	.venv/bin/mlla train --preset demo --output runs/demo --resume auto

test: setup
	.venv/bin/python -m pytest -n 2 --durations=15 -q
	.venv/bin/python scripts/timm_model_tests.py -n 2

bench: setup
	.venv/bin/python benchmarks/inference.py
