# Set-up and entry points. `make run` and `make test` are the README's two commands; `make bench` the
# efficiency benchmark (ARGS="model=llava15_7b_random device=cuda" for LLaVA-1.5-7B shapes on a GPU).
PY ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
LMMS_EVAL ?= lmms-eval==0.7.3
LMMS_STAMP := $(VENV)/.lmms-installed

.PHONY: install lmms-install vlmeval-install run test test-envs bench bench-kv gpu-check gpu-wheels gpu-dryrun gpu-collect clean tiny-model tiny-model-deep sweeps sweeps-readings sweeps-deep tables table-main table-protocol table-efficiency table-calibration fig-layers fig-pareto fig-fidelity table-longform table-paper

# pip quiet and without byte-compiling every file it installs (most of an install's time: tens of
# thousands of files, most never imported; the venv's pip is upgraded first, as the one ensurepip
# brings installs slower). WARM then imports the harness's entry points once with bytecode writing on,
# so exactly the modules they use are compiled, whatever PYTHONDONTWRITEBYTECODE says at run time.
# Editable builds of this tree take .install.lock: `make test` builds the VLMEvalKit environment
# beside this one (tools/vlmeval_env.py).
PIP_INSTALL = -m pip install -q --disable-pip-version-check --no-compile
EDITABLE_LOCK := $(if $(shell command -v flock),flock .install.lock)
WARM = PYTHONDONTWRITEBYTECODE= $(BIN)/python -c
$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PY) -m venv $(VENV)
	$(BIN)/python $(PIP_INSTALL) --upgrade pip
	$(EDITABLE_LOCK) $(BIN)/python $(PIP_INSTALL) -e '.[test]'
	$(WARM) 'import harness.__main__, harness.bench.cli, harness.report.cli, pytest'
	touch $(STAMP)

install: $(STAMP)

# lmms-eval beside the harness, without a CUDA torch, torchvision or its wandb pin: its run-time
# needs come from the `lmms` extra (constraints/lmms.txt keeps torch and bars torchvision), the
# package itself goes in with --no-deps, and pip_check accepts only the documented skips.
$(LMMS_STAMP): $(STAMP) constraints/lmms.txt constraints/lmms-skipped.txt
	$(EDITABLE_LOCK) $(BIN)/python $(PIP_INSTALL) -e '.[test,lmms]' -c constraints/lmms.txt
	$(BIN)/python $(PIP_INSTALL) --no-deps '$(LMMS_EVAL)'
	$(BIN)/python -m harness.lmms.pip_check
	$(WARM) 'import lmms_eval.evaluator, harness.lmms.model, harness.lmms.backend'
	@command -v java >/dev/null || echo "note: no java on PATH: the caption benchmarks (coco2017_cap_val, nocaps_val, flickr30k_test) are refused until one is installed (apt-get install default-jre-headless)"
	touch $(LMMS_STAMP)

lmms-install: $(LMMS_STAMP)

# VLMEvalKit in an environment of its own (.venv-vlmeval: the CUDA torch 2.14.1 and its torchvision, which
# VLMEvalKit imports and no CPU build of which is reachable; both run on a CPU), tools/vlmeval_env.py.
# `python -m harness task=vlmeval ...` re-executes itself there. About 5-6 GiB, a few minutes from local wheels.
VLM_VENV ?= .venv-vlmeval
VLM_STAMP := $(VLM_VENV)/.installed
$(VLM_STAMP): pyproject.toml constraints/vlmeval.txt constraints/vlmeval-requirements.txt tools/vlmeval_env.py
	$(PY) tools/vlmeval_env.py --venv $(VLM_VENV)

vlmeval-install: $(VLM_STAMP)

run: $(STAMP)
	WANDB_MODE=$${WANDB_MODE:-offline} $(BIN)/python -m harness +exp=llava_lazy $(ARGS)

bench: $(STAMP)
	WANDB_MODE=$${WANDB_MODE:-offline} $(BIN)/python -m harness.bench $(ARGS)

# The KV-bound preset (conf/preset/kv.yaml): dense vs Lazy Attention (every reading) and FastV where a
# decode step reads ~5x more KV than weights, both KV caches, eager and compiled decode, dense's KV budget, and the
# explicit-attention control; about 27 min on 2 cores.
bench-kv: $(STAMP)
	WANDB_MODE=$${WANDB_MODE:-offline} $(BIN)/python -m harness.bench +preset=kv out_dir=results/bench/llava_kv_random $(ARGS)

# Validate every method on CUDA and measure throughput on LLaVA-1.5-7B shapes (docs/gpu.md);
# results/gpu/<device>/, resumable. Without CUDA: the CPU checks only, one line, exit 0.
# ARGS="--quick" for a smaller bench grid, "--skip-bench" for correctness only.
gpu-check: $(STAMP)
	WANDB_MODE=$${WANDB_MODE:-disabled} $(BIN)/python -m harness.gpu_check $(ARGS)

