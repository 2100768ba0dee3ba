"""``add_rooftop_config(cfg)``: every key this project adds to a detectron2 config, with its
default and what it means, and ``validate(cfg)``: the values a run can use. YAML files under
``configs/`` override the defaults."""
import ast
import difflib
import math

from detectron2.config import CfgNode as CN
from detectron2.config import get_cfg
from PIL import Image

from .classes import CLASS_NAMES, FOREGROUND_CLASSES
from .cli import ConfigError
from .reports import capacity, review

# PIL's decompression-bomb limit as PIL ships it (before any config changes it).
PIL_MAX_IMAGE_PIXELS = int(Image.MAX_IMAGE_PIXELS or 0)


def add_rooftop_config(cfg):
    """Add the ``ROOFTOP`` keys; call it after ``add_deeplab_config`` and
    ``add_maskformer2_config`` (:func:`get_rooftop_cfg` does all three)."""
    # detectron2's class count, set to this project's classes (rooftop_m2f/classes.py).
    cfg.MODEL.SEM_SEG_HEAD.NUM_CLASSES = len(CLASS_NAMES)
    cfg.ROOFTOP = CN()
    # --- data (rooftop_m2f/data/capetown.py, datasets/README.md) -----------------------------
    # Root of <ROOT>/{train,val,test}/{images,masks}; "" is $DETECTRON2_DATASETS/capetown.
    cfg.ROOFTOP.DATASET_ROOT = ""
    # The mask of images/<stem>.<ext> is masks/<re.sub(PATTERN, REPLACEMENT, stem)>.png.
    cfg.ROOFTOP.MASK_STEM_PATTERN = r"^(.*)$"
    cfg.ROOFTOP.MASK_STEM_REPLACEMENT = r"\1"
    # "png": images/ and masks/ per split; "coco": images/ and a COCO JSON per split.
    cfg.ROOFTOP.DATASET_FORMAT = "png"
    cfg.ROOFTOP.COCO = CN()
    # Each split's JSON and image folder; "" is <ROOT>/<split>/annotations.json and images/.
    cfg.ROOFTOP.COCO.TRAIN_JSON = ""
    cfg.ROOFTOP.COCO.TRAIN_IMAGES = ""
    cfg.ROOFTOP.COCO.VAL_JSON = ""
    cfg.ROOFTOP.COCO.VAL_IMAGES = ""
    cfg.ROOFTOP.COCO.TEST_JSON = ""
    cfg.ROOFTOP.COCO.TEST_IMAGES = ""
    # iscrowd objects: "ignore" paints them 255 (neither learnt nor scored), "class" their class.
    cfg.ROOFTOP.COCO.CROWD = "ignore"
    # Category names beyond the built-in synonyms, "name: class", e.g. ["roof: background"].
    cfg.ROOFTOP.COCO.CATEGORY_NAMES = []
    # predict.py --outputs coco: image ids from this COCO file (matched by file name); "" 1, 2, ...
    cfg.ROOFTOP.COCO.PREDICTION_IMAGE_IDS = ""
    # Passes over the training split; sets SOLVER.MAX_ITER at start-up (0 keeps SOLVER.MAX_ITER).
    # One epoch is ceil(training images / (SOLVER.IMS_PER_BATCH x GRAD_ACCUM_STEPS)) iterations.
    cfg.ROOFTOP.EPOCHS = 0.0
    # Evaluate every this many epochs (0 keeps TEST.EVAL_PERIOD).
    cfg.ROOFTOP.EVAL_EVERY_EPOCHS = 0.0
    # Save model_<iter>.pth every this many epochs (0 keeps SOLVER.CHECKPOINT_PERIOD).
    cfg.ROOFTOP.CHECKPOINT_EVERY_EPOCHS = 0.0
    # Decode every file of the training and test splits before training starts.
    cfg.ROOFTOP.CHECK_DATASET = True
    # Every image is resized to INPUT_SIZE x INPUT_SIZE first (0: native size; 320 variant: 320).
    cfg.ROOFTOP.INPUT_SIZE = 0
    # Images of more pixels than this are refused as possible decompression bombs (a small file
    # that decodes to gigabytes), by every tool that reads PNG / JPEG images (PIL's
    # Image.MAX_IMAGE_PIXELS; TIFFs are read by windows). Default: PIL's own limit. 0: no limit.
    cfg.ROOFTOP.MAX_IMAGE_PIXELS = PIL_MAX_IMAGE_PIXELS

    # --- augmentation, training only (rooftop_m2f/data/transforms.py) -------------------------
    cfg.ROOFTOP.AUG = CN()
    cfg.ROOFTOP.AUG.FLIP_PROB = 0.5          # horizontal and vertical flips, each
    cfg.ROOFTOP.AUG.ROT90 = True             # a random multiple of 90 degrees
    cfg.ROOFTOP.AUG.AFFINE_PROB = 0.5
    cfg.ROOFTOP.AUG.AFFINE_SCALE = (0.75, 1.25)
    cfg.ROOFTOP.AUG.AFFINE_ROTATE = 30.0     # degrees, +-
    cfg.ROOFTOP.AUG.AFFINE_SHEAR = 8.0       # degrees, +-
    cfg.ROOFTOP.AUG.ELASTIC_PROB = 0.2
    # Simard et al.: ALPHA x uniform(-1, 1) noise smoothed by a Gaussian of std SIGMA pixels.
    cfg.ROOFTOP.AUG.ELASTIC_ALPHA = 300.0
    cfg.ROOFTOP.AUG.ELASTIC_SIGMA = 12.0
    cfg.ROOFTOP.AUG.COLOR_JITTER = (0.2, 0.2, 0.2, 0.02)  # brightness, contrast, saturation, hue

    # --- model ---------------------------------------------------------------------------------
    # Multi-scale deformable attention: "auto" (the compiled op, else the PyTorch reference with
    # a warning), "compiled" (fail without the op) or "pytorch".
    cfg.ROOFTOP.MSDEFORM_ATTN_IMPL = "auto"
    # Run the pixel decoder under the caller's autocast instead of float32 (norms, softmax,
    # sampling locations and loss stay float32; rooftop_m2f/modeling/precision.py).
    cfg.ROOFTOP.PIXEL_DECODER_AUTOCAST = False
    cfg.ROOFTOP.LOSS = CN()
    # Per-class weights of the classification cross-entropy, background first; [] keeps 1 each.
    cfg.ROOFTOP.LOSS.PER_CLASS_WEIGHTS = []
    # Repeat images with rare classes: r(c) = max(1, sqrt(T / f(c))), f(c) the fraction of
    # training images with class c; an image is repeated max over its classes (0: off).
    cfg.ROOFTOP.REPEAT_THRESHOLD = 0.0
    # MODEL.WEIGHTS: load only backbone.* (True) or everything that fits (False).
    cfg.ROOFTOP.LOAD_BACKBONE_ONLY = False

    # --- checkpoints, logs and stopping (rooftop_m2f/engine/) -----------------------------------
    # On these signals training saves model_<iter>.pth at the end of the iteration and exits
    # with status 128 + signal (143 for SIGTERM); --resume continues. []: off.
    cfg.ROOFTOP.STOP_SIGNALS = ["SIGTERM"]
    # Seconds a data-loader worker may take for one batch (with DATALOADER.NUM_WORKERS > 0; 0: wait).
    cfg.ROOFTOP.LOADER_TIMEOUT_S = 600.0
    # Keep this many best checkpoints by BEST_CHECKPOINT_METRIC (0: none).
    cfg.ROOFTOP.BEST_CHECKPOINT_TOPK = 3
    # The validation scalar, as detectron2's EvalHook stores it, that ranks them; higher is better.
    cfg.ROOFTOP.BEST_CHECKPOINT_METRIC = "sem_seg/macro_fg_mIoU"
    # Write train_epoch.csv, valid_epoch.csv and metrics_epoch_per_class.csv.
    cfg.ROOFTOP.CSV_LOGS = True

    # --- training options, each off by default (docs/ADVANCED.md, "Training options") ---------------------
    # EMA of the weights, decay_t = min(DECAY, (1 + t) / (10 + t)); evaluations, best checkpoints
    # and the "model" of model_final / model_best* use it ("model_raw": the trained weights).
    cfg.ROOFTOP.EMA = CN()
    cfg.ROOFTOP.EMA.ENABLED = False
    cfg.ROOFTOP.EMA.DECAY = 0.9998
    # Stop after PATIENCE evaluations in a row without BEST_CHECKPOINT_METRIC improving by more
    # than MIN_DELTA (0: off).
    cfg.ROOFTOP.EARLY_STOP = CN()
    cfg.ROOFTOP.EARLY_STOP.PATIENCE = 0
    cfg.ROOFTOP.EARLY_STOP.MIN_DELTA = 0.0
    # Batches of SOLVER.IMS_PER_BATCH per optimizer step (an iteration); 1: off.
    cfg.ROOFTOP.GRAD_ACCUM_STEPS = 1
    # Label smoothing eps of the matched queries' classification loss (0: off).
    cfg.ROOFTOP.LABEL_SMOOTHING = 0.0
    # Swin stage s of S learns at lr * LAYER_DECAY ** (S - s), the patch embedding at
    # lr * LAYER_DECAY ** S (1.0: off).
    cfg.ROOFTOP.LAYER_DECAY = 1.0
    # A profiler trace of NUM_ITERS iterations from START_ITER (OUTPUT_DIR/log/, profiler-top-ops-*).
    cfg.ROOFTOP.PROFILE = CN()
    cfg.ROOFTOP.PROFILE.ENABLED = False
    cfg.ROOFTOP.PROFILE.START_ITER = 5
    cfg.ROOFTOP.PROFILE.NUM_ITERS = 3

    # --- prediction (tools/predict.py, rooftop_m2f/inference/) ----------------------------------
    # Metres per pixel for areas of images without a georeference (Cape Town imagery: 8 cm).
    cfg.ROOFTOP.GSD = 0.08
    # Test-time augmentation views averaged with the identity: "hflip", "vflip", "rot90".
    cfg.ROOFTOP.TTA = []
    # Sliding-window inference.
    cfg.ROOFTOP.TILE = CN()
    cfg.ROOFTOP.TILE.SIZE = 1024             # window side, image pixels
    cfg.ROOFTOP.TILE.OVERLAP = 256           # pixels; scores are blended across it
    # "auto": tile images larger than SIZE; "never": one pass whatever the size.
    cfg.ROOFTOP.TILE.MODE = "auto"
    cfg.ROOFTOP.TILE.BATCH_SIZE = 1          # windows per forward pass (tools/predict_city.py)

    # --- city-scale prediction (tools/predict_city.py, rooftop_m2f/inference/city.py) ------------
    cfg.ROOFTOP.CITY = CN()
    # Inputs larger than this on a side are predicted in parts of about this size (0: whole).
    cfg.ROOFTOP.CITY.PART_SIZE = 8192
    # Installations smaller than this (m^2, per class, background first) are dropped as speckle.
    cfg.ROOFTOP.CITY.MIN_AREA_M2 = [0.0, 0.05, 0.25, 0.15]
    # Douglas-Peucker tolerance of the outlines, metres (0: exact pixel outlines).
    cfg.ROOFTOP.CITY.SIMPLIFY_M = 0.04
    # These classes' outlines become their minimum rotated rectangle when they fill at least
    # RECTANGLE_MIN_FILL of it.
    cfg.ROOFTOP.CITY.RECTANGLE_CLASSES = [1]
    cfg.ROOFTOP.CITY.RECTANGLE_MIN_FILL = 0.9
    # Estimated PV capacity per m^2 of panel area seen from above, kWp (peak power at standard
    # test conditions, 1000 W/m^2): module efficiency ~20-21 % (Fraunhofer ISE, "Photovoltaics
    # Report", 2023: average commercial wafer-based modules ~21 %) gives ~0.2 kWp/m^2. An
    # estimate: tilted panels have more area than their footprint, frames and gaps less. The
    # layer's est_kwp_low / est_kwp_high use the LOW and HIGH densities (0.15: ~16 % modules
    # with gaps; 0.25: ~22 % modules on a roof pitched ~26 deg; sources in
    # rooftop_m2f/reports/capacity.py).
    cfg.ROOFTOP.CITY.KWP_PER_M2 = capacity.KWP_PER_M2
    cfg.ROOFTOP.CITY.KWP_PER_M2_LOW = capacity.KWP_PER_M2_LOW
    cfg.ROOFTOP.CITY.KWP_PER_M2_HIGH = capacity.KWP_PER_M2_HIGH
    # The layer's review flag (rooftop_m2f/reports/review.py): installations below this
    # confidence, or with an area (m^2, per class: background, solar_panel, solar_water_heater,
    # solar_pool_heater) below REVIEW_MIN_AREA_M2 or above REVIEW_MAX_AREA_M2 (a water heater of
    # 40 m^2 is not one), are flagged for a reviewer.
    cfg.ROOFTOP.CITY.REVIEW_MIN_CONFIDENCE = review.MIN_CONFIDENCE
    cfg.ROOFTOP.CITY.REVIEW_MIN_AREA_M2 = [0.0] + [review.AREA_BOUNDS_M2[c][0]
                                                   for c in FOREGROUND_CLASSES]
    cfg.ROOFTOP.CITY.REVIEW_MAX_AREA_M2 = [0.0] + [review.AREA_BOUNDS_M2[c][1]
                                                   for c in FOREGROUND_CLASSES]
    return cfg


