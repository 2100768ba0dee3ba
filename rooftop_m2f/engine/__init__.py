from .. import compat as _compat

_compat.apply()  # before detectron2 / Mask2Former modules are imported
from .setup import build_cfg, setup_cfg  # noqa: F401
from .trainer import Trainer  # noqa: F401
