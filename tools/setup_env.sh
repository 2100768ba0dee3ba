#!/usr/bin/env bash
# Create (or reuse) the project's virtual environment. Idempotent: a stamp file records the
# hash of the requirements files and this script; when both are unchanged nothing is reinstalled.
#
#   VENV=.venv                      where the environment lives
#   DETECTRON2_SOURCE=pypi|git      pypi (default): the sal-detectron2 wheel + maskformer2 sdist
#                                   git: upstream detectron2 and Mask2Former from GitHub
#   SKIP_TORCH=1                    keep the torch/torchvision already in $VENV (GPU clusters)
set -euo pipefail
cd "$(dirname "$0")/.."
VENV=${VENV:-.venv}
# The options of the first set-up are remembered, so a later plain `make test` after
# `SKIP_TORCH=1 DETECTRON2_SOURCE=git make setup` keeps them instead of reinstalling.
saved="$VENV/.rooftop-options"
SAVED_SOURCE=; SAVED_SKIP_TORCH=
if [ -f "$saved" ]; then . "$saved"; fi
SOURCE=${DETECTRON2_SOURCE:-${SAVED_SOURCE:-pypi}}
SKIP=${SKIP_TORCH:-${SAVED_SKIP_TORCH:-0}}
PYTHON=${PYTHON:-python3}
stamp="$VENV/.rooftop-setup-$(cat requirements.txt requirements-dev.txt tools/setup_env.sh | sha256sum | cut -c1-16)-$SOURCE"
if [ -f "$stamp" ]; then
  exit 0
fi
if [ -x "$VENV/bin/python" ]; then
  echo "[setup] updating $VENV (requirements or this script changed)"
else
  echo "[setup] creating $VENV (torch CUDA build, about 5.5 GB; about 2 minutes on a fresh machine)"
  "$PYTHON" -m venv "$VENV"
fi
pip="$VENV/bin/python -m pip"
# pip 26 refuses PyPI packages that name a dependency by URL even with --no-deps, which is how
# maskformer2 names detectron2; 25.0 installs it (verified).
$pip install -q "pip==25.0" "setuptools>=70" wheel
if [ "$SKIP" = 1 ]; then
  grep -v -E '^(torch|torchvision)==' requirements.txt > "$VENV/requirements-no-torch.txt"
  $pip install -q -r "$VENV/requirements-no-torch.txt" -r requirements-dev.txt
else
  $pip install -q -r requirements.txt -r requirements-dev.txt
fi
site=$("$VENV/bin/python" -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])')
if [ "$SOURCE" = git ]; then
  $pip install -q --no-build-isolation 'git+https://github.com/facebookresearch/detectron2.git'
  $pip install -q --no-deps --no-build-isolation 'git+https://github.com/facebookresearch/Mask2Former.git'
else
  # detectron2 is not on PyPI from its authors. sal-detectron2 0.7.2 is a late-2024 snapshot of
  # its Python package tagged cp310; its compiled _C never loads on 3.11 and is not needed here.
  $pip install -q --no-deps --upgrade --target "$site" --python-version 3.10 \
    --implementation cp --only-binary=:all: sal-detectron2==0.7.2
  # maskformer2 0.1 is upstream Mask2Former's Python package. It names detectron2 by URL (pip
  # refuses) and its setup.py imports torch, hence --no-deps --no-build-isolation.
  $pip install -q --no-deps --no-build-isolation maskformer2==0.1
fi
# Make this checkout importable: the package (repo root) and the compiled op (ops/, built by
# `make ops`). Equivalent to an editable install, without copying anything.
printf '%s\n%s\n' "$PWD" "$PWD/ops" > "$site/rooftop_m2f_checkout.pth"
rm -f "$VENV"/.rooftop-setup-*
printf 'SAVED_SOURCE=%s\nSAVED_SKIP_TORCH=%s\n' "$SOURCE" "$SKIP" > "$saved"
touch "$stamp"
echo "[setup] done: $VENV"