# The values a run can use, checked by :func:`validate` before anything runs. A rule is "> x",
# ">= x", "< x", "<= x" or an interval "in [a, b]" / "in [a, b)" (for a list: each element), or
# a tuple of the allowed strings.
VALUE_RULES = (
    ("SOLVER.BASE_LR", "> 0"),
    ("SOLVER.IMS_PER_BATCH", ">= 1"),
    ("SOLVER.MAX_ITER", ">= 1"),
    ("SOLVER.CHECKPOINT_PERIOD", ">= 1"),
    ("SOLVER.WARMUP_ITERS", ">= 0"),
    ("SOLVER.WARMUP_FACTOR", "in [0, 1]"),
    ("SOLVER.WEIGHT_DECAY", ">= 0"),
    ("SOLVER.BACKBONE_MULTIPLIER", ">= 0"),
    ("SOLVER.CLIP_GRADIENTS.CLIP_VALUE", "> 0"),
    ("TEST.EVAL_PERIOD", ">= 0"),
    ("DATALOADER.NUM_WORKERS", ">= 0"),
    ("INPUT.CROP.SIZE", "> 0"),
    ("MODEL.SEM_SEG_HEAD.NUM_CLASSES", ">= 1"),
    ("MODEL.SEM_SEG_HEAD.IGNORE_VALUE", "in [0, 255]"),
    ("MODEL.MASK_FORMER.NUM_OBJECT_QUERIES", ">= 1"),
    ("MODEL.MASK_FORMER.DEC_LAYERS", ">= 1"),
    ("ROOFTOP.DATASET_FORMAT", ("png", "coco")),
    ("ROOFTOP.COCO.CROWD", ("ignore", "class")),
    ("ROOFTOP.EPOCHS", ">= 0"),
    ("ROOFTOP.EVAL_EVERY_EPOCHS", ">= 0"),
    ("ROOFTOP.CHECKPOINT_EVERY_EPOCHS", ">= 0"),
    ("ROOFTOP.INPUT_SIZE", ">= 0"),
    ("ROOFTOP.MAX_IMAGE_PIXELS", ">= 0"),
    ("ROOFTOP.AUG.FLIP_PROB", "in [0, 1]"),
    ("ROOFTOP.AUG.AFFINE_PROB", "in [0, 1]"),
    ("ROOFTOP.AUG.AFFINE_SCALE", "> 0"),
    ("ROOFTOP.AUG.AFFINE_ROTATE", ">= 0"),
    ("ROOFTOP.AUG.AFFINE_SHEAR", ">= 0"),
    ("ROOFTOP.AUG.ELASTIC_PROB", "in [0, 1]"),
    ("ROOFTOP.AUG.ELASTIC_ALPHA", ">= 0"),
    ("ROOFTOP.AUG.ELASTIC_SIGMA", "> 0"),
    ("ROOFTOP.AUG.COLOR_JITTER", ">= 0"),
    ("ROOFTOP.MSDEFORM_ATTN_IMPL", ("auto", "compiled", "pytorch")),
    ("ROOFTOP.LOSS.PER_CLASS_WEIGHTS", ">= 0"),
    ("ROOFTOP.REPEAT_THRESHOLD", "in [0, 1]"),
    ("ROOFTOP.LOADER_TIMEOUT_S", ">= 0"),
    ("ROOFTOP.BEST_CHECKPOINT_TOPK", ">= 0"),
    ("ROOFTOP.EMA.DECAY", "in (0, 1)"),
    ("ROOFTOP.EARLY_STOP.PATIENCE", ">= 0"),
    ("ROOFTOP.EARLY_STOP.MIN_DELTA", ">= 0"),
    ("ROOFTOP.GRAD_ACCUM_STEPS", ">= 1"),
    ("ROOFTOP.LABEL_SMOOTHING", "in [0, 1)"),
    ("ROOFTOP.LAYER_DECAY", "in (0, 1]"),
    ("ROOFTOP.PROFILE.START_ITER", ">= 0"),
    ("ROOFTOP.PROFILE.NUM_ITERS", ">= 1"),
    ("ROOFTOP.GSD", "> 0"),
    ("ROOFTOP.TILE.SIZE", ">= 1"),
    ("ROOFTOP.TILE.OVERLAP", ">= 0"),
    ("ROOFTOP.TILE.MODE", ("auto", "never")),
    ("ROOFTOP.TILE.BATCH_SIZE", ">= 1"),
    ("ROOFTOP.CITY.PART_SIZE", ">= 0"),
    ("ROOFTOP.CITY.MIN_AREA_M2", ">= 0"),
    ("ROOFTOP.CITY.SIMPLIFY_M", ">= 0"),
    ("ROOFTOP.CITY.RECTANGLE_CLASSES", f"in [0, {len(CLASS_NAMES) - 1}]"),
    ("ROOFTOP.CITY.RECTANGLE_MIN_FILL", "in [0, 1]"),
    ("ROOFTOP.CITY.KWP_PER_M2", "> 0"),
)
# Keys that hold one value per class (background first); empty is allowed where it is a default.
PER_CLASS_KEYS = (("ROOFTOP.LOSS.PER_CLASS_WEIGHTS", True), ("ROOFTOP.CITY.MIN_AREA_M2", False))
DATASET_KEYS = ("DATASETS.TRAIN", "DATASETS.TEST")

