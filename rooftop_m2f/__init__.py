"""rooftop-m2f: Mask2Former semantic segmentation of rooftop solar systems (Cape Town).

Importing the package itself is light (the command-line tools answer ``--help`` without torch).
Its subpackages register what they hold with detectron2 when imported: ``rooftop_m2f.data`` the
datasets, ``rooftop_m2f.modeling`` the meta-architecture and decoders, ``rooftop_m2f.evaluation``
the evaluator; each applies the compatibility shims (:mod:`rooftop_m2f.compat`) first.
``from rooftop_m2f import add_rooftop_config`` (or :func:`register`) registers everything.
"""
from .cli import quiet_third_party_warnings

quiet_third_party_warnings()

__all__ = ["add_rooftop_config", "get_rooftop_cfg", "register"]


def register():
    """Apply the shims and register datasets, models and the evaluator (idempotent)."""
    from . import compat

    compat.apply()
    from . import data, evaluation, modeling  # noqa: F401


def __getattr__(name):
    if name in ("add_rooftop_config", "get_rooftop_cfg"):
        register()
        from . import config

        return getattr(config, name)
    raise AttributeError(f"module 'rooftop_m2f' has no attribute {name!r}")
