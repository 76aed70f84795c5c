# vlm-serve. `make help` lists the targets.
PYTHON ?= python3
PIP ?= $(PYTHON) -m pip
TINY_DIR ?= .models/tiny
MODELS ?=
PYTEST_ARGS ?=
INSTALLED := .cache/installed.stamp
TRITON := .triton/.installed-0.7.0-py$(shell $(PYTHON) -c 'import sys; print("%d.%d" % sys.version_info[:2])')
VLLM_ENV := .triton/vllm/.ready
# the engine is this checkout's editable install: a moved checkout, or another one installed into
# the same Python since, installs again (else imports from outside the repository, the notebook's
# kernel, take the other folder's code or none)
INSTALLED_FROM := $(shell cd / && $(PYTHON) -c 'import importlib.util as u, pathlib as p; s = u.find_spec("vlm_engine"); print(p.Path(s.origin).resolve().parents[1] if s and s.origin else "")' 2>/dev/null)
ifneq ($(INSTALLED_FROM),$(realpath $(CURDIR)))
$(shell rm -f $(INSTALLED))
endif

.PHONY: help install vllm-env tiny-models models demo up down status logs triton api loadtest loadtest-ui soak bench gpu-check test contract-fuzz test-compose test-swarm test-dynamo dynamo-up swarm-up swarm-down lint

help:  ## list the targets
	@grep -E '^[a-z-]+:.*##' $(MAKEFILE_LIST) | awk -F':.*## ' '{printf "  make %-13s %s\n", $$1, $$2}'

$(INSTALLED): pyproject.toml
	@mkdir -p .cache
	$(PIP) install --quiet torch==2.13.0
	$(PIP) install --quiet -e ".[test,dynamo]"
	$(PIP) install --quiet --no-deps ai-dynamo==1.6.1
	$(PYTHON) -m vlm_engine.kv.cpu_attention
	@touch $@

$(TRITON): scripts/install_triton.sh
	./scripts/install_triton.sh

install: $(INSTALLED) $(TRITON) $(if $(VLLM),$(VLLM_ENV))  ## install the engine, test tools and tritonserver (nvidia-pytriton wheel); VLLM=1: vLLM's environment too

# `make notebook`: JupyterLab (pyproject's notebook extra, left out of `make install`) on NOTEBOOK.
# Its root is the repository (given a file, Jupyter's default is the file's folder); it takes
# NOTEBOOK_PORT or fails (no other port); as root Jupyter needs --allow-root.
NOTEBOOK ?= notebooks/triton_inference.ipynb
NOTEBOOK_HOST ?= 127.0.0.1
NOTEBOOK_PORT ?= 8888
NOTEBOOK_ARGS ?=
NOTEBOOK_INSTALLED := .cache/notebook.stamp
NOTEBOOK_ROOT = $(if $(filter 0,$(shell id -u)),--allow-root)

$(NOTEBOOK_INSTALLED): pyproject.toml $(INSTALLED)
	$(PIP) install --quiet -e ".[notebook]"
	@touch $@

.PHONY: notebook
notebook: $(NOTEBOOK_INSTALLED)  ## JupyterLab (installed once) on notebooks/triton_inference.ipynb, http://127.0.0.1:8888 (NOTEBOOK_PORT, NOTEBOOK_ARGS="--no-browser"); after make demo
	@$(PYTHON) -c 'import os, urllib.request as u; u.build_opener(u.ProxyHandler({})).open(os.environ.get("VLM_GATEWAY", "http://localhost").rstrip("/") + "/health/ready", timeout=5)' 2>/dev/null \
	  || echo "make notebook: no stack is ready at $${VLM_GATEWAY:-http://localhost} (VLM_GATEWAY): run make demo first (or make up); the notebook opens anyway"
	$(PYTHON) -m jupyterlab $(NOTEBOOK) --ip=$(NOTEBOOK_HOST) --port=$(NOTEBOOK_PORT) --ServerApp.root_dir=. --ServerApp.port_retries=0 $(NOTEBOOK_ROOT) $(NOTEBOOK_ARGS)

$(VLLM_ENV): vlm_triton/vllm_env.py $(INSTALLED)
	$(PYTHON) -m vlm_triton.vllm_env
	@touch $@

vllm-env: $(VLLM_ENV)  ## vLLM's environment from PyPI (~2 min, 3.5 GB): its venv and the Triton stub's (vlm_triton/vllm_env.py)

tiny-models: $(INSTALLED)  ## build tiny random-weight checkpoints of the four models into .models/tiny
	$(PYTHON) -m vlm_engine.tiny.build --out $(TINY_DIR)

models: $(INSTALLED)  ## download real weights into the HF cache (MODELS="llava qwen3-vl"; default all four)
	$(PYTHON) -m vlm_engine.download $(MODELS)

