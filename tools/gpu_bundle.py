#!/usr/bin/env python
"""Gather, on a machine with network access, the Python packages that a GPU machine without
network access lacks, as wheels in the git-ignored folder ``.whl/`` (``make gpu-bundle``). Copy
``.whl/`` to the GPU machine with the working tree; ``tools/gpu_check.sh`` installs it there
offline.

    .venv/bin/python tools/gpu_bundle.py [--dest .whl] [--no-rasterio] [--check] [--max-mib 60]

The GPU machine's image (Python 3.12, torch 2.11.0+cu130) already has the packages named in
``GPU_MACHINE_HAS``; everything else the project needs is in ``BUNDLE`` (one list, in this
file; ``tests/test_gpu_bundle.py`` fails when a package of requirements.txt is in neither).
Versions come from requirements.txt where it pins the package, else from ``EXTRA_PINS``.

Wheels:
  * binary wheels for CPython 3.12 manylinux x86-64 (or pure-Python ones), ``pip download``;
  * packages published only as a source distribution (fvcore, antlr4-python3-runtime, ...):
    a pure-Python wheel built locally (``pip wheel --no-deps``);
  * sal-detectron2 0.7.2 (detectron2's Python package, a wheel tagged cp310 whose compiled _C is
    not needed): in ``.whl/cp310/``, installed with ``--python-version 3.10``
    (as tools/setup_env.sh does);
  * maskformer2 0.1 (Mask2Former's Python package, an sdist whose setup.py builds a CUDA
    extension when it sees a GPU or FORCE_CUDA): built locally as a pure-Python wheel with
    FORCE_CUDA unset and no visible GPU (our own op replaces its extension).

``--check`` (also run after gathering) proves, without the GPU machine, that the bundle installs
there: ``pip install --dry-run --no-index --target ... --python-version 3.12`` against the bundle
plus stand-in wheels of the GPU machine's own packages (``GPU_MACHINE_HAS``, empty wheels of the
same names), so a dependency that is neither bundled nor on that machine fails the resolution.
The sizes of the bundle and of the working tree (what is copied to the GPU machine) are printed;
the two together must stay under --max-mib.
"""
import argparse
import os
import re
import shutil
import subprocess
import sys
import tempfile
import zipfile
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]

# What the GPU machine's image has installed (normalised names; the versions are those of the
# image where known, else a stand-in that satisfies the bundle's requirements).
GPU_MACHINE_HAS = {
    "torch": "2.11.0", "torchvision": "0.26.0", "timm": "1.0.20",
    "opencv-python-headless": "4.12.0.88", "transformers": "5.17.0", "scipy": "1.16.0",
    "matplotlib": "3.10.0", "tensorboard": "2.20.0", "pytest": "8.4.0", "ninja": "1.13.0",
    "onnx": "1.23.1", "onnxruntime": "1.30.0",
    # their own dependencies, hence also there
    "numpy": "2.3.0", "pillow": "11.3.0", "packaging": "25.0", "pyyaml": "6.0.2",
    "tqdm": "4.67.1", "typing-extensions": "4.14.0", "pyparsing": "3.2.3",
    "tokenizers": "0.22.0", "regex": "2025.9.1", "safetensors": "0.6.2",
    "huggingface-hub": "1.0.0", "filelock": "3.19.1",
}

