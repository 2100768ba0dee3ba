"""The classes of the Cape Town rooftop-solar data: names, indices, palette, and their prose.

Plain data, importable without torch or numpy (``rooftop_m2f.data.capetown`` re-exports it), so
that the synthetic generator (datasets/capetown_synthetic), the tools' ``--help`` and the
outputs' descriptions are written from these constants.
"""
CLASS_NAMES = ("background", "solar_panel", "solar_water_heater", "solar_pool_heater")
FOREGROUND_CLASSES = (1, 2, 3)
IGNORE_LABEL = 255
# RGB colour of each class in colour masks (ours and the ones we decode); ignore is white.
PALETTE = ((0, 0, 0), (255, 0, 0), (0, 255, 0), (0, 0, 255))
IGNORE_COLOR = (255, 255, 255)

# Names of the colours used above, for prose (a colour without a name is written as its RGB).
_COLOR_NAMES = {(0, 0, 0): "black", (255, 0, 0): "red", (0, 255, 0): "green",
                (0, 0, 255): "blue", (255, 255, 255): "white"}


def color_name(rgb) -> str:
    return _COLOR_NAMES.get(tuple(rgb), str(tuple(rgb)))


def class_indices_prose() -> str:
    """``"0 background, 1 solar_panel, ..."``."""
    return ", ".join(f"{index} {name}" for index, name in enumerate(CLASS_NAMES))


def palette_prose(with_rgb: bool = False) -> str:
    """``"background black, solar_panel red, ..."`` (with ``with_rgb``, each colour's RGB
    after its name)."""
    return ", ".join(f"{name} {color_name(rgb)}" + (f" {tuple(rgb)}" if with_rgb else "")
                     for name, rgb in zip(CLASS_NAMES, PALETTE))
