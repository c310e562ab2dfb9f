# Mailbox: `make run` serves the embedded default, `make test` runs every test.
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
CONFIG ?= etc/mailbox.ini

.PHONY: install run test lint bench clean

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)

$(VENV)/.installed: $(BIN)/python setup.cfg pyproject.toml
	$(BIN)/pip install --quiet '.[test]'
	touch $@

# The package is installed (not editable) so the twistd plugin is found as a
# user's install finds it; reinstall it each time so the code is current.
# A venv made before the distribution was renamed (from `mailbox`, another
# project's name on the package index, to `mailboxd`) has the old one too:
# both would own the same files.
install: $(VENV)/.installed
	@if $(BIN)/pip show --quiet mailbox 2>/dev/null; then $(BIN)/pip uninstall --quiet -y mailbox; fi
	$(BIN)/pip install --quiet --no-deps --force-reinstall .
	rm -rf build

run: install
	@mkdir -p mailbox
	@$(BIN)/mailboxctl --config $(CONFIG) tls self-signed
	@echo
	@echo "Mailbox on 127.0.0.1: SMTP 2525 (STARTTLS), SMTPS 2465, submission 2587,"
	@echo "POP3 1110 (STLS), POP3S 1995; mail in mailbox/."
	@echo "Add an account (the user name is the full address):"
	@echo "    $(BIN)/mailboxctl --config $(CONFIG) user add you@example.test"
	@echo "Then point a mail client at 127.0.0.1: POP3 port 1110, SMTP port 2525,"
	@echo "user name you@example.test. Stop with Ctrl-C."
	@echo
	$(BIN)/twistd --nodaemon --pidfile= mailbox --config $(CONFIG)

lint: install
	$(BIN)/ruff check mailboxd tests twisted bench
	$(BIN)/ruff format --check mailboxd tests twisted bench
	$(BIN)/mypy mailboxd

test: install lint
	$(BIN)/python -m pytest -q -p no:cacheprovider

bench: install
	$(BIN)/python bench/smtp_throughput.py
	$(BIN)/python bench/capacity.py
	$(BIN)/python bench/connect_burst.py
	$(BIN)/python bench/cluster.py
	bench/peers.sh

clean:
	rm -rf $(VENV) build *.egg-info