_COMPARE = {">": lambda v, x: v > x, ">=": lambda v, x: v >= x,
            "<": lambda v, x: v < x, "<=": lambda v, x: v <= x}


def _allowed(value, rule) -> bool:
    if isinstance(rule, tuple):
        return value in rule
    if isinstance(value, (list, tuple)):
        return all(_allowed(v, rule) for v in value)
    if isinstance(value, bool) or not isinstance(value, (int, float)) or math.isnan(value):
        return False
    if rule.startswith("in "):
        lo, hi = (float(x) for x in rule[4:-1].split(","))
        return ((lo <= value) if rule[3] == "[" else (lo < value)) and \
            ((value <= hi) if rule[-1] == "]" else (value < hi))
    op, bound = rule.split()
    return _COMPARE[op](value, float(bound))


def _get(cfg, key):
    node = cfg
    for part in key.split("."):
        node = node[part]
    return node


def validate(cfg):
    """Refuse, with a :class:`~rooftop_m2f.cli.ConfigError` naming the key, its value and the
    allowed range, a config that cannot run as asked: a value outside :data:`VALUE_RULES`, a
    per-class list of the wrong length, a tile overlap not smaller than the tile. Then apply
    ``ROOFTOP.MAX_IMAGE_PIXELS`` to PIL (one limit per process). Returns ``cfg``; called once by
    the tools' config set-up (:func:`check_dataset_names` after the splits are registered)."""
    for key, rule in VALUE_RULES:
        value = _get(cfg, key)
        if not _allowed(value, rule):
            allowed = (f"one of {', '.join(map(str, rule))}" if len(rule) > 1 else str(rule[0])) \
                if isinstance(rule, tuple) else \
                ("each " if isinstance(value, (list, tuple)) else "") + rule
            raise ConfigError(f"{key} {_show(value)}: must be {allowed}")
    for key, may_be_empty in PER_CLASS_KEYS:
        value = _get(cfg, key)
        # the loss weighs the model's classes; the city layer has this project's classes
        classes = cfg.MODEL.SEM_SEG_HEAD.NUM_CLASSES if key.startswith("ROOFTOP.LOSS") \
            else len(CLASS_NAMES)
        if len(value) != classes and not (may_be_empty and not value):
            names = f" ({', '.join(CLASS_NAMES)})" if classes == len(CLASS_NAMES) else ""
            raise ConfigError(f"{key} {_show(value)}: must have one value per class, {classes}"
                              f"{names}{', or be empty' if may_be_empty else ''}")
    tile = cfg.ROOFTOP.TILE
    if tile.OVERLAP >= tile.SIZE:
        raise ConfigError(f"ROOFTOP.TILE.OVERLAP {tile.OVERLAP}: must be < ROOFTOP.TILE.SIZE "
                          f"({tile.SIZE})")
    Image.MAX_IMAGE_PIXELS = int(cfg.ROOFTOP.MAX_IMAGE_PIXELS) or None
    return cfg