# Packages the project needs there that it lacks: requirements.txt names first, then what they
# depend on. Special routes: see SPECIAL.
BUNDLE = [
    "fvcore", "iopath", "yacs", "omegaconf", "hydra-core", "pycocotools", "termcolor",
    "tabulate", "cloudpickle", "shapely", "rasterio",
    # dependencies of the above that the GPU machine lacks (or may lack; all tiny)
    "antlr4-python3-runtime", "portalocker", "affine", "attrs", "certifi", "click",
    "click-plugins", "cligj",
    # detectron2 and Mask2Former themselves (tools/setup_env.sh installs them the same way)
    "sal-detectron2", "maskformer2",
]
# Needed by the project but by nothing tools/gpu_check.sh runs: tools/predict_city.py's vector
# layer (GDAL through pyogrio, PROJ through pyproj: wheels too large for --max-mib). Listed, so
# that a new requirement is still caught by tests/test_gpu_bundle.py.
NOT_FOR_THE_GPU_CHECK = {"geopandas", "pyogrio", "pyproj", "pandas"}
# Only predict.py on GeoTIFFs (gpu_check.sh's train stage) needs rasterio, the bundle's largest wheel.
OPTIONAL = {"rasterio": "--no-rasterio"}
EXTRA_PINS = {
    # the versions tools/setup_env.sh's .venv resolves to (tested together)
    "antlr4-python3-runtime": "4.9.3", "portalocker": "4.4.2", "affine": "3.0.1",
    "attrs": "26.1.0", "certifi": "2026.10.19.post1", "click": "8.5.1", "click-plugins": "1.1.1.2",
    "cligj": "0.7.2", "sal-detectron2": "0.7.2", "maskformer2": "0.1",
}
# sal-detectron2: a cp310-tagged wheel (its _C is never loaded), installed for Python 3.10.
CP310 = {"sal-detectron2"}
# sdists whose setup.py must not see a GPU or FORCE_CUDA (pure-Python wheel wanted).
NO_CUDA_BUILD = {"maskformer2"}
PLATFORM_ARGS = ["--python-version", "3.12", "--implementation", "cp",
                 "--platform", "manylinux_2_28_x86_64", "--platform", "manylinux_2_17_x86_64",
                 "--platform", "manylinux2014_x86_64"]


def normalise(name):
    return re.sub(r"[-_.]+", "-", name).lower()


def requirements(path=REPO / "requirements.txt"):
    """{normalised name: pinned version (or "")} of a requirements file."""
    pins = {}
    for line in Path(path).read_text().splitlines():
        line = line.split("#", 1)[0].strip()
        if not line:
            continue
        m = re.match(r"^([A-Za-z0-9_.\-]+)\s*(?:==\s*([^;\s]+))?", line)
        if m:
            pins[normalise(m.group(1))] = m.group(2) or ""
    return pins


def unbundled(requirement_files=(REPO / "requirements.txt", REPO / "requirements-dev.txt")):
    """Names in the requirement files that are neither bundled nor on the GPU machine (the bundle
    is out of step with them when this is not empty)."""
    names = set()
    for path in requirement_files:
        names |= set(requirements(path))
    return sorted(n for n in names
                  if n not in GPU_MACHINE_HAS and n not in BUNDLE and n not in NOT_FOR_THE_GPU_CHECK)


def bundle_pins(with_rasterio=True):
    """[(name, version)] of the bundle, versions from requirements.txt, else EXTRA_PINS."""
    pins = requirements()
    out = []
    for name in BUNDLE:
        if name in OPTIONAL and not with_rasterio:
            continue
        version = pins.get(name) or EXTRA_PINS.get(name)
        if not version:
            raise SystemExit(f"gpu_bundle: no version for {name} (requirements.txt or EXTRA_PINS)")
        out.append((name, version))
    return out


def pip(*args, env=None, check=True):
    cmd = [sys.executable, "-m", "pip", *args]
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env)
    if check and proc.returncode != 0:
        raise SystemExit(f"gpu_bundle: {' '.join(cmd)} failed ({proc.returncode}):\n"
                         f"{proc.stdout[-2000:]}\n{proc.stderr[-3000:]}")
    return proc


def wheel_name_matches(path, name, version):
    dist = path.name.split("-")
    return (len(dist) >= 2 and normalise(dist[0]) == name
            and dist[1].replace("_", "-") == version.replace("_", "-"))


def have(dest, name, version):
    return [p for p in dest.glob("*.whl") if wheel_name_matches(p, name, version)]