demo: install tiny-models  ## the whole stack with the tiny checkpoints (no GPU, no downloads), in the background
	HF_HUB_OFFLINE=1 VLM_MODELS_DIR=$(abspath $(TINY_DIR)) PYTHON=$(PYTHON) ./triton_start.sh up

up: install  ## the whole stack with real weights: Compose (GPU or CPU file) or local processes
	PYTHON=$(PYTHON) ./triton_start.sh up

down:  ## stop the stack
	PYTHON=$(PYTHON) ./triton_start.sh down

dynamo-up: install tiny-models  ## the demo stack plus NVIDIA Dynamo: its KServe gRPC frontend on :8787, a worker per Triton
	HF_HUB_OFFLINE=1 DYNAMO=1 VLM_STACK_MODE=local VLM_MODELS_DIR=$(abspath $(TINY_DIR)) PYTHON=$(PYTHON) ./triton_start.sh up

swarm-up: tiny-models  ## the stack on Docker Swarm, several hosts (deploy/swarm; TRITON_REPLICAS, SWARM_GPU=1)
	./scripts/swarm.sh up

swarm-down:  ## remove the Swarm stack
	./scripts/swarm.sh down

status:  ## each service and model, ready or not
	PYTHON=$(PYTHON) ./triton_start.sh status

logs:  ## the last lines of every service's log, the service's first; FOLLOW=1: follow them all (Ctrl-C stops)
	PYTHON=$(PYTHON) ./triton_start.sh logs $(if $(filter 1 yes true,$(FOLLOW)),--follow)

triton: install  ## only tritonserver, in the foreground (real weights; VLM_MODELS_DIR for others)
	$(PYTHON) -m vlm_triton.launch

api: install  ## run the FastAPI service on :8080 (Triton backend; INFERENCE_BACKEND=local for in-process)
	$(PYTHON) -m uvicorn --factory fastapi_app.main:create_app --host 127.0.0.1 --port 8080 --no-access-log --log-config fastapi_app/logging.json --timeout-keep-alive 75

loadtest: install  ## locust through nginx (HOST, USERS, SPAWN_RATE, DURATION, PROFILE, MODELS, MAX_TOKENS, WEIGHTS, SLO_*)
	$(PYTHON) -m loadtests.run

loadtest-ui: install  ## locust's web UI for the same load tests on http://127.0.0.1:8089
	$(PYTHON) -m loadtests.run --ui

soak: install tiny-models  ## load on a stack of its own for DURATION (10m), faults injected (SOAK_ARGS="--profile infer --users 16 --no-faults": the KServe soak)
	HF_HUB_OFFLINE=1 $(PYTHON) -m loadtests.soak $(SOAK_ARGS)

bench: install tiny-models  ## benchmark (batching, gateway, streaming, cold start, vLLM beside us) -> benchmarks/results/ (BENCH_ARGS="--only peer")
	HF_HUB_OFFLINE=1 $(PYTHON) -m benchmarks.bench $(BENCH_ARGS)

gpu-check: install tiny-models  ## the engine on a GPU with real-sized random-weight Qwen3-VL-8B and LLaVA-1.5-7B (CPU: shrunken, seconds)
	PYTHON=$(PYTHON) ./scripts/gpu_check.sh $(GPU_CHECK_ARGS)

contract-fuzz: install tiny-models  ## the API contract (schemathesis) with new seeds, more examples: looks for what make test's fixed seed misses (SEEDS=3, CONTRACT_EXAMPLES=300)
	for run in $$(seq 1 $(or $(SEEDS),3)); do \
	  CONTRACT_SEED=random CONTRACT_EXAMPLES=$(or $(CONTRACT_EXAMPLES),300) HF_HUB_OFFLINE=1 VLM_MODELS_DIR=$(TINY_DIR) \
	    $(PYTHON) -m pytest -p no:cacheprovider tests/contract || exit 1; \
	done

test-compose: install  ## build the Docker images offline and test the CPU Compose stack end to end (root; own dockerd)
	PYTHON=$(PYTHON) ./scripts/compose_test.sh

test-swarm: install  ## a 3-node Docker Swarm in network namespaces: replicas, scaling, rolling update, a worker cut off (root; after test-compose)
	PYTHON=$(PYTHON) ./scripts/swarm_test.sh

test-dynamo: install tiny-models  ## Dynamo across two hosts (network namespaces): etcd discovery, a worker on each (root)
	PYTHON=$(PYTHON) ./scripts/dynamo_test.sh

lint: $(INSTALLED)  ## ruff
	$(PYTHON) -m ruff check .

test: install tiny-models vllm-env  ## every test: lint, unit, Triton, the service, the local stack end to end
	$(PYTHON) -m ruff check .
	HF_HUB_OFFLINE=1 VLM_MODELS_DIR=$(TINY_DIR) $(PYTHON) -m pytest $(PYTEST_ARGS)
