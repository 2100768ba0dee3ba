#!/usr/bin/env bash
# Create (or reuse) the project's virtual environment. Idempotent: a stamp file records the
# hash of the requirements files and this script; when both are unchanged nothing is reinstalled.
#
#   VENV=.venv                      where the environment lives
#   DETECTRON2_SOURCE=pypi|git      pypi (default): the sal-detectron2 wheel + maskformer2 sdist
#                                   git: upstream detectron2 and Mask2Former from GitHub
#   SKIP_TORCH=1                    keep the torch/torchvision already in $VENV (GPU clusters)
#
# Neither Mask2Former route builds a compiled extension: the MultiScaleDeformableAttention op
# is ours (ops/, `make ops`), whatever FORCE_CUDA says and whether or not a GPU is visible.
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
# Make this checkout importable: the package (repo root), the compiled op (ops/, built by
# `make ops`) and the synthetic data generator (datasets/capetown_synthetic). Equivalent to an
# editable install, without copying anything. Cheap, so written on every run, also when the
# stamp says the packages are up to date.
write_checkout_pth() {
  local site
  site=$("$VENV/bin/python" -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])')
  printf '%s\n' "$PWD" "$PWD/ops" "$PWD/datasets" > "$site/rooftop_m2f_checkout.pth"
}
if [ -f "$stamp" ]; then
  write_checkout_pth
  exit 0
fi

step="start"
hint=""
on_error() {
  echo "[setup] FAILED at step: $step" >&2
  [ -n "$hint" ] && echo "[setup] try: $hint" >&2
  echo "[setup] nothing was marked done; run the same command again after fixing this (it resumes)" >&2
}
trap on_error ERR

if [ -x "$VENV/bin/python" ]; then
  echo "[setup] updating $VENV (requirements or this script changed)"
else
  step="create the virtual environment with $PYTHON"
  hint="install Python 3.11 with venv (Debian: apt-get install python3-venv), or PYTHON=/path/to/python3.11 make ..."
  echo "[setup] creating $VENV (torch CUDA build: about 5.5 GB)"
  "$PYTHON" -m venv "$VENV"
fi
pip="$VENV/bin/python -m pip"
# pip 26 refuses PyPI packages that name a dependency by URL even with --no-deps, which is how
# maskformer2 names detectron2; 25.0 installs it.
step="pin pip 25.0, setuptools, wheel"
hint="check that PyPI is reachable (pip config list; PIP_INDEX_URL)"
$pip install -q "pip==25.0" "setuptools>=70" wheel
step="install requirements.txt and requirements-dev.txt"
hint="check that PyPI is reachable and has room for ~6 GB (df -h); SKIP_TORCH=1 keeps a torch you installed first"
if [ "$SKIP" = 1 ]; then
  grep -v -E '^(torch|torchvision)==' requirements.txt > "$VENV/requirements-no-torch.txt"
  $pip install -q -r "$VENV/requirements-no-torch.txt" -r requirements-dev.txt
else
  $pip install -q -r requirements.txt -r requirements-dev.txt
fi
site=$("$VENV/bin/python" -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])')
if [ "$SOURCE" = git ]; then
  step="install detectron2 from GitHub"
  hint="this route needs github.com and a C++ compiler; on machines that only reach PyPI use the default DETECTRON2_SOURCE=pypi"
  $pip install -q --no-build-isolation 'git+https://github.com/facebookresearch/detectron2.git'
  # Upstream Mask2Former is a source tree, not an installable package (its setup.py lists no
  # packages): clone it and put it on the path; its own ops/ extension is never built.
  step="clone Mask2Former from GitHub"
  rm -rf "$VENV/src/Mask2Former"
  mkdir -p "$VENV/src"
  git clone -q --depth 1 https://github.com/facebookresearch/Mask2Former.git "$VENV/src/Mask2Former"
  printf '%s\n' "$PWD/$VENV/src/Mask2Former" > "$site/mask2former_source.pth"
else
  # detectron2 is not on PyPI from its authors. sal-detectron2 0.7.2 is a late-2024 snapshot of
  # its Python package tagged cp310; its compiled _C never loads on 3.11 and is not needed here.
  step="install detectron2 (sal-detectron2==0.7.2 wheel)"
  $pip install -q --no-deps --upgrade --target "$site" --python-version 3.10 \
    --implementation cp --only-binary=:all: sal-detectron2==0.7.2
  # maskformer2 0.1 is upstream Mask2Former's Python package. It names detectron2 by URL (pip
  # refuses) and its setup.py imports torch, hence --no-deps --no-build-isolation. Its setup.py
  # builds a CUDA extension from sources the sdist lacks whenever FORCE_CUDA is set or torch sees
  # a GPU: build it with neither (FORCE_CUDA unset, no visible device), and never from pip's
  # wheel cache, so a wheel built elsewhere cannot hide a broken build.
  step="install maskformer2==0.1 (pure Python, no extension)"
  hint="this step must not see FORCE_CUDA or a GPU; report the lines above"
  env -u FORCE_CUDA CUDA_VISIBLE_DEVICES= $pip install -q --no-cache-dir --no-deps \
    --no-build-isolation maskformer2==0.1
fi
step="check the installed packages import"
hint="rm -rf $VENV and run the command again"
"$VENV/bin/python" -c "import importlib.util as u, detectron2, torch; assert u.find_spec('mask2former'), 'mask2former not found'"
write_checkout_pth
rm -f "$VENV"/.rooftop-setup-*
printf 'SAVED_SOURCE=%s\nSAVED_SKIP_TORCH=%s\n' "$SOURCE" "$SKIP" > "$saved"
touch "$stamp"
echo "[setup] done: $VENV"
