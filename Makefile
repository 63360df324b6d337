# Two commands on a fresh clone: `make demo` and `make test` (each installs what it needs first).
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
# Real CelebA instead of the synthetic one: make demo CELEBA_ROOT=/path/to/celeba
CELEBA_ROOT ?=
DEMO_N ?= 2000
DATA ?= shards/celeba-128

.PHONY: install demo test bench clean

install: $(BIN)/.installed

$(BIN)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --disable-pip-version-check -e '.[test]'
	$(BIN)/pip check
	touch $@

demo: install
ifeq ($(CELEBA_ROOT),)
	$(BIN)/deeprec synth shards/synthetic-celeba --n $(DEMO_N) --seed 0
	$(BIN)/deeprec pack shards/synthetic-celeba $(DATA) --samples-per-shard 500
else
	$(BIN)/deeprec pack $(CELEBA_ROOT) $(DATA) --allow-missing
endif
	$(BIN)/deeprec verify $(DATA)
	$(BIN)/deeprec stats $(DATA) --plot $(DATA)-stats.png
	$(BIN)/deeprec train classifier --preset paper-cnn --data $(DATA) --num-workers 2 --epochs 3 \
		--storage shards/runs --name demo-cnn3-attractive --set data.loader_workers=1
	$(BIN)/deeprec evaluate shards/runs/demo-cnn3-attractive --data $(DATA) --split test

test: install
	$(BIN)/pytest

bench: install
	$(BIN)/deeprec bench pack $(if $(CELEBA_ROOT),$(CELEBA_ROOT),shards/synthetic-celeba)
	$(BIN)/deeprec bench loader $(DATA)

clean:
	rm -rf $(VENV) shards/synthetic-celeba $(DATA) $(DATA)-stats.png shards/runs
