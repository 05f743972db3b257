#!/usr/bin/env bash
# GPU smoke of the online trainers: PPO, GRPO, RLOO for 6 steps on a tiny model, fp32 and auto (bf16 on a GPU),
# the rollout engine's log-probs checked against the trainer's at every step.
set -u
# WHEELS=DIR installs wheels first (a machine without network: carry datasets, transformers, ... as wheels)
if [ -n "${WHEELS:-}" ]; then python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site "$WHEELS"/*.whl || exit 1; fi
export PYTHONPATH=/tmp/site:$PWD/src:${PYTHONPATH:-} PYTHONUNBUFFERED=1 TRANSFORMERS_VERBOSITY=error
cd "$(mktemp -d)"
nvidia-smi --query-gpu=name,memory.total --format=csv,noheader 2>/dev/null || echo "no nvidia-smi: CPU"
python3 -c "import torch, transformers; print('torch', torch.__version__, 'cuda', torch.cuda.is_available(), 'transformers', transformers.__version__)"
python3 -m rlhfkit tiny-model m --layers 2 --hidden 64 --heads 4 --vocab 512 --max-positions 256 || exit 1
python3 - <<'PY'
import json, random
random.seed(0)
words = "the sea is blue and the sky is wide where does the river go tell me about a tree".split()
with open("prompts.jsonl", "w") as f:
    for i in range(64):
        f.write(json.dumps({"prompt": [{"role": "user", "content": " ".join(random.sample(words, 6))}]}) + "\n")
open("reward.py", "w").write("def count_e(prompts, responses):\n    return [r.count('e') / 10 for r in responses]\n")
PY
status=0
for algo in ppo grpo rloo; do
  for prec in fp32 auto; do
    out=out_${algo}_${prec}
    python3 -m rlhfkit $algo --model m --dataset prompts.jsonl --reward-fn reward.py:count_e --max-steps 6 \
      --max-new-tokens 24 --output-dir $out --precision $prec --logprob-check-steps 1 \
      --logprob-check-tolerance 0.5 --no-progress-bar --eval-dataset prompts.jsonl --eval-steps 3 > $out.log 2>&1
    rc=$?; [ $rc -ne 0 ] && status=1
    python3 - "$out" "$rc" "$algo" "$prec" <<'PY'
import json, sys
out, rc, algo, prec = sys.argv[1:]
rows = [json.loads(l) for l in open(f"{out}/metrics.jsonl")] if rc == "0" else []
train = [r for r in rows if "reward_mean" in r]
if not train:
    print(f"{algo:5} {prec:5} rc={rc} FAILED"); print(open(out + ".log").read()[-3000:]); sys.exit()
last = train[-1]
print(f"{algo:5} {prec:5} rc={rc} steps={len(train)} reward {train[0]['reward_mean']:.3f}->{last['reward_mean']:.3f} "
      f"kl={last['kl']:.4f} logprob_diff_max={max(r.get('rollout_logprob_diff_max', 0) for r in train):.4f} "
      f"rollout_tok/s={last['rollout_tokens_per_s']:.0f} train_tok/s={last['train_tokens_per_s']:.0f} "
      f"eval_kl={[r['eval_kl'] for r in rows if 'eval_kl' in r][-1:]}")
PY
  done
done
grep -h "precision" out_*.log | sort | uniq -c
exit $status
