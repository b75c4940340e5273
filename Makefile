# Set-up and entry points. `make run` and `make test` are the README's two commands; `make bench` the
# efficiency benchmark (ARGS="model=llava15_7b_random device=cuda" for LLaVA-1.5-7B shapes on a GPU).
PY ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: install run test bench clean

$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PY) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	$(BIN)/python -m pip install -q -e '.[test]'
	touch $(STAMP)

install: $(STAMP)

run: $(STAMP)
	WANDB_MODE=$${WANDB_MODE:-offline} $(BIN)/python -m harness +exp=llava_lazy $(ARGS)

bench: $(STAMP)
	WANDB_MODE=$${WANDB_MODE:-offline} $(BIN)/python -m harness.bench $(ARGS)

test: $(STAMP)
	WANDB_MODE=offline $(BIN)/python -m pytest tests $(PYTEST_ARGS)

clean:
	rm -rf runs outputs .pytest_cache
