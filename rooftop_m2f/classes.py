"""The Cape Town classes: names, indices and colours, as plain data.

A light module (no detectron2, no torch), so that the synthetic generator
(datasets/capetown_synthetic) and the tools' ``--help`` can use them;
:mod:`rooftop_m2f.data.capetown` re-exports them with the dataset's registration.
"""
CLASS_NAMES = ("background", "solar_panel", "solar_water_heater", "solar_pool_heater")
FOREGROUND_CLASSES = (1, 2, 3)
IGNORE_LABEL = 255
# RGB colour of each class in colour masks (ours and the ones we decode); ignore is white.
PALETTE = ((0, 0, 0), (255, 0, 0), (0, 255, 0), (0, 0, 255))
IGNORE_COLOR = (255, 255, 255)