def check_dataset_names(cfg):
    """The names in ``DATASETS.TRAIN``/``TEST`` are registered (after the splits are), else a
    :class:`~rooftop_m2f.cli.ConfigError` with the closest registered name."""
    from detectron2.data import DatasetCatalog

    registered = list(DatasetCatalog.list())
    for key in DATASET_KEYS:
        for name in _get(cfg, key):
            if name not in registered:
                near = difflib.get_close_matches(name, registered, n=1, cutoff=0.6)
                hint = f"; did you mean {near[0]}?" if near else \
                    f" (registered: {', '.join(n for n in registered if n.startswith('capetown'))})"
                raise ConfigError(f"{key}: {name!r} is not a registered dataset{hint}")


def ints_as_floats(tree, defaults):
    """A YAML file's nested dict with an integer given for a key whose default is a float read
    as that number (``BASE_LR: 1`` is 1.0); yacs would refuse the type."""
    for key, value in tree.items():
        default = defaults.get(key) if isinstance(defaults, dict) else None
        if isinstance(value, dict):
            ints_as_floats(value, default)
        elif isinstance(default, float) and type(value) is int:
            tree[key] = float(value)
    return tree


def opts_ints_as_floats(opts, cfg):
    """``KEY VALUE`` overrides with :func:`ints_as_floats`' rule (``SOLVER.BASE_LR 1``)."""
    opts = list(opts)
    for i in range(0, len(opts) - 1, 2):
        try:
            default, value = _get(cfg, opts[i]), ast.literal_eval(opts[i + 1])
        except (KeyError, ValueError, SyntaxError):
            continue  # not a key, or a string: yacs reports it
        if isinstance(default, float) and type(value) is int:
            opts[i + 1] = repr(float(value))
    return opts


def _show(value):
    return str(list(value)) if isinstance(value, (list, tuple)) else repr(value)


def get_rooftop_cfg():
    """A fresh detectron2 config with the DeepLab, Mask2Former and rooftop keys."""
    from . import compat

    compat.apply()
    from detectron2.projects.deeplab import add_deeplab_config
    from mask2former import add_maskformer2_config

    cfg = get_cfg()
    add_deeplab_config(cfg)
    add_maskformer2_config(cfg)
    return add_rooftop_config(cfg)
