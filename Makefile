# Set-up and entry points. `make run` and `make test` are the README's two commands.
PY ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
LMMS_EVAL ?= lmms-eval==0.7.3
LMMS_STAMP := $(VENV)/.lmms-installed

.PHONY: install lmms-install run test clean

$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PY) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	$(BIN)/python -m pip install -q -e '.[test]'
	touch $(STAMP)

install: $(STAMP)

# lmms-eval beside the harness, without a CUDA torch, torchvision or its wandb pin: its run-time
# needs come from the `lmms` extra (constraints/lmms.txt keeps torch and bars torchvision), the
# package itself goes in with --no-deps, and pip_check accepts only the documented skips.
$(LMMS_STAMP): $(STAMP) constraints/lmms.txt constraints/lmms-skipped.txt
	$(BIN)/python -m pip install -q -e '.[test,lmms]' -c constraints/lmms.txt
	$(BIN)/python -m pip install -q --no-deps '$(LMMS_EVAL)'
	$(BIN)/python -m harness.lmms.pip_check
	touch $(LMMS_STAMP)

lmms-install: $(LMMS_STAMP)

run: $(STAMP)
	WANDB_MODE=$${WANDB_MODE:-offline} $(BIN)/python -m harness +exp=llava_lazy $(ARGS)

test: $(STAMP) $(LMMS_STAMP)
	WANDB_MODE=offline $(BIN)/python -m pytest tests $(PYTEST_ARGS)

clean:
	rm -rf runs outputs .pytest_cache
