from .setup import build_cfg, setup_cfg  # noqa: F401
from .trainer import Trainer  # noqa: F401
