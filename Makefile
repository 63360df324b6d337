# Two commands on a fresh clone: `make demo` and `make test` (each installs what it needs first).
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
# Real CelebA instead of the synthetic one: make demo CELEBA_ROOT=/path/to/celeba
CELEBA_ROOT ?=
DEMO_N ?= 2000
DATA ?= shards/celeba-128
# The cluster image (cluster/aws.yaml, cluster/kuberay-rayjob.yaml name the same): VERSION-rayRAY-pyXY-gpu.
IMAGE ?= ghcr.io/deeprecognition/deeprecognition:0.1.0-ray2.60.0-py311-gpu

.PHONY: install demo lint test bench image clean

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
	# The study's GAN question in small: a DCGAN on Attractive faces, 6x6 mosaics every 50 iterations,
	# standard FID (the TF Inception graph, 200 faces: 0.08 s each on a CPU) and attribute rates judged by
	# the classifier above, then a grid of new faces.
	$(BIN)/deeprec train gan --preset dcgan --data $(DATA) --where Attractive=1 --iterations 150 --batch-size 16 \
		--mosaic-every 50 --checkpoint-every 150 --eval-every 150 --eval-samples 200 --classifier shards/runs/demo-cnn3-attractive \
		--storage shards/runs --name demo-gan-attractive --set model.width=32 --set data.loader_workers=1
	$(BIN)/deeprec generate shards/runs/demo-gan-attractive --out shards/runs/demo-gan-attractive/grid.png
	# The study's depth table as a Ray Tune sweep: 4 trials (1..4 conv blocks), each a Ray Train run.
	rm -rf shards/sweeps/cnn_layers-smoke
	$(BIN)/deeprec tune tune_configs/cnn_layers.yaml --data $(DATA) --storage shards/sweeps --smoke

# ruff's rules and format (pyproject.toml [tool.ruff]); `ruff format src tests` fixes the format.
lint: install
	$(BIN)/ruff check src tests
	$(BIN)/ruff format --check src tests

test: install lint
	$(BIN)/pytest

bench: install
	$(BIN)/deeprec bench pack $(if $(CELEBA_ROOT),$(CELEBA_ROOT),shards/synthetic-celeba)
	$(BIN)/deeprec bench loader $(DATA)

# Needs Docker with BuildKit; push access to IMAGE's registry (a fork: make image IMAGE=...).
image:
	docker build -t $(IMAGE) .
	docker push $(IMAGE)

clean:
	rm -rf $(VENV) shards/synthetic-celeba $(DATA) $(DATA)-stats.png shards/runs shards/sweeps