def fetch(dest, name, version):
    """Put a wheel of name==version for the GPU machine into dest; returns how it was got."""
    if have(dest, name, version):
        return "cached"
    if name in CP310:
        pip("download", "-q", "--no-deps", "--only-binary=:all:", "--python-version", "3.10",
            "--implementation", "cp", "--platform", "manylinux_2_17_x86_64",
            "--platform", "manylinux2014_x86_64", "-d", str(dest), f"{name}=={version}")
        return "binary (cp310)"
    if name not in NO_CUDA_BUILD:
        proc = pip("download", "-q", "--no-deps", "--only-binary=:all:", *PLATFORM_ARGS,
                   "-d", str(dest), f"{name}=={version}", check=False)
        if proc.returncode == 0:
            return "binary"
    # No wheel for the GPU machine: build a pure-Python one from the sdist, with no GPU and no
    # FORCE_CUDA in sight (maskformer2's setup.py would otherwise compile CUDA kernels).
    env = {k: v for k, v in os.environ.items() if k not in ("FORCE_CUDA", "TORCH_CUDA_ARCH_LIST")}
    env["CUDA_VISIBLE_DEVICES"] = ""
    with tempfile.TemporaryDirectory() as tmp:
        pip("wheel", "-q", "--no-deps", "--no-build-isolation", "-w", tmp, f"{name}=={version}",
            env=env)
        built = list(Path(tmp).glob("*.whl"))
        if len(built) != 1 or not built[0].name.endswith("-py3-none-any.whl"):
            raise SystemExit(f"gpu_bundle: building {name}=={version} gave {built}, expected one "
                             "pure-Python (py3-none-any) wheel")
        shutil.move(str(built[0]), dest / built[0].name)
    return "built locally (pure Python)"


def tree_bytes():
    """Bytes of the working tree copied to the GPU machine: tracked plus untracked, not ignored."""
    out = subprocess.run(["git", "ls-files", "-z", "--cached", "--others", "--exclude-standard"],
                         cwd=REPO, capture_output=True, text=True, check=True).stdout
    total = 0
    for rel in filter(None, out.split("\0")):
        p = REPO / rel
        if p.is_file() and not p.is_symlink():
            total += p.stat().st_size
    return total


def folder_bytes(path):
    return sum(p.stat().st_size for p in Path(path).rglob("*") if p.is_file())


def stub_wheel(folder, name, version):
    """An empty wheel standing for a package the GPU machine already has."""
    dist = normalise(name).replace("-", "_")
    path = Path(folder) / f"{dist}-{version}-py3-none-any.whl"
    info = f"{dist}-{version}.dist-info"
    with zipfile.ZipFile(path, "w") as z:
        z.writestr(f"{info}/METADATA", f"Metadata-Version: 2.1\nName: {name}\nVersion: {version}\n")
        z.writestr(f"{info}/WHEEL", "Wheel-Version: 1.0\nGenerator: gpu_bundle\n"
                                    "Root-Is-Purelib: true\nTag: py3-none-any\n")
        z.writestr(f"{info}/RECORD", "")
    return path


