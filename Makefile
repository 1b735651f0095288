# The commands of the README. Each creates .venv when it is missing.
VENV ?= .venv
PYTHON ?= python3
BIN := $(VENV)/bin

.PHONY: demo test bench clean

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip

# torch first and exactly 2.13.0: that is the local CPU wheel; other versions pull CUDA.
$(VENV)/.installed: pyproject.toml | $(BIN)/python
	$(BIN)/pip install -q torch==2.13.0
	$(BIN)/pip install -q -e ".[test]"
	touch $@

demo: $(VENV)/.installed
	$(BIN)/rlhf run

test: $(VENV)/.installed
	$(BIN)/python -m pytest

# our trainers and rollout against TRL's and bare generate: one JSON line per benchmark (benchmarks/README.md)
bench: $(VENV)/.installed
	$(BIN)/python -m benchmarks.run

clean:
	rm -rf models checkpoints data/*/ mlflow/mlflow.db mlflow/artifacts .prefect dvc-remote dvc.lock
