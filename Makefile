# Caducée — the two commands: `make run` and `make test`.
PYTHON ?= python3
VENV   ?= .venv
STATE  ?= var
BIN     = $(VENV)/bin

.PHONY: run test test-tools clean help

help:
	@echo "make run    start the server on the embedded default (SQLite, dev PKI, demo directory in ./$(STATE))"
	@echo "make test   install what the tests need and run them all"

$(BIN)/caducee: pyproject.toml
	@$(PYTHON) -m venv --help >/dev/null 2>&1 || sh deploy/install-debian-packages python
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	$(BIN)/pip install --quiet -e '.[test]'
	@touch $@

run: $(BIN)/caducee
	@test -f $(STATE)/demo/demo.json || $(BIN)/caducee init --state $(STATE) --demo
	exec $(BIN)/caducee serve --state $(STATE)

test-tools:
	@sh deploy/install-debian-packages test

test: test-tools $(BIN)/caducee
	$(BIN)/pytest

clean:
	rm -rf $(VENV) build *.egg-info .pytest_cache
