"""rooftop-m2f: Mask2Former semantic segmentation of rooftop solar systems (Cape Town).

Importing the package applies the compatibility shims, then registers the datasets, the
meta-architecture and the evaluator with detectron2.
"""
from . import compat

compat.apply()

from .config import add_rooftop_config, get_rooftop_cfg  # noqa: E402
from . import data  # noqa: E402,F401  registers capetown_sem_seg_{train,val,test}
from . import modeling  # noqa: E402,F401  registers RooftopMaskFormer

__all__ = ["add_rooftop_config", "get_rooftop_cfg"]
