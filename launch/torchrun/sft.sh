#!/usr/bin/env bash
# Supervised fine-tuning on several nodes with plain torchrun (no Slurm). Run this on every node with the same
# settings except NODE_RANK:
#   node 0:  NNODES=2 NODE_RANK=0 MASTER_ADDR=10.0.0.1 launch/torchrun/sft.sh [more megaswift flags]
#   node 1:  NNODES=2 NODE_RANK=1 MASTER_ADDR=10.0.0.1 launch/torchrun/sft.sh [more megaswift flags]
# MASTER_ADDR is node 0's address as the other nodes reach it; MASTER_PORT must be free there. `megaswift sft`
# relaunches itself as `torchrun --nnodes NNODES --node_rank NODE_RANK --nproc_per_node NPROC_PER_NODE ...`.
# A stopped run (Ctrl-C, SIGTERM: megaswift saves a checkpoint first) continues with the same command: the script
# resumes when OUTPUT_DIR holds a checkpoint.
set -euo pipefail
: "${NNODES:?set NNODES}" "${NODE_RANK:?set NODE_RANK (0 .. NNODES-1)}" "${MASTER_ADDR:?set MASTER_ADDR (node 0)}"
MODEL=${MODEL:-Qwen/Qwen2.5-7B-Instruct}                  # EDIT: a hub id or a local HF directory
DATASET=${DATASET:-AI-ModelScope/alpaca-gpt4-data-en}     # EDIT: hub ids or .jsonl files (space-separated)
OUTPUT_DIR=${OUTPUT_DIR:-output/megaswift-sft}            # EDIT: on a file system every node sees
CONFIG=${CONFIG:-}                                        # optional YAML with the other flags (see examples/)
GPUS=$(nvidia-smi -L 2> /dev/null | wc -l || true)
export NNODES NODE_RANK MASTER_ADDR MASTER_PORT=${MASTER_PORT:-29500}
export NPROC_PER_NODE=${NPROC_PER_NODE:-$((GPUS > 0 ? GPUS : 1))}

RESUME=false
[ -f "$OUTPUT_DIR/latest_checkpointed_iteration.txt" ] && RESUME=true
exec megaswift sft $CONFIG --model "$MODEL" --dataset $DATASET --output_dir "$OUTPUT_DIR" \
  --resume_from_checkpoint "$RESUME" "$@"
