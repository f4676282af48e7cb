# The two commands a newcomer needs. Both install what they use.
.PHONY: setup demo test test-fast lint

setup:
	bash .ci/setup

demo: setup
	.venv/bin/specwhisper-demo

test: setup
	.venv/bin/ruff check .
	.venv/bin/python -m pytest -ra --durations=25

# Everything that needs no real weights (the engine on a toy export, model.py, requests, graphs).
test-fast: setup
	.venv/bin/ruff check .
	.venv/bin/python -m pytest -ra -m "not slow"

lint: setup
	.venv/bin/ruff check .
