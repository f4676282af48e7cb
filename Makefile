# The two commands a newcomer needs. Both install what they use.
.PHONY: setup test lint

setup:
	bash .ci/setup

test: setup
	.venv/bin/ruff check .
	.venv/bin/python -m pytest -ra

lint: setup
	.venv/bin/ruff check .
