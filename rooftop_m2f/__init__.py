"""rooftop-m2f: Mask2Former semantic segmentation of rooftop solar systems (Cape Town).

Importing the package applies the compatibility shims, then registers the datasets, the
meta-architecture and the evaluator with detectron2.
"""
import warnings

from . import compat

compat.apply()
# Mask2Former 0.1 and detectron2 use torch.cuda.amp.autocast and torch.jit.script, deprecated in
# torch 2.x but working; their FutureWarnings would repeat in every data-loader worker.
warnings.filterwarnings("ignore", category=FutureWarning, module=r"(mask2former|detectron2|torch\.jit)")

from .config import add_rooftop_config, get_rooftop_cfg  # noqa: E402
from . import data  # noqa: E402,F401  registers capetown_sem_seg_{train,val,test}
from . import modeling  # noqa: E402,F401  registers RooftopMaskFormer

__all__ = ["add_rooftop_config", "get_rooftop_cfg"]
