#!/usr/bin/env bash
# Held-out math-ORM pass rate of a model: 40 held-out arithmetic prompts x 32 samples at temperature 0.7, seed 42
# (the same measurement as examples/rlhf). Usage: bash examples/grpo/eval.sh MODEL NAME
set -euo pipefail
cd "$(dirname "$0")/../.."
megaswift sample examples/grpo/sample_eval.yaml --model "$1" --output_file "$2.jsonl"
python examples/rlhf/pass_rate.py "examples/grpo/output/$2.jsonl" --json "examples/grpo/output/$2.json"