# The one GPU command's inputs and its rehearsal (docs/gpu.md). gpu-wheels: the wheels the GPU image
# lacks (hydra-core, omegaconf, antlr4 built from its sdist, the tested transformers) into the ignored
# .whl/, with .whl/GIT_SHA; fails when .whl/ plus the tracked tree is over 60 MiB. Needs PyPI only.
gpu-wheels:
	$(PY) tools/gpu_wheels.py

# gpu-dryrun: the exact device command on this CPU, in a fresh venv holding only the GPU image's Python
# packages (the CPU torch wheel, transformers at the image's 5.17.0, numpy, pillow, safetensors, tokenizers,
# huggingface_hub, accelerate and what they need) plus .whl/; a short deadline; then the same command
# again resuming from the first call's folder. Both must write their summary and exit 0.
DRYRUN ?= .gpu-dryrun
DRYRUN_DEADLINE ?= 240
DRYRUN_PKGS = torch==2.13.0 transformers==5.17.0 numpy pillow safetensors==0.8.0 tokenizers==0.23.2 \
	huggingface_hub==1.33.0 accelerate==1.15.0 jinja2 pyyaml regex tqdm typer packaging filelock
$(DRYRUN)/.installed:
	rm -rf $(DRYRUN)/venv
	$(PY) -m venv $(DRYRUN)/venv
	$(DRYRUN)/venv/bin/python -m pip install -q $(DRYRUN_PKGS)
	touch $@

gpu-dryrun: $(DRYRUN)/.installed
	test -f .whl/GIT_SHA || $(MAKE) gpu-wheels
	git rev-parse HEAD > .whl/GIT_SHA  # the commit the device call will record (its copy has no .git)
	rm -rf $(DRYRUN)/call1 $(DRYRUN)/call2
	$(DRYRUN)/venv/bin/python tools/gpu_call.py --out $(DRYRUN)/call1 --deadline $(DRYRUN_DEADLINE)
	$(DRYRUN)/venv/bin/python tools/gpu_call.py --check $(DRYRUN)/call1
	$(DRYRUN)/venv/bin/python tools/gpu_call.py --out $(DRYRUN)/call2 --deadline 60 --resume $(DRYRUN)/call1
	$(DRYRUN)/venv/bin/python tools/gpu_call.py --check $(DRYRUN)/call2

# The files a device call returned (FROM=the folder they came back in) into results/gpu/<device>/.
gpu-collect:
	$(PY) tools/gpu_call.py --collect $(FROM) results/gpu

# The environments first, two at a time: VLMEvalKit's (independent of .venv) beside .venv and its
# lmms-eval layer, each one's output together.
test-envs:
	$(MAKE) -j2 --output-sync=target --no-print-directory $(STAMP) $(LMMS_STAMP) $(VLM_STAMP)

# The suite on one pytest-xdist worker a core (at most 8; TEST_WORKERS=0 runs it in one process),
# each test handed out as a worker frees up ("worksteal": the slow ones do not queue behind each other).
TEST_WORKERS ?= auto
test: test-envs
	WANDB_MODE=offline $(BIN)/python -m pytest tests -n $(TEST_WORKERS) --maxprocesses 8 --dist worksteal $(PYTEST_ARGS)
	WANDB_MODE=offline $(VLM_VENV)/bin/python -m pytest tests/vlmevalkit $(PYTEST_ARGS)

clean:
	rm -rf runs outputs .pytest_cache

# The shipped tiny LLaVA, retrained from its seed (six stages, about 65 min with one thread on a shared
# 2-core machine); writes harness/assets/llava_tiny. tiny-model-deep: the 24-layer variant (about 80 min).
# Stage F alone, from the shipped model (what the shipped F is; the same weights as the full recipe):
#   make tiny-model TRAIN_ARGS="--first-stage F --resume-from harness/assets/llava_tiny --out /tmp/llava_tiny"
tiny-model: $(STAMP)
	$(BIN)/python -m harness.tools.train_tiny --out harness/assets/llava_tiny $(TRAIN_ARGS)
tiny-model-deep: $(STAMP)
	$(BIN)/python -m harness.tools.train_tiny --arch llava_tiny_deep --out harness/assets/llava_tiny_deep $(TRAIN_ARGS)

