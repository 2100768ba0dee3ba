"""rooftop-m2f: a detectron2 project extension for Mask2Former on rooftop solar imagery.

The README's `make` targets are the supported install (tools/setup_env.sh creates .venv with
pinned versions and makes this checkout importable). On a GPU cluster with torch, detectron2
and Mask2Former already installed, `pip install --no-deps -e .` installs this package (and the
synthetic data generator, `capetown_synthetic`), and
`pip install --no-build-isolation ./ops` (or `make ops`) builds the MSDeformAttn op.
"""
from setuptools import find_packages, setup

setup(
    name="rooftop-m2f",
    version="0.1.0",
    description="Mask2Former (detectron2) for semantic segmentation of rooftop solar systems",
    # the synthetic data generator lives beside its script in datasets/ (not library code)
    packages=find_packages(include=["rooftop_m2f", "rooftop_m2f.*"]) + ["capetown_synthetic"],
    package_dir={"capetown_synthetic": "datasets/capetown_synthetic"},
    python_requires=">=3.10",
    install_requires=[
        "torch>=2.1", "torchvision", "numpy", "opencv-python-headless", "pillow", "scipy",
        "shapely", "rasterio", "tqdm", "matplotlib",
        # detectron2 and Mask2Former (maskformer2) are installed separately: see INSTALL.md.
    ],
)
