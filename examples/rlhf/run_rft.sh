#!/usr/bin/env bash
# One round of rejection-sampling fine-tuning (RFT) with DPO on SmolLM2-135M-Instruct, on CPU:
#   1. the arithmetic prompts (train / dev / held-out, disjoint)            make_prompts.py
#   2. held-out pass rate of the base model (32 samples per prompt)         megaswift sample + pass_rate.py
#   3. DPO pairs from the train prompts: math-ORM-passing sample = chosen,
#      the prompt's worst sample = rejected                                 megaswift sample --orm_model math
#   4. DPO on the pairs                                                     megaswift rlhf --rlhf_type dpo
#   5. held-out pass rate of the trained model (same seed, same prompts)    megaswift sample + pass_rate.py
# Usage: bash examples/rlhf/run_rft.sh [extra megaswift rlhf flags]   (from the repository root, venv active)
set -euo pipefail
cd "$(dirname "$0")/../.."
OUT=examples/rlhf/output
mkdir -p "$OUT"
python examples/rlhf/make_prompts.py
megaswift sample examples/rlhf/sample_eval.yaml --output_file before.jsonl
python examples/rlhf/pass_rate.py "$OUT/before.jsonl" --json "$OUT/before.json"
megaswift sample examples/rlhf/sample_pairs.yaml
megaswift rlhf examples/rlhf/dpo.yaml "$@"
CKPT=$(ls -d "$OUT"/dpo/checkpoint-* | sort -t- -k2 -n | tail -1)
megaswift sample examples/rlhf/sample_eval.yaml --model "$CKPT" --output_file after.jsonl
python examples/rlhf/pass_rate.py "$OUT/after.jsonl" --json "$OUT/after.json"
python - "$OUT" <<'PY'
import json, sys
before, after = (json.load(open(f'{sys.argv[1]}/{n}.json')) for n in ('before', 'after'))
print(f"held-out math-ORM pass rate: {100 * before['pass_rate']:.1f}% -> {100 * after['pass_rate']:.1f}% "
      f"({before['passed']} -> {after['passed']} of {after['samples']} samples); prompts solved at least once: "
      f"{before['prompts_solved']} -> {after['prompts_solved']} of {after['prompts']}")
PY
