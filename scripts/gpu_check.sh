#!/usr/bin/env bash
# The GPU check of kedit_pl, for a bare GPU machine with PyTorch, Lightning and transformers (no internet), in
# well under 10 minutes:
#   1. installs what it lacks from the wheels scripts/gpu_wheels.sh prepared (DIR/wheels), offline;
#   2. the `gpu` tests: every method edits and restores a tiny Llama in bf16/fp16 on CUDA, and one training step
#      of MEND, KE and SERAC (fp32 and bf16-mixed) on CUDA;
#   3. ROME and MEMIT through edit.py on a tiny model on CUDA, bfloat16 against float32;
#   4. train.py fast_dev_run for MEND on CUDA, bf16-mixed.
# Usage: scripts/gpu_check.sh [DIR=gpu_carry]   (prints one PASS/FAIL line per step; exit status = failures)
# Rehearsal without a GPU: ACCELERATOR=cpu scripts/gpu_check.sh (the same steps on the CPU; the gpu tests skip).
set -uo pipefail
cd "$(dirname "$0")/.."
DIR=${1:-gpu_carry}
export KEDIT_DATA_DIR="$PWD/$DIR/data" KEDIT_CACHE="${KEDIT_CACHE:-/tmp/kedit_gpu_cache}" WANDB_MODE=offline \
  HF_HUB_OFFLINE=1 TOKENIZERS_PARALLELISM=false PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
OUT=${OUT:-/tmp/kedit_gpu_check}
ACC=${ACCELERATOR:-gpu}
mkdir -p "$OUT"
fails=0
step() {  # step NAME TIMEOUT_S CMD...: run, log to $OUT/NAME.log, one PASS/FAIL line with the wall time
  local name=$1 limit=$2; shift 2
  local t0=$SECONDS
  if timeout "$limit" "$@" > "$OUT/$name.log" 2>&1; then
    echo "PASS $name ($((SECONDS - t0)) s)"
  else
    echo "FAIL $name (exit $?, $((SECONDS - t0)) s): last lines of $OUT/$name.log"; tail -n 15 "$OUT/$name.log"
    fails=$((fails + 1))
  fi
}

echo "== machine"
nvidia-smi --query-gpu=name,memory.total,memory.used,driver_version --format=csv,noheader || true
python -c "import torch, lightning, transformers, sys; print('python', sys.version.split()[0], '| torch', torch.__version__, \
'cuda', torch.version.cuda, torch.cuda.is_available(), '| lightning', lightning.__version__, '| transformers', \
transformers.__version__)"

echo "== 1. packages"
missing=""
for pair in hydra:hydra-core omegaconf:omegaconf rich:rich wandb:wandb gguf:gguf nltk:nltk matplotlib:matplotlib \
            pytest:pytest accelerate:accelerate safetensors:safetensors; do
  python -c "import ${pair%%:*}" 2>/dev/null || missing="$missing ${pair#*:}"
done
if [ -n "$missing" ]; then
  step install 180 python -m pip install --no-index --find-links "$DIR/wheels" $missing
else
  echo "nothing to install"
fi
if [ "$ACC" = gpu ]; then
  python -c "import torch; assert torch.cuda.is_available()" || { echo "FAIL: CUDA is not available"; exit 1; }
fi

echo "== 2. gpu tests"
step pytest_gpu 300 python -m pytest -m gpu -q -p no:cacheprovider tests/test_half_precision.py \
  tests/test_learned_training.py

echo "== 3. ROME and MEMIT on CUDA, bf16 against fp32"
SMALL=(model=tiny_llama dataset.limit=4 logger=csv trainer.accelerator=$ACC stats.n_samples=4000 stats.progress=false)
for m in rome memit; do
  extra=(); [ $m = memit ] && extra=(edit.mode=batch edit.batch_size=4)
  for dt in float32 bfloat16; do
    step "edit_${m}_${dt}" 120 python edit.py method=$m model.dtype=$dt "${SMALL[@]}" "${extra[@]}" \
      hydra.run.dir="$OUT/runs/${m}_${dt}"
  done
done
python - "$OUT/runs" <<'PY'
import json, sys
from pathlib import Path
for run in sorted(Path(sys.argv[1]).iterdir()):
    s = json.loads((run / "summary.json").read_text()) if (run / "summary.json").is_file() else {}
    pre, post = s.get("pre", {}), s.get("post", {})
    print(f"{run.name:<18} pre ES {pre.get('es', float('nan')):5.1f}  post ES {post.get('es', float('nan')):5.1f} "
          f"PS {post.get('ps', float('nan')):5.1f} NS {post.get('ns', float('nan')):5.1f}  "
          f"wall {s.get('timing', {}).get('wall_seconds', float('nan')):.1f} s")
PY

echo "== 4. train.py fast_dev_run: MEND on CUDA (bf16-mixed)"
step train_mend 180 python train.py method=mend model=tiny_llama method.rank=8 trainer.accelerator=$ACC \
  trainer.precision=bf16-mixed trainer.fast_dev_run=2 logger=csv hydra.run.dir="$OUT/runs/train_mend"

echo "== memory plans (edit.dry_run) on this GPU"
for model in gpt2_xl gpt_j_6b llama3_8b; do
  python edit.py model=$model method=memit model.dtype=bfloat16 trainer.accelerator=$ACC edit.dry_run=true \
    logger=csv hydra.run.dir="$OUT/runs/dry_$model" 2>/dev/null | grep -E "memory plan|estimated peak"
done
echo "== $fails step(s) failed; logs in $OUT"
exit $fails
