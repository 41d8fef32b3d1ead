#!/usr/bin/env bash
# Idempotent set-up of .venv: torch, detectron2 and cityseg-d2 (editable, with test extras).
#
# Environment variables:
#   VENV=DIR                       where the virtual environment lives (default .venv)
#   PYTHON=EXE                     interpreter that creates it (default python3, >= 3.10)
#   SYSTEM_SITE_PACKAGES=1         let the venv see the interpreter's packages, e.g. your own CUDA
#                                  builds of torch and detectron2, which are then used as they are
#   CITYSEG_D2_TORCH="SPECS"       torch packages to install when none is importable
#                                  (default "torch==2.14.1 torchvision==0.29.1")
#   CITYSEG_D2_DETECTRON2=source   build detectron2 from the official repository instead of the
#                                  repacked PyPI build (needs network access to GitHub and a compiler)
#   CITYSEG_D2_CACHE=DIR           where the repacked detectron2 wheel is kept (default .cache/setup)
set -euo pipefail
cd "$(dirname "$0")/.."

VENV=${VENV:-.venv}
PYTHON=${PYTHON:-python3}
CACHE=${CITYSEG_D2_CACHE:-.cache/setup}
TORCH_SPECS=${CITYSEG_D2_TORCH:-"torch==2.14.1 torchvision==0.29.1"}
D2_ROUTE=${CITYSEG_D2_DETECTRON2:-pypi}
D2_PYPI=sal-detectron2==0.7.2
D2_WHEEL="$CACHE/sal_detectron2-0.7.2-py3-none-any.whl"
D2_EXTRA_DEPS=("fvcore>=0.1.5,<0.1.6" "iopath>=0.1.7,<0.1.10" "setuptools<81")

say() { echo "[setup] $*"; }
die() { echo "[setup] ERROR: $*" >&2; exit 1; }
# pip, without the notices about this machine's unused local index folders.
pip_q() { "$py" -m pip --disable-pip-version-check -q "$@" 2>&1 | { grep -v '^WARNING: Location' || true; }; }

stamp_key() { cat setup.py tools/setup_env.sh | sha256sum | cut -d' ' -f1; }

if [ ! -x "$VENV/bin/python" ]; then
  "$PYTHON" -c 'import sys; sys.exit(sys.version_info < (3, 10))' \
    || die "$PYTHON is older than 3.10; set PYTHON=python3.11 (or newer) and rerun."
  say "creating $VENV with $("$PYTHON" --version)"
  "$PYTHON" -m venv ${SYSTEM_SITE_PACKAGES:+--system-site-packages} "$VENV"
fi
py="$VENV/bin/python"
stamp="$VENV/.cityseg-d2-setup"

if [ -f "$stamp" ] && [ "$(cat "$stamp")" = "$(stamp_key)" ] \
   && "$py" -c 'import torch, torchvision, detectron2, cityseg_d2' 2>/dev/null; then
  say "$VENV is up to date (torch, detectron2, cityseg_d2 import); nothing to do"
  exit 0
fi

if "$py" -c 'import torch, torchvision' 2>/dev/null; then
  say "torch $("$py" -c 'import torch; print(torch.__version__)') found; leaving it as is"
else
  say "installing $TORCH_SPECS"
  # shellcheck disable=SC2086
  pip_q install $TORCH_SPECS || die "could not install $TORCH_SPECS; install torch and torchvision into $VENV yourself (https://pytorch.org/get-started/locally/) and rerun."
fi

build_repacked_detectron2() {
  # sal-detectron2 is upstream detectron2 main uploaded as a cp310 wheel with a _C for 3.10.
  # Its Python code runs without _C (only deformable conv and rotated boxes need it), so we drop
  # _C and the stray top-level `tools` package, relax the numpy<2 pin and retag it py3-none-any.
  local work; work=$(mktemp -d)
  pip_q install wheel
  pip_q download --no-deps --only-binary=:all: --python-version 3.10 "$D2_PYPI" -d "$work" || return 1
  "$py" -m wheel unpack "$work"/sal_detectron2-*.whl -d "$work/unpacked" >/dev/null || return 1
  local root; root=$(echo "$work"/unpacked/sal_detectron2-*)
  local info; info=$(echo "$root"/*.dist-info)
  rm -rf "$root"/detectron2/_C*.so "$root/tools"
  sed -i '/^detectron2\/_C/d;/^tools\//d' "$info/RECORD"
  sed -i 's/^Tag: .*/Tag: py3-none-any/;s/^Root-Is-Purelib: .*/Root-Is-Purelib: true/' "$info/WHEEL"
  sed -i '/^Requires-Dist: numpy<2$/d' "$info/METADATA"
  echo detectron2 > "$info/top_level.txt"
  mkdir -p "$work/out" "$CACHE"
  "$py" -m wheel pack "$root" -d "$work/out" >/dev/null || return 1
  mv "$work"/out/*.whl "$D2_WHEEL.tmp" && mv "$D2_WHEEL.tmp" "$D2_WHEEL"
  rm -rf "$work"
}

if "$py" -c 'import detectron2' 2>/dev/null; then
  say "detectron2 $("$py" -c 'import detectron2; print(detectron2.__version__, "at", detectron2.__path__[0])') found; leaving it as is"
elif [ "$D2_ROUTE" = source ]; then
  say "building detectron2 from the official repository"
  pip_q install "${D2_EXTRA_DEPS[@]}" ninja
  pip_q install --no-build-isolation 'git+https://github.com/facebookresearch/detectron2.git' \
    || die "the source build of detectron2 failed; see https://detectron2.readthedocs.io/en/latest/tutorials/install.html, install it into $VENV, and rerun."
else
  if [ -f "$D2_WHEEL" ]; then
    say "using the cached repacked detectron2 wheel $D2_WHEEL"
  else
    say "repacking $D2_PYPI into $D2_WHEEL"
    build_repacked_detectron2 \
      || die "could not fetch or repack $D2_PYPI; install detectron2 into $VENV yourself (or rerun with CITYSEG_D2_DETECTRON2=source) and rerun."
  fi
  pip_q install "$D2_WHEEL" "${D2_EXTRA_DEPS[@]}" \
    || die "could not install $D2_WHEEL; delete it and rerun, or install detectron2 into $VENV yourself."
fi

say "installing cityseg-d2 (editable) with its test extras"
pip_q install -e ".[test]" || die "pip install -e .[test] failed; see the pip output above."
"$py" -c 'import torch, torchvision, detectron2, cityseg_d2' \
  || die "the environment in $VENV does not import torch, detectron2 and cityseg_d2; see the errors above."
stamp_key > "$stamp"
say "done: $("$py" -m cityseg_d2.collect_env --short)"
