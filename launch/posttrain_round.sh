#!/usr/bin/env bash
# One post-training round of the paper, end to end, on the stdlib demo data and the tiny Llama 3 (CPU, minutes):
#   reward model -> rejection sampling -> SFT on the kept samples -> DPO -> serve the result.
# Each stage reads the previous one's output:
#   1. reward model: tiny_reward started from BASE (only the scalar head is new), held-out pairwise accuracy;
#   2. rejection sampling: K samples per prompt from BASE (the latest policy), the reward model keeps the best;
#   3. SFT: tiny_sft from BASE on the kept samples (prepared with --format sft);
#   4. DPO: tiny_dpo from the SFT checkpoint (which is also its frozen reference) on the preference set;
#   5. serve the DPO checkpoint and ask it one chat question over the OpenAI API.
# Usage: launch/posttrain_round.sh [BASE_CHECKPOINT]   (default: the newest runs/tiny-*/checkpoints, `make train`)
# Sizes (environment): RM_STEPS SFT_STEPS DPO_STEPS PROMPTS K MAX_TOKENS OUT PORT; EVAL=1 also evaluates SFT and DPO
# on the held-out sets (a few minutes more).
set -euo pipefail
cd "$(dirname "$0")/.."
L3=${L3:-.venv/bin/llama3hp}
PY=${PY:-.venv/bin/python}
BASE=${1:-$(ls -td runs/tiny-*/checkpoints 2>/dev/null | head -1)}
[[ -n "$BASE" ]] || { echo "no base checkpoint: run 'make train' first or pass one" >&2; exit 2; }
RM_STEPS=${RM_STEPS:-60} SFT_STEPS=${SFT_STEPS:-40} DPO_STEPS=${DPO_STEPS:-40}
PROMPTS=${PROMPTS:-48} K=${K:-8} MAX_TOKENS=${MAX_TOKENS:-64} PORT=${PORT:-8011}
OUT=${OUT:-runs/round-$(date +%Y%m%d-%H%M%S)}
mkdir -p "$OUT"
export OMP_WAIT_POLICY=${OMP_WAIT_POLICY:-PASSIVE}
stage() { echo; echo "== $(date +%T) $*"; }

stage "0. data: the stdlib demo sets (once)"
[[ -f data/demo-preference/train/manifest.json ]] || "$L3" prepare --demo preference --out data/demo-preference
[[ -f data/demo-sft/train/manifest.json ]] || "$L3" prepare --demo sft --out data/demo-sft

stage "1. reward model: $RM_STEPS steps from $BASE"
"$L3" train --config tiny_reward training.init_from="$BASE" training.steps="$RM_STEPS" run_dir="$OUT/reward" \
  metrics.plot=false
"$L3" evaluate --config tiny_reward --checkpoint "$OUT/reward/checkpoints" --out "$OUT/reward_eval.json" >/dev/null
echo "reward model, held-out: $(cat "$OUT/reward_eval.json" | tr -d '\n ')"

stage "2. rejection sampling: $PROMPTS prompts x $K samples from the policy $BASE"
"$L3" rejection-sample --policy "$BASE" --reward "$OUT/reward/checkpoints" --prompts data/demo-sft/train.jsonl \
  --limit "$PROMPTS" --k "$K" --max-tokens "$MAX_TOKENS" --temperature 1.0 --top-p 0.95 --candidates \
  --system "Answer with the Python function only." --out "$OUT/rejection.jsonl" > "$OUT/rejection_summary.json"
"$L3" prepare --format sft "$OUT/rejection.jsonl" --out "$OUT/rejection-sft" --overwrite

stage "3. SFT on the kept samples: $SFT_STEPS steps from $BASE"
"$L3" train --config tiny_sft training.init_from="$BASE" training.steps="$SFT_STEPS" run_dir="$OUT/sft" \
  "data.datasets=[\"$OUT/rejection-sft\"]" training.warmup_steps=5 metrics.plot=false

stage "4. DPO: $DPO_STEPS steps from the SFT checkpoint (also the frozen reference, co-resident)"
"$L3" train --config tiny_dpo training.init_from="$OUT/sft/checkpoints" training.steps="$DPO_STEPS" \
  run_dir="$OUT/dpo" posttrain.reference_mode=co_resident training.warmup_steps=5 metrics.plot=false
if [[ "${EVAL:-0}" == 1 ]]; then
  "$L3" evaluate --config tiny_sft --checkpoint "$OUT/sft/checkpoints" --out "$OUT/sft_eval.json" >/dev/null
  "$L3" evaluate --config tiny_dpo training.init_from="$OUT/sft/checkpoints" --checkpoint "$OUT/dpo/checkpoints" \
    --out "$OUT/dpo_eval.json" >/dev/null
fi

stage "5. serve the round's policy ($OUT/dpo) and ask it one question"
"$L3" serve --checkpoint "$OUT/dpo" --port "$PORT" --kv-memory-gib 0.25 > "$OUT/serve.log" 2>&1 &
SERVER=$!
trap 'kill $SERVER 2>/dev/null || true' EXIT
for _ in $(seq 120); do curl -sf "http://127.0.0.1:$PORT/health" >/dev/null && break; sleep 1; done
curl -sf "http://127.0.0.1:$PORT/v1/chat/completions" -H 'Content-Type: application/json' -d '{"model": "dpo",
  "messages": [{"role": "user", "content": "Write the Python function `is_even(n)`: return True when n is even."}],
  "max_tokens": 48, "temperature": 0}' > "$OUT/serve_answer.json"
kill $SERVER; wait $SERVER 2>/dev/null || true; trap - EXIT

stage "summary ($OUT/round.json)"
"$PY" - "$OUT" <<'EOF'
import json, sys
out = sys.argv[1]
def last(run, keys):
    row = json.loads(open(f"{out}/{run}/metrics.jsonl").read().splitlines()[-1])
    return {k: round(row[k], 4) for k in keys if k in row}
rs = json.loads(open(f"{out}/rejection_summary.json").read())
ev = json.loads(open(f"{out}/reward_eval.json").read())
summary = {
    "reward_model": {"train_last_step": last("reward", ["loss", "accuracy"]),
                     "heldout": {k: round(ev[k], 4) for k in ("loss", "accuracy", "rewards/chosen", "rewards/rejected")}},
    "rejection_sampling": {k: round(rs[k], 4) if isinstance(rs[k], float) else rs[k] for k in
                           ("prompts", "responses", "mean_reward_best", "mean_reward_random", "mean_reward_all",
                            "responses_per_s", "tokens_per_s", "kv_blocks_peak", "seconds")},
    "sft": {"first_step": json.loads(open(f"{out}/sft/metrics.jsonl").readline())["loss"],
            "last_step": last("sft", ["loss"])},
    "dpo": {"last_step": last("dpo", ["loss", "dpo", "nll", "rewards/accuracy", "rewards/margin"])},
    "served_answer": json.loads(open(f"{out}/serve_answer.json").read())["choices"][0]["message"]["content"],
}
for name in ("sft_eval", "dpo_eval"):
    try:
        summary[name] = json.loads(open(f"{out}/{name}.json").read())
    except OSError:
        pass
open(f"{out}/round.json", "w").write(json.dumps(summary, indent=1) + "\n")
print(json.dumps(summary, indent=1))
EOF