def check(dest, with_rasterio=True):
    """Dry-run installs of the bundle for the GPU machine (see the module docstring)."""
    dest = Path(dest)
    pins = bundle_pins(with_rasterio)
    missing = [f"{n}=={v}" for n, v in pins
               if not (have(dest / "cp310", n, v) if n in CP310 else have(dest, n, v))]
    if missing:
        raise SystemExit(f"gpu_bundle --check: not in {dest}: {', '.join(missing)} "
                         "(run make gpu-bundle)")
    with tempfile.TemporaryDirectory(prefix="gpu_bundle_check_") as tmp:
        stubs = Path(tmp) / "gpu_machine"
        stubs.mkdir()
        for name, version in GPU_MACHINE_HAS.items():
            stub_wheel(stubs, name, version)
        target = Path(tmp) / "site"
        # 1. Everything but the two special packages, with dependency resolution: a dependency
        #    neither bundled nor on the GPU machine fails here.
        regular = [f"{n}=={v}" for n, v in pins if n not in CP310 | NO_CUDA_BUILD]
        proc = pip("install", "--dry-run", "--no-index", "--find-links", str(dest),
                   "--find-links", str(stubs), "--target", str(target), "--only-binary=:all:",
                   *PLATFORM_ARGS, *regular, check=False)
        if proc.returncode != 0:
            raise SystemExit("gpu_bundle --check: the bundle does not install next to the GPU "
                             f"machine's packages:\n{proc.stdout[-2000:]}\n{proc.stderr[-3000:]}")
        would = re.findall(r"Would install (.*)", proc.stdout)
        installs = would[0].split() if would else []
        # (the stand-ins in that list are what the bundle relies on the GPU machine for)
        stand_ins = [w for w in installs if normalise(w.rsplit("-", 1)[0]) in GPU_MACHINE_HAS]
        installs = [w for w in installs if w not in stand_ins]
        # 2. maskformer2 (pure Python; it names detectron2 by URL, hence --no-deps) and
        #    sal-detectron2 (cp310, installed for 3.10 as tools/setup_env.sh does).
        for name, version in pins:
            if name in NO_CUDA_BUILD:
                pip("install", "--dry-run", "--no-index", "--no-deps", "--find-links", str(dest),
                    "--target", str(target), "--only-binary=:all:", *PLATFORM_ARGS,
                    f"{name}=={version}")
            elif name in CP310:
                pip("install", "--dry-run", "--no-index", "--no-deps", "--find-links",
                    str(dest / "cp310"), "--target", str(target), "--only-binary=:all:",
                    "--python-version", "3.10", "--implementation", "cp",
                    "--platform", "manylinux2014_x86_64", f"{name}=={version}")
    print(f"gpu_bundle --check: OK: {len(installs)} bundled wheels resolve for CPython 3.12 "
          "manylinux x86-64 (pip install --dry-run --no-index --target) with their remaining "
          f"dependencies taken from the GPU machine's own packages "
          f"({', '.join(sorted(normalise(w.rsplit('-', 1)[0]) for w in stand_ins))}); "
          "maskformer2 and sal-detectron2 (cp310) install --no-deps")
    return installs


def report_sizes(dest, max_mib):
    bundle, tree = folder_bytes(dest), tree_bytes()
    total = bundle + tree
    print(f"gpu_bundle: {dest}: {bundle / 2**20:.1f} MiB in {len(list(Path(dest).rglob('*.whl')))}"
          f" wheels; working tree (tracked + untracked, not ignored): {tree / 2**20:.1f} MiB; "
          f"together {total / 2**20:.1f} MiB (limit {max_mib} MiB)")
    if total > max_mib * 2**20:
        raise SystemExit(f"gpu_bundle: {total / 2**20:.1f} MiB is over {max_mib} MiB "
                         "(try --no-rasterio)")
    return bundle, tree


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--dest", default=str(REPO / ".whl"))
    ap.add_argument("--no-rasterio", action="store_true",
                    help="leave rasterio (the largest wheel) out: only predict.py on GeoTIFFs needs it")
    ap.add_argument("--check", action="store_true", help="only check an existing bundle")
    ap.add_argument("--max-mib", type=float, default=60.0,
                    help="the most the bundle and the working tree may take together (MiB)")
    ap.add_argument("--list", action="store_true", help="print the bundle's name==version list")
    args = ap.parse_args(argv)
    with_rasterio = not args.no_rasterio
    dest = Path(args.dest)
    if args.list:
        for name, version in bundle_pins(with_rasterio):
            print(f"{name}=={version}")
        return 0
    if not args.check:
        (dest / "cp310").mkdir(parents=True, exist_ok=True)
        for name, version in bundle_pins(with_rasterio):
            how = fetch(dest / "cp310" if name in CP310 else dest, name, version)
            print(f"gpu_bundle: {name}=={version}: {how}", flush=True)
        # Wheels of other versions (an older bundle) or of rasterio with --no-rasterio go.
        wanted = bundle_pins(with_rasterio)
        for wheel in list(dest.glob("*.whl")) + list((dest / "cp310").glob("*.whl")):
            if not any(wheel_name_matches(wheel, n, v) for n, v in wanted):
                wheel.unlink()
                print(f"gpu_bundle: removed {wheel.name} (not in the bundle's list)")
    check(dest, with_rasterio)
    report_sizes(dest, args.max_mib)
    return 0


if __name__ == "__main__":
    sys.exit(main())
