#!/usr/bin/env bash
# GRPO on SmolLM2-135M-Instruct with the math ORM, on CPU, in both modes (about an hour on 2 cores):
#   1. the arithmetic prompts of examples/rlhf (train / dev / held-out, disjoint)   make_prompts.py
#   2. held-out pass rate of the base model (40 prompts x 32 samples)                eval.sh
#   3. GRPO, colocate mode (the rollout engine inside the trainer)                    grpo.yaml
#   4. GRPO, server mode (a `megaswift rollout` server, weights pushed every step)    grpo.yaml --vllm_mode server
#   5. held-out pass rate after each run, and the reward curves                       eval.sh, plot.py
# Usage: bash examples/grpo/run_grpo.sh [extra megaswift rlhf flags]   (from the repository root, venv active)
set -euo pipefail
cd "$(dirname "$0")/../.."
OUT=examples/grpo/output
mkdir -p "$OUT"
python examples/rlhf/make_prompts.py
bash examples/grpo/eval.sh HuggingFaceTB/SmolLM2-135M-Instruct before
megaswift rlhf examples/grpo/grpo.yaml "$@"
bash examples/grpo/eval.sh "$OUT/colocate/checkpoint-24" after_colocate
# server mode: the server prints its address once it listens
megaswift rollout --model HuggingFaceTB/SmolLM2-135M-Instruct --torch_dtype float32 --port 0 > "$OUT/server.out" &
SERVER=$!
trap 'kill $SERVER 2>/dev/null || true' EXIT
until grep -q ' at http://' "$OUT/server.out"; do sleep 1; done
URL=$(grep -o 'http://[0-9.:]*' "$OUT/server.out" | head -1)
megaswift rlhf examples/grpo/grpo.yaml --vllm_mode server --rollout_url "$URL" --output_dir "$OUT/server" "$@"
kill $SERVER
bash examples/grpo/eval.sh "$OUT/server/checkpoint-24" after_server
python examples/grpo/plot.py "$OUT" examples/grpo/reward_curve.png
python - "$OUT" <<'PY'
import json, sys
runs = {n: json.load(open(f'{sys.argv[1]}/{n}.json')) for n in ('before', 'after_colocate', 'after_server')}
for name, r in runs.items():
    print(f"{name:>15}: held-out math-ORM pass rate {100 * r['pass_rate']:.1f}% ({r['passed']} of {r['samples']} "
          f"samples); prompts solved at least once: {r['prompts_solved']} of {r['prompts']}")
PY
