#!/usr/bin/env bash
# Prepare what scripts/gpu_check.sh carries to a bare GPU machine (PyTorch, Lightning and transformers installed,
# no internet): the wheels of the other packages kedit_pl imports, and a small slice of the benchmark data.
#   scripts/gpu_wheels.sh [DIR=gpu_carry] [PYTHON_VERSION...=this python's]
# DIR is git-ignored (never commit wheels). Binary wheels are fetched for manylinux x86_64 and each Python version
# given (the GPU machine's; pure-Python wheels serve them all). Then, on the GPU machine: scripts/gpu_check.sh DIR
set -euo pipefail
cd "$(dirname "$0")/.."
DIR=${1:-gpu_carry}; shift || true
VERSIONS=${*:-$(python -c 'import sys; print(f"{sys.version_info[0]}.{sys.version_info[1]}")')}
WHEELS="$DIR/wheels"
mkdir -p "$WHEELS"
# what kedit_pl, its tests and its entry points import beyond torch / lightning / transformers (pyproject.toml)
PKGS="hydra-core>=1.3 omegaconf rich wandb>=0.16 gguf>=0.10 nltk matplotlib pytest"
# what PyTorch, Lightning and transformers already bring (dropped: the carry must stay small, < 64 MiB)
PRESENT="torch nvidia_* triton sympy mpmath networkx numpy jinja2 markupsafe filelock fsspec typing_extensions
  huggingface_hub hf_xet tokenizers safetensors pyyaml packaging tqdm regex requests urllib3 idna certifi
  charset_normalizer setuptools"
# hydra's parser runtime is published as a source archive only: build its (pure-Python) wheel here
python -m pip wheel -q --no-deps -w "$WHEELS" "antlr4-python3-runtime==4.9.3"
for v in $VERSIONS; do
  echo "wheels for Python $v"
  python -m pip download -q -d "$WHEELS" --find-links "$WHEELS" --only-binary=:all: --python-version "$v" \
    --platform manylinux2014_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux_2_28_x86_64 \
    --platform any $PKGS
done
for p in $PRESENT; do rm -f "$WHEELS"/$p-*.whl; done
# the data the check reads (a slice of each file: the first 300 records, WikiText-2's test text for E[kkᵀ])
DATA=${KEDIT_DATA_DIR:-../shared/data}
python - "$DATA" "$DIR/data" <<'PY'
import json, shutil, sys
from pathlib import Path
src, dst = Path(sys.argv[1]), Path(sys.argv[2])
for rel in ("counterfact/derived/counterfact_rome_format_union.json",
            "zsre/mend_format/zsre_mend_eval_portability_gpt4.json",
            "zsre/derived/zsre_mend_train_10000_normalized.json"):
    (dst / rel).parent.mkdir(parents=True, exist_ok=True)
    (dst / rel).write_text(json.dumps(json.loads((src / rel).read_text())[:300]))
rel = "text/wikitext-2-raw/wiki.test.raw"
(dst / rel).parent.mkdir(parents=True, exist_ok=True)
shutil.copyfile(src / rel, dst / rel)
PY
du -sh "$DIR" "$WHEELS"
