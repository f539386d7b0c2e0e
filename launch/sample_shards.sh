#!/usr/bin/env bash
# Run `megaswift sample` as N independent shards (one per GPU, or N CPU processes), then merge.
#   NUM_SHARDS=4 OUTPUT_DIR=sample_output launch/sample_shards.sh --model M --dataset D --orm_model math
# Every shard writes OUTPUT_DIR/shards.shardIofN.jsonl and can be resumed on its own (--resume true).
set -euo pipefail
NUM_SHARDS=${NUM_SHARDS:-$(nvidia-smi -L 2>/dev/null | wc -l)}
NUM_SHARDS=${NUM_SHARDS:-1}; [ "$NUM_SHARDS" -ge 1 ] || NUM_SHARDS=1
OUTPUT_DIR=${OUTPUT_DIR:-sample_output}
NAME=${NAME:-shards}
pids=()
for ((i = 0; i < NUM_SHARDS; i++)); do
  CUDA_VISIBLE_DEVICES=$i megaswift sample "$@" --output_dir "$OUTPUT_DIR" \
    --data_range "$i" "$NUM_SHARDS" --output_file "$NAME.shard${i}of${NUM_SHARDS}.jsonl" &
  pids+=($!)
done
status=0
for pid in "${pids[@]}"; do wait "$pid" || status=1; done
if [ "$status" -ne 0 ]; then
  echo "a shard failed; rerun with --resume true to continue the unfinished shards" >&2
  exit 1
fi
cat "$OUTPUT_DIR/$NAME".shard*of"$NUM_SHARDS".jsonl > "$OUTPUT_DIR/$NAME.jsonl"
echo "merged $NUM_SHARDS shards into $OUTPUT_DIR/$NAME.jsonl ($(wc -l < "$OUTPUT_DIR/$NAME.jsonl") lines)"
