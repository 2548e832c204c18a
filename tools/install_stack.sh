#!/usr/bin/env bash
# Install blockcopy's full, pinned dependency stack into .venv/ at the repository root.
#
# Safe to re-run: it does nothing when .venv/ already holds exactly this stack (a stamp keyed on this
# script and requirements.txt). Needs only package-registry access. Built artefacts that take long to
# make (the mmcv wheel with compiled ops) are cached outside the repository, keyed on the exact
# versions, in ${BLOCKCOPY_CACHE:-~/.cache/blockcopy}.
set -euo pipefail

ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
VENV="$ROOT/.venv"
PY=${PYTHON:-python3}
CACHE=${BLOCKCOPY_CACHE:-${XDG_CACHE_HOME:-$HOME/.cache}/blockcopy}
STAMP="$VENV/.blockcopy-stack"

MMCV_VERSION=2.1.0
D2_WHEEL_VERSION=0.7.2  # sal-detectron2: upstream detectron2 commit a59f056, pure Python

want=$(cat "$ROOT/tools/install_stack.sh" "$ROOT/requirements.txt" | sha256sum | cut -c1-16)
if [[ -f "$STAMP" && "$(cat "$STAMP")" == "$want" ]]; then
  exit 0
fi

log() { printf '[install_stack] %s\n' "$*" >&2; }
start=$(date +%s)

if [[ ! -x "$VENV/bin/python" ]]; then
  log "creating $VENV with $($PY --version)"
  "$PY" -m venv "$VENV"
fi
pip=("$VENV/bin/python" -m pip --disable-pip-version-check)
"${pip[@]}" install -q --upgrade "pip>=24,<26"

log "installing pinned requirements"
"${pip[@]}" install -q -r "$ROOT/requirements.txt"

pyver=$("$VENV/bin/python" -c 'import sys; print(f"cp{sys.version_info[0]}{sys.version_info[1]}")')
torchver=$("$VENV/bin/python" -c 'import torch; print(torch.__version__.split("+")[0])')
mkdir -p "$CACHE"

# Detectron2 is not on PyPI under its own name; this wheel is its upstream source. Its file name claims
# cp310 only, but the code is pure Python (the bundled C extension is optional and unused on other
# Pythons: torchvision provides ROIAlign and NMS), so it is installed under a py3 tag.
d2_wheel="$CACHE/sal_detectron2-$D2_WHEEL_VERSION-py3-none-any.whl"
if [[ ! -f "$d2_wheel" ]]; then
  log "fetching detectron2 ($D2_WHEEL_VERSION)"
  tmp=$(mktemp -d)
  "${pip[@]}" download -q --no-deps --only-binary=:all: --python-version 3.10 --platform any \
    -d "$tmp" "sal-detectron2==$D2_WHEEL_VERSION"
  mv "$tmp"/sal_detectron2-*.whl "$d2_wheel"
  rm -rf "$tmp"
fi
"${pip[@]}" install -q "$d2_wheel" -c "$ROOT/requirements.txt"

# mmcv with compiled ops, built against the installed torch (its wheel is tied to torch and Python).
mmcv_wheel_dir="$CACHE/mmcv-$MMCV_VERSION-torch$torchver-$pyver"
if ! ls "$mmcv_wheel_dir"/mmcv-*.whl >/dev/null 2>&1; then
  log "building mmcv $MMCV_VERSION with ops against torch $torchver (several minutes)"
  tmp=$(mktemp -d)
  "${pip[@]}" download -q --no-deps --no-binary=:all: --no-build-isolation -d "$tmp" "mmcv==$MMCV_VERSION"
  tar -xzf "$tmp"/mmcv-*.tar.gz -C "$tmp"
  src=$(find "$tmp" -maxdepth 1 -type d -name 'mmcv-*' | head -n 1)
  # torch >= 2.14 headers need C++20; mmcv 2.1.0 hard-codes C++17.
  sed -i 's/-std=c++17/-std=c++20/g' "$src/setup.py"
  mkdir -p "$mmcv_wheel_dir.partial"
  (cd "$src" && MMCV_WITH_OPS=1 MAX_JOBS=${MAX_JOBS:-2} "${pip[@]}" wheel -q --no-deps \
      --no-build-isolation -w "$mmcv_wheel_dir.partial" .)
  rm -rf "$mmcv_wheel_dir" && mv "$mmcv_wheel_dir.partial" "$mmcv_wheel_dir"
  rm -rf "$tmp"
fi
"${pip[@]}" install -q --no-deps "$mmcv_wheel_dir"/mmcv-*.whl

log "installing blockcopy in editable mode"
"${pip[@]}" install -q --no-deps --no-build-isolation -e "$ROOT"

"$VENV/bin/python" - <<'EOF'
import torch, torchvision, detectron2, mmcv, mmcv.ops, mmdet, mmengine, pycocotools, cityscapesscripts, cv2
import blockcopy_core, blockcopy_d2, blockcopy_mmdet
print(f"[install_stack] torch {torch.__version__}, torchvision {torchvision.__version__}, "
      f"detectron2 {detectron2.__version__}, mmcv {mmcv.__version__}, mmdet {mmdet.__version__}, "
      f"opencv {cv2.__version__}")
EOF
echo "$want" > "$STAMP"
log "done in $(( $(date +%s) - start )) s"
