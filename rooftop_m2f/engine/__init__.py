from .. import compat as _compat

_compat.apply()  # before detectron2 / Mask2Former modules are imported
from .launch import launch  # noqa: F401,E402
from .setup import build_cfg, setup  # noqa: F401,E402
from .trainer import Trainer  # noqa: F401,E402
