#!/usr/bin/env bash
# Run `megaswift sample` as N independent shards (one per GPU, or N CPU processes), then merge.
#   NUM_SHARDS=4 OUTPUT_DIR=sample_output launch/sample_shards.sh --model M --dataset D --orm_model math
# Every shard writes OUTPUT_DIR/shards.shardIofN.jsonl and can be resumed on its own (--resume true).
# On several nodes (slurm/sample.sbatch) each node runs NUM_SHARDS shards starting at FIRST_SHARD, out of
# TOTAL_SHARDS in all; a node that holds only some of the shards leaves the merge to its caller.
set -euo pipefail
NUM_SHARDS=${NUM_SHARDS:-$(nvidia-smi -L 2>/dev/null | wc -l)}
NUM_SHARDS=${NUM_SHARDS:-1}; [ "$NUM_SHARDS" -ge 1 ] || NUM_SHARDS=1
FIRST_SHARD=${FIRST_SHARD:-0}
TOTAL_SHARDS=${TOTAL_SHARDS:-$NUM_SHARDS}
OUTPUT_DIR=${OUTPUT_DIR:-sample_output}
NAME=${NAME:-shards}
pids=()
# every shard is a process of its own, a world of one (also inside an srun step, whose SLURM_* variables
# would otherwise make megaswift take it for a rank of the step)
for ((i = 0; i < NUM_SHARDS; i++)); do
  s=$((FIRST_SHARD + i))
  RANK=0 WORLD_SIZE=1 CUDA_VISIBLE_DEVICES=$i megaswift sample "$@" --output_dir "$OUTPUT_DIR" \
    --data_range "$s" "$TOTAL_SHARDS" --output_file "$NAME.shard${s}of${TOTAL_SHARDS}.jsonl" &
  pids+=($!)
done
status=0
for pid in "${pids[@]}"; do wait "$pid" || status=1; done
if [ "$status" -ne 0 ]; then
  echo "a shard failed; rerun with --resume true to continue the unfinished shards" >&2
  exit 1
fi
[ "$NUM_SHARDS" -eq "$TOTAL_SHARDS" ] || exit 0
cat "$OUTPUT_DIR/$NAME".shard*of"$NUM_SHARDS".jsonl > "$OUTPUT_DIR/$NAME.jsonl"
echo "merged $NUM_SHARDS shards into $OUTPUT_DIR/$NAME.jsonl ($(wc -l < "$OUTPUT_DIR/$NAME.jsonl") lines)"
