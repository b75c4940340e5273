# Set-up and entry points. `make run` and `make test` are the README's two commands.
PY ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: install run test clean

$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PY) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	$(BIN)/python -m pip install -q -e '.[test]'
	touch $(STAMP)

install: $(STAMP)

run: $(STAMP)
	WANDB_MODE=$${WANDB_MODE:-offline} $(BIN)/python -m harness +exp=llava_lazy $(ARGS)

test: $(STAMP)
	WANDB_MODE=offline $(BIN)/python -m pytest tests $(PYTEST_ARGS)

clean:
	rm -rf runs outputs .pytest_cache
