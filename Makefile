# The two commands a newcomer needs. Both install what they use.
.PHONY: setup demo test lint

setup:
	bash .ci/setup

demo: setup
	.venv/bin/specwhisper-demo

test: setup
	.venv/bin/ruff check .
	.venv/bin/python -m pytest -ra

lint: setup
	.venv/bin/ruff check .
