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
PYTEST_ARGS ?=

.PHONY: install demo serve test bench compare clean-demo

install: $(INSTALLED)

$(INSTALLED): pyproject.toml constraints.txt
	@test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet $(TORCH_PACKAGES)
	$(BIN)/python -m pip install --quiet -e '.[dev]' -c constraints.txt
	@touch $(INSTALLED)

demo: $(INSTALLED)
	$(BIN)/mit fit --config configs/demo.yaml

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
	rm -rf data/demo runs/demo