# Paper sweeps on the tiny model; each point lands in $(RESULTS)/<sweep>/<overrides>/ and finished
# points are skipped, so an interrupted `make sweeps` resumes. SWEEP_ARGS passes more overrides
# (e.g. SWEEP_ARGS="hydra/launcher=local threads=1" for two parallel points).
RESULTS ?= results/tiny
SWEEP = WANDB_MODE=$${WANDB_MODE:-offline} $(BIN)/python -m harness -m
sweeps: $(STAMP)
	$(SWEEP) +exp=sweep_dense sweep_root=$(RESULTS)/dense $(SWEEP_ARGS)
	$(SWEEP) +exp=sweep_lazy sweep_root=$(RESULTS)/lazy $(SWEEP_ARGS)
	$(SWEEP) +exp=sweep_pruning method=fastv method.ratio=0.5,0.75 sweep_root=$(RESULTS)/fastv $(SWEEP_ARGS)
	$(SWEEP) +exp=sweep_pruning method=sparsevlm method.budget=192,128,64 sweep_root=$(RESULTS)/sparsevlm $(SWEEP_ARGS)
	$(SWEEP) +exp=sweep_pruning method=lazy_fastv sweep_root=$(RESULTS)/lazy_fastv $(SWEEP_ARGS)
	$(SWEEP) +exp=sweep_reencode method=dense,lazy,fastv,sparsevlm,lazy_fastv sweep_root=$(RESULTS)/reencode $(SWEEP_ARGS)
	$(SWEEP) +exp=sweep_long method=dense,lazy,fastv,sparsevlm,lazy_fastv sweep_root=$(RESULTS)/long $(SWEEP_ARGS)
	$(MAKE) sweeps-readings RESULTS=$(RESULTS)

# The other readings of Lazy Attention, anchor-based calibration, VTW and their compositions
# (docs/methods.md), on the same 400 test samples; part of `make sweeps`. VTW's long point keeps the
# earlier model's auto k=8 (the retrained one's main sweep chose 9): on long-answer prompts the first-token KL rule picks k=1.
sweeps-readings: $(STAMP)
	$(SWEEP) +exp=sweep_lazy method.share=qkv method.ratio=0.25,0.5,0.7 sweep_root=$(RESULTS)/lazy_qkv $(SWEEP_ARGS)
	$(SWEEP) +exp=sweep_lazy method.scope=visual method.ratio=0.5,0.8 sweep_root=$(RESULTS)/lazy_visual $(SWEEP_ARGS)
	$(SWEEP) +exp=sweep_lazy method.scope=visual_scores method.ratio=0.5,0.8 sweep_root=$(RESULTS)/lazy_visual_scores $(SWEEP_ARGS)
	$(SWEEP) +exp=sweep_lazy calibration.select=anchor method.layers=auto sweep_root=$(RESULTS)/lazy_anchor $(SWEEP_ARGS)
	$(SWEEP) +exp=sweep_lazy calibration.select=anchor calibration.max_per_anchor=2 method.layers=auto method.ratio=0.5,0.6,0.7 sweep_root=$(RESULTS)/lazy_anchor_cap $(SWEEP_ARGS)
	$(SWEEP) +exp=sweep_pruning method=vtw method.k=auto,4,6,10 sweep_root=$(RESULTS)/vtw $(SWEEP_ARGS)
	$(SWEEP) +exp=sweep_pruning method=lazy_vtw method.lazy.share=qk,qkv sweep_root=$(RESULTS)/lazy_vtw $(SWEEP_ARGS)
	$(SWEEP) +exp=sweep_pruning method=lazy_fastv method.lazy.share=qkv sweep_root=$(RESULTS)/lazy_fastv_qkv $(SWEEP_ARGS)
	$(SWEEP) +exp=sweep_pruning method=prumerge_plus method.plus=true,false sweep_root=$(RESULTS)/prumerge $(SWEEP_ARGS)
	$(SWEEP) +exp=sweep_pruning method=prumerge_plus method.plus=true,false method.neighbours_rule=capped sweep_root=$(RESULTS)/prumerge $(SWEEP_ARGS)
	$(SWEEP) +exp=sweep_pruning method=lazy_prumerge_plus method.lazy.ratio=0.25,0.5 sweep_root=$(RESULTS)/lazy_prumerge $(SWEEP_ARGS)
	$(SWEEP) +exp=sweep_reencode method=vtw sweep_root=$(RESULTS)/reencode $(SWEEP_ARGS)
	$(SWEEP) +exp=sweep_reencode method=lazy method.share=qkv sweep_root=$(RESULTS)/reencode $(SWEEP_ARGS)
	$(SWEEP) +exp=sweep_long method=vtw method.k=8 sweep_root=$(RESULTS)/long $(SWEEP_ARGS)
	$(SWEEP) +exp=sweep_long method=lazy method.share=qkv sweep_root=$(RESULTS)/long $(SWEEP_ARGS)

# The deeper shipped model (24 layers), a smaller grid: how depth changes the layer-similarity
# profile and Lazy Attention's cost. `make tables RESULTS=results/tiny_deep` renders it into itself.
DEEP = model=llava_tiny_deep $(SWEEP_ARGS)
sweeps-deep: $(STAMP)
	$(SWEEP) +exp=sweep_dense sweep_root=results/tiny_deep/dense $(DEEP)
	$(SWEEP) +exp=sweep_lazy method.ratio=0.25,0.5,0.7 sweep_root=results/tiny_deep/lazy $(DEEP)
	$(SWEEP) +exp=sweep_pruning method=fastv sweep_root=results/tiny_deep/fastv $(DEEP)
	$(SWEEP) +exp=sweep_pruning method=sparsevlm method.budget=128 sweep_root=results/tiny_deep/sparsevlm $(DEEP)
	$(SWEEP) +exp=sweep_pruning method=lazy_fastv sweep_root=results/tiny_deep/lazy_fastv $(DEEP)
	$(SWEEP) +exp=sweep_lazy calibration.select=anchor method.layers=auto method.ratio=0.25,0.5,0.7 sweep_root=results/tiny_deep/lazy_anchor $(DEEP)
	$(SWEEP) +exp=sweep_lazy method.share=qkv method.layers=null method.ratio=0.25,0.5 sweep_root=results/tiny_deep/lazy_qkv $(DEEP)
	$(SWEEP) +exp=sweep_pruning method=vtw sweep_root=results/tiny_deep/vtw $(DEEP)
	$(SWEEP) +exp=sweep_lazy method.scope=visual method.layers=null method.ratio=0.5 sweep_root=results/tiny_deep/lazy_visual $(DEEP)
	$(SWEEP) +exp=sweep_pruning method=prumerge_plus sweep_root=results/tiny_deep/prumerge $(DEEP)
	$(SWEEP) +exp=sweep_pruning method=prumerge_plus method.neighbours_rule=capped sweep_root=results/tiny_deep/prumerge $(DEEP)
	$(SWEEP) +exp=sweep_reencode method=dense,lazy,fastv,sparsevlm,lazy_fastv sweep_root=results/tiny_deep/reencode $(DEEP)
	$(SWEEP) +exp=sweep_long method=dense,lazy,fastv,sparsevlm,lazy_fastv sweep_root=results/tiny_deep/long $(DEEP)

# Tables and figures render from $(RESULTS) only. RUN=1 first runs whatever sweep points are missing.
ifeq ($(RUN),1)
REPORT_DEPS := sweeps
endif
# Rendered files go next to their inputs (OUT=$(RESULTS)) unless RESULTS is the committed tree,
# whose tables and figures live in results/: `make tables RESULTS=DIR` never overwrites them.
OUT ?= $(if $(filter results/tiny,$(RESULTS)),results,$(RESULTS))
REPORT = $(BIN)/python -m harness.report
table-main: $(STAMP) $(REPORT_DEPS)
	$(REPORT) main --results $(RESULTS) --out $(OUT)
table-protocol: $(STAMP) $(REPORT_DEPS)
	$(REPORT) protocol --results $(RESULTS) --out $(OUT)
fig-fidelity: $(STAMP) $(REPORT_DEPS)
	$(REPORT) fidelity --results $(RESULTS) --out $(OUT)
table-efficiency: $(STAMP) $(REPORT_DEPS)
	$(REPORT) efficiency --results $(RESULTS) --out $(OUT)
table-calibration: $(STAMP) $(REPORT_DEPS)
	$(REPORT) calibration --results $(RESULTS) --out $(OUT)
fig-layers: $(STAMP) $(REPORT_DEPS)
	$(REPORT) layers --results $(RESULTS) --out $(OUT)
fig-pareto: $(STAMP) $(REPORT_DEPS)
	$(REPORT) pareto --results $(RESULTS) --out $(OUT)
table-longform: $(STAMP) $(REPORT_DEPS)
	$(REPORT) longform --results $(RESULTS) --out $(OUT)
# The paper's table (benchmarks as columns, each by its protocol's metric; methods as rows, with KV cut
# and throughput) from task=paper results under $(PAPER_RESULTS), e.g. one folder per method:
#   python -m harness task=paper method=lazy out_dir=results/paper/lazy
# Skipped, with a note, where that folder does not exist (the tiny sweeps have no task=paper results).
PAPER_RESULTS ?= results/paper
PAPER_OUT ?= $(if $(filter results/paper,$(PAPER_RESULTS)),results,$(PAPER_RESULTS))
table-paper: $(STAMP)
	@if [ -d $(PAPER_RESULTS) ]; then $(REPORT) paper --results $(PAPER_RESULTS) --out $(PAPER_OUT); \
	else echo "note: no $(PAPER_RESULTS): no task=paper results, the paper table is skipped (make table-paper PAPER_RESULTS=DIR)"; fi
tables: table-main table-protocol table-efficiency table-calibration fig-layers fig-pareto fig-fidelity table-longform table-paper
