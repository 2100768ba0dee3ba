"""``add_rooftop_config(cfg)``: every knob this project adds to a detectron2 config.

Call it after ``add_deeplab_config`` and ``add_maskformer2_config`` (``get_rooftop_cfg`` does
all three). Each key has its default and a comment; YAML files under ``configs/`` override them.
Renamed keys (``RENAMED_KEYS``) are still read under their old names, with a warning.
"""
import ast
import difflib
import logging
import math

from detectron2.config import CfgNode as CN
from detectron2.config import get_cfg
from PIL import Image

from .classes import CLASS_NAMES
from .cli import ConfigError

from .classes import FOREGROUND_CLASSES
from .reports import capacity, review

logger = logging.getLogger(__name__)

# PIL's decompression-bomb limit as PIL ships it (before any config changes it).
PIL_MAX_IMAGE_PIXELS = int(Image.MAX_IMAGE_PIXELS or 0)

# Renamed keys, old name -> new name. The old names are read as the new ones, in YAML files and
# in KEY VALUE overrides, with a warning; they will stop being accepted in a later release.
RENAMED_KEYS = {
    "ROOFTOP.AUG.RESIZE": "ROOFTOP.INPUT_SIZE",
    "ROOFTOP.TILE.TTA": "ROOFTOP.TTA",
    "ROOFTOP.CLASS_WEIGHTS": "ROOFTOP.LOSS.PER_CLASS_WEIGHTS",
}


def add_rooftop_config(cfg):
    # detectron2's class count, set to this project's classes (rooftop_m2f/classes.py).
    cfg.MODEL.SEM_SEG_HEAD.NUM_CLASSES = len(CLASS_NAMES)
    cfg.ROOFTOP = CN()
    # --- data -----------------------------------------------------------------------------
    # Root of the Cape Town layout: <ROOT>/{train,val,test}/{images,masks}.
    # "" means $DETECTRON2_DATASETS/capetown (detectron2's convention; default ./datasets).
    cfg.ROOFTOP.DATASET_ROOT = ""
    # How a mask file is found for an image: the image stem is rewritten with re.sub(PATTERN,
    # REPLACEMENT, stem) and the mask is <masks>/<result>.png. The default keeps the stem,
    # e.g. i_2023_RGB_8cm_W16C_20_4_4.png -> masks/i_2023_RGB_8cm_W16C_20_4_4.png.
    cfg.ROOFTOP.MASK_STEM_PATTERN = r"^(.*)$"
    cfg.ROOFTOP.MASK_STEM_REPLACEMENT = r"\1"
    # "png": <ROOT>/<split>/{images,masks} (above). "coco": <ROOT>/<split>/images and a COCO JSON
    # (polygons / RLE) per split, rasterised to the same masks (rooftop_m2f/data/coco.py).
    cfg.ROOFTOP.DATASET_FORMAT = "png"
    cfg.ROOFTOP.COCO = CN()
    # Each split's JSON and image folder; "" = <ROOT>/<split>/annotations.json, <ROOT>/<split>/images.
    cfg.ROOFTOP.COCO.TRAIN_JSON = ""
    cfg.ROOFTOP.COCO.TRAIN_IMAGES = ""
    cfg.ROOFTOP.COCO.VAL_JSON = ""
    cfg.ROOFTOP.COCO.VAL_IMAGES = ""
    cfg.ROOFTOP.COCO.TEST_JSON = ""
    cfg.ROOFTOP.COCO.TEST_IMAGES = ""
    # iscrowd objects: "ignore" paints them 255 (not learnt, not scored), "class" their class.
    cfg.ROOFTOP.COCO.CROWD = "ignore"
    # Category names beyond the built-in synonyms, "name: class", e.g. ["roof: background"].
    cfg.ROOFTOP.COCO.CATEGORY_NAMES = []
    # tools/predict.py --outputs coco: take the image ids from this COCO file's images, matched
    # by file base name (to evaluate against it); "" numbers the images 1, 2, ... in order.
    cfg.ROOFTOP.COCO.PREDICTION_IMAGE_IDS = ""
    # Train for this many passes over the training split; converted to SOLVER.MAX_ITER =
    # ceil(EPOCHS * ceil(images / SOLVER.IMS_PER_BATCH)) at start-up (0 keeps SOLVER.MAX_ITER).
    cfg.ROOFTOP.EPOCHS = 0.0
    # Evaluate (and consider a best checkpoint) every this many epochs (0 keeps TEST.EVAL_PERIOD).
    cfg.ROOFTOP.EVAL_EVERY_EPOCHS = 0.0
    # Save model_<iter>.pth every this many epochs (0 keeps SOLVER.CHECKPOINT_PERIOD).
    # One epoch is ceil(training images / SOLVER.IMS_PER_BATCH) iterations, for all of these
    # keys and the CSV epochs (rooftop_m2f/engine/epochs.py).
    cfg.ROOFTOP.CHECKPOINT_EVERY_EPOCHS = 0.0
    # Check every file of the training and test splits before training starts.
    cfg.ROOFTOP.CHECK_DATASET = True

    # The model's input size: every image (training, evaluation, prediction) is resized to
    # INPUT_SIZE x INPUT_SIZE before anything else; 0 keeps the native size. The 320x320
    # variant uses 320; predictions are resized back to the original. (Was ROOFTOP.AUG.RESIZE.)
    cfg.ROOFTOP.INPUT_SIZE = 0
    # Images of more pixels than this are refused as possible decompression bombs (a small file
    # that decodes to gigabytes), by every tool that reads PNG / JPEG images (PIL's
    # Image.MAX_IMAGE_PIXELS; TIFFs are read by windows). Default: PIL's own limit. 0: no limit.
    cfg.ROOFTOP.MAX_IMAGE_PIXELS = PIL_MAX_IMAGE_PIXELS

    # --- augmentation (training only; see rooftop_m2f/data/transforms.py) ---------------------
    cfg.ROOFTOP.AUG = CN()
    cfg.ROOFTOP.AUG.FLIP_PROB = 0.5          # horizontal and vertical flips, each
    cfg.ROOFTOP.AUG.ROT90 = True             # random multiple of 90 degrees (no upright)
    cfg.ROOFTOP.AUG.AFFINE_PROB = 0.5
    cfg.ROOFTOP.AUG.AFFINE_SCALE = (0.75, 1.25)
    cfg.ROOFTOP.AUG.AFFINE_ROTATE = 30.0     # degrees, +-
    cfg.ROOFTOP.AUG.AFFINE_SHEAR = 8.0       # degrees, +-
    cfg.ROOFTOP.AUG.ELASTIC_PROB = 0.2
    cfg.ROOFTOP.AUG.ELASTIC_ALPHA = 300.0    # field strength (see below)
    cfg.ROOFTOP.AUG.ELASTIC_SIGMA = 12.0     # smoothness of the displacement field, pixels
    # (Simard et al. convention: field = ALPHA x uniform(-1, 1) noise smoothed by a Gaussian of
    # std SIGMA; RMS displacement ~ ALPHA / (SIGMA * 6.14) px, i.e. ~4 px (32 cm) for 300 and 12.)
    cfg.ROOFTOP.AUG.COLOR_JITTER = (0.2, 0.2, 0.2, 0.02)  # brightness, contrast, saturation, hue
    # INPUT.CROP.SIZE (detectron2's key) is the training crop; padding uses the ignore label.
    # The crop is applied when INPUT.CROP.ENABLED, with INPUT.CROP.TYPE "absolute" (pixels).

    # --- model ----------------------------------------------------------------------------
    # Multi-scale deformable attention implementation: "auto" (compiled op when importable,
    # else the PyTorch reference, with a warning), "compiled" (fail when the op is missing),
    # or "pytorch" (always the reference).
    cfg.ROOFTOP.MSDEFORM_ATTN_IMPL = "auto"
    # Run the pixel decoder (and our op) under the caller's autocast, bfloat16 or float16
    # (AMP training, autocast inference), instead of Mask2Former's float32 pixel decoder. Norms,
    # the attention-weight softmax, the sampling locations and the loss stay float32; with
    # bfloat16 the op computes in float32 (see rooftop_m2f/modeling/precision.py). False keeps
    # the pixel decoder float32 on every device. Off until measured on a GPU (issue 13).
    cfg.ROOFTOP.PIXEL_DECODER_AUTOCAST = False
    cfg.ROOFTOP.LOSS = CN()
    # Per-class weights inside the classification loss's cross-entropy (one per class,
    # background first; not MODEL.MASK_FORMER.CLASS_WEIGHT, the weight of that whole loss);
    # empty keeps Mask2Former's default (1 for every class, MASK_FORMER.NO_OBJECT_WEIGHT for
    # no-object). (Was ROOFTOP.CLASS_WEIGHTS.)
    cfg.ROOFTOP.LOSS.PER_CLASS_WEIGHTS = []
    # Oversample images that contain rare classes (detectron2's repeat-factor idea applied to
    # semantic classes; rooftop_m2f/data/sampler.py). With f(c) the fraction of training images
    # containing class c: r(c) = max(1, sqrt(REPEAT_THRESHOLD / f(c))); an image is repeated
    # max over its classes of r(c) times per epoch (fractions stochastically). 0 = off
    # (detectron2's DATALOADER.SAMPLER_TRAIN). Class presence is read from the masks once at start.
    cfg.ROOFTOP.REPEAT_THRESHOLD = 0.0

    # --- pretrained weights (MODEL.WEIGHTS; see rooftop_m2f/checkpoint/loading.py) ---
    # MODEL.WEIGHTS may be the Mask2Former model zoo's ADE20K checkpoint (.pkl, URL or path), a
    # tools/convert_hf_to_d2.py conversion of a Hugging Face checkpoint, or a run's model_*.pth.
    # Everything that fits is loaded and a class head of another class count is re-initialised.
    # True: load only backbone.* (the reference run's recipe: pretrained encoder, pixel decoder
    # and transformer decoder trained from scratch); False: backbone, pixel decoder and decoder.
    cfg.ROOFTOP.LOAD_BACKBONE_ONLY = False

    # --- checkpoints ------------------------------------------------------------------------
    # Signals on which training saves a checkpoint (model_<iter>.pth + last_checkpoint) at the end
    # of the current iteration and exits with status 128 + signal number (143 for SIGTERM, what
    # cluster schedulers send before SIGKILL); --resume continues from it. Empty list: off.
    cfg.ROOFTOP.STOP_SIGNALS = ["SIGTERM"]
    # --- no silent hangs (rooftop_m2f/engine/launching.py) -----------------------------------
    # Seconds a process waits in a collective (all-gather of evaluation results, barriers) for
    # the others before the run ends with a message naming the ranks and what each was doing
    # (detectron2's launch timeout; gloo honours it, NCCL with its async error handling; on GPUs
    # detectron2's CPU-side gather group keeps PyTorch's own default, 30 min).
    # Long enough for work that only the main process does (ROOFTOP.CHECK_DATASET, saving).
    cfg.ROOFTOP.DIST_TIMEOUT_S = 1800.0
    # Seconds a data-loader worker may take to deliver one batch (PyTorch's DataLoader timeout,
    # training and evaluation; only with DATALOADER.NUM_WORKERS > 0). 0: wait forever.
    cfg.ROOFTOP.LOADER_TIMEOUT_S = 600.0
    # Multi-process runs: after a stop signal, or after one process failed, the launcher gives
    # the others this many seconds to stop on their own, then SIGTERM, then as long again, then
    # SIGKILL; it names every process it had to kill and what it was doing. 30 s: SLURM's
    # default KillWait, and room for a healthy process to end its iteration and save.
    cfg.ROOFTOP.STOP_GRACE_S = 30.0
    # Keep this many best checkpoints by validation macro foreground mIoU.
    cfg.ROOFTOP.BEST_CHECKPOINT_TOPK = 3
    # The validation scalar (as detectron2's EvalHook stores it) that ranks them; higher is better.
    cfg.ROOFTOP.BEST_CHECKPOINT_METRIC = "sem_seg/macro_fg_mIoU"
    # Write train_epoch.csv, valid_epoch.csv and metrics_epoch_per_class.csv to OUTPUT_DIR.
    cfg.ROOFTOP.CSV_LOGS = True

    # --- training options (README "Training options"; rooftop_m2f/engine/training_options.py) ---
    # Exponential moving average of the weights, updated after every optimizer step with
    # decay_t = min(DECAY, (1 + t) / (10 + t)) (t: updates so far; the warm-up lets early EMA
    # weights follow the model). When on, evaluations (valid CSVs: weights = ema) and the
    # best-checkpoint choice use the EMA weights, and model_final.pth / model_best*.pth hold
    # them under "model" (what predict.py and --eval-only load), the raw ones under "model_raw".
    cfg.ROOFTOP.EMA = CN()
    cfg.ROOFTOP.EMA.ENABLED = False
    cfg.ROOFTOP.EMA.DECAY = 0.9998
    # Stop when BEST_CHECKPOINT_METRIC (validation macro foreground mIoU) has not improved by
    # more than MIN_DELTA for PATIENCE evaluations in a row: model_final.pth is saved and the run
    # ends; --resume of it says so instead of training on. PATIENCE 0: off.
    cfg.ROOFTOP.EARLY_STOP = CN()
    cfg.ROOFTOP.EARLY_STOP.PATIENCE = 0
    cfg.ROOFTOP.EARLY_STOP.MIN_DELTA = 0.0
    # Accumulate the gradients of this many batches of SOLVER.IMS_PER_BATCH before each optimizer
    # step (loss / N, one DDP gradient sync, clipping and AMP unscale once per step). An
    # iteration (SOLVER.MAX_ITER, the LR schedule, periods) is one optimizer step, and an epoch
    # ceil(images / (IMS_PER_BATCH * N)) of them. 1: off.
    cfg.ROOFTOP.GRAD_ACCUM_STEPS = 1
    # Label smoothing of the classification loss of the queries matched to a ground-truth
    # segment: target (1 - eps) on its class plus eps spread evenly over the num_classes + 1
    # outputs; unmatched queries keep their hard no-object target and weight. 0: off.
    cfg.ROOFTOP.LABEL_SMOOTHING = 0.0
    # Layer-wise learning-rate decay of the Swin backbone: stage s of S (1-based) learns at
    # lr * LAYER_DECAY ** (S - s), the patch embedding at lr * LAYER_DECAY ** S (on top of
    # SOLVER.BACKBONE_MULTIPLIER); pixel decoder and transformer decoder untouched. 1.0: off.
    cfg.ROOFTOP.LAYER_DECAY = 1.0
    # A PyTorch profiler trace of NUM_ITERS training iterations from iteration START_ITER
    # (detectron2's TorchProfiler hook) in OUTPUT_DIR/log/profiler-tensorboard-iter<N>/ (for
    # TensorBoard) plus the top operators in OUTPUT_DIR/profiler-top-ops-iter<N>.txt.
    cfg.ROOFTOP.PROFILE = CN()
    cfg.ROOFTOP.PROFILE.ENABLED = False
    cfg.ROOFTOP.PROFILE.START_ITER = 5
    cfg.ROOFTOP.PROFILE.NUM_ITERS = 3

    # --- prediction (tools/predict.py; see rooftop_m2f/inference/) ----------------------------
    # Ground sampling distance, metres per pixel, for areas of images without a georeference
    # (a GeoTIFF's own pixel size is used when it has one). Cape Town aerial imagery: 8 cm.
    cfg.ROOFTOP.GSD = 0.08
    # Test-time augmentation, scores averaged over the identity and each of these views:
    # any of "hflip", "vflip", "rot90" (rot90 also adds 180 and 270). Empty: none.
    # (Was ROOFTOP.TILE.TTA.)
    cfg.ROOFTOP.TTA = []
    # Sliding-window inference for images larger than the model's input.
    cfg.ROOFTOP.TILE = CN()
    # Window side in image pixels (before any ROOFTOP.INPUT_SIZE): the size of the training tiles.
    cfg.ROOFTOP.TILE.SIZE = 1024
    # Overlap between neighbouring windows, pixels; class scores are blended across it.
    cfg.ROOFTOP.TILE.OVERLAP = 256
    # "auto": tile images larger than SIZE in either side, one window otherwise; "never": one
    # pass whatever the size (memory grows with the image).
    cfg.ROOFTOP.TILE.MODE = "auto"
    # Windows passed to the model together (tools/predict_city.py; tools/predict.py predicts one
    # at a time). Larger batches use the accelerator better; memory grows with the batch.
    cfg.ROOFTOP.TILE.BATCH_SIZE = 1

    # --- city-scale prediction (tools/predict_city.py; rooftop_m2f/inference/city.py) ----------
    cfg.ROOFTOP.CITY = CN()
    # Inputs larger than this on a side (pixels) are predicted in parts of about PART_SIZE x
    # PART_SIZE, shared among the processes like whole inputs (a VRT of a whole city); each part's
    # pixels are exactly those of a prediction of the whole input, and objects across parts are
    # merged like objects across tiles. Memory per process ~7 bytes per pixel of a part.
    # 0: whole inputs only.
    cfg.ROOFTOP.CITY.PART_SIZE = 8192
    # Installations smaller than this (m^2, per class: background, solar_panel,
    # solar_water_heater, solar_pool_heater) are dropped from the merged layer as speckle.
    # Measured on the synthetic mosaic's truth (README, "Predict a city"; benchmarks/benchmark_city.py
    # prints it): these drop under 2 % of the true components of each class, all of them pieces
    # of a few pixels, and keep every object of a real size (a panel module is ~1.7 m^2).
    cfg.ROOFTOP.CITY.MIN_AREA_M2 = [0.0, 0.05, 0.25, 0.15]
    # Douglas-Peucker tolerance of the layer's outlines, metres (0: exact pixel outlines); half
    # a pixel drops the collinear vertices of the pixel staircase and keeps areas within 1 %
    # (one pixel, 0.08, changes small objects' outlines by up to ~13 % of their area).
    # Areas are measured before simplification.
    cfg.ROOFTOP.CITY.SIMPLIFY_M = 0.04
    # Classes whose outlines are replaced by their minimum rotated rectangle when the outline
    # fills at least RECTANGLE_MIN_FILL of the rectangle's area (panel arrays are rectangles;
    # the rectangle always covers the outline, so it adds at most 1 - fill of its area).
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
    ("MODEL.SEM_SEG_HEAD.NUM_CLASSES", (len(CLASS_NAMES),)),
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
    ("ROOFTOP.DIST_TIMEOUT_S", "> 0"),
    ("ROOFTOP.LOADER_TIMEOUT_S", ">= 0"),
    ("ROOFTOP.STOP_GRACE_S", ">= 0"),
    ("ROOFTOP.BEST_CHECKPOINT_TOPK", ">= 1"),
    ("ROOFTOP.EMA.DECAY", "in [0, 1)"),
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
    per-class list of the wrong length, a tile overlap not smaller than the tile, a dataset
    name in ``DATASETS.TRAIN``/``TEST`` that is not registered (with the closest registered
    name). Then apply ``ROOFTOP.MAX_IMAGE_PIXELS`` to PIL (one limit per process). Returns
    ``cfg``; called once by the tools' config set-up, after the datasets are registered."""
    for key, rule in VALUE_RULES:
        value = _get(cfg, key)
        if not _allowed(value, rule):
            allowed = (f"one of {', '.join(map(str, rule))}" if len(rule) > 1 else str(rule[0])) \
                if isinstance(rule, tuple) else \
                ("each " if isinstance(value, (list, tuple)) else "") + rule
            raise ConfigError(f"{key} {_show(value)}: must be {allowed}")
    classes = cfg.MODEL.SEM_SEG_HEAD.NUM_CLASSES
    for key, may_be_empty in PER_CLASS_KEYS:
        value = _get(cfg, key)
        if len(value) != classes and not (may_be_empty and not value):
            raise ConfigError(f"{key} {_show(value)}: must have one value per class, {classes} "
                              f"({', '.join(CLASS_NAMES)}){', or be empty' if may_be_empty else ''}")
    tile = cfg.ROOFTOP.TILE
    if tile.OVERLAP >= tile.SIZE:
        raise ConfigError(f"ROOFTOP.TILE.OVERLAP {tile.OVERLAP}: must be < ROOFTOP.TILE.SIZE "
                          f"({tile.SIZE})")
    _check_dataset_names(cfg)
    Image.MAX_IMAGE_PIXELS = int(cfg.ROOFTOP.MAX_IMAGE_PIXELS) or None
    return cfg


def _check_dataset_names(cfg):
    from detectron2.data import DatasetCatalog

    registered = list(DatasetCatalog.list())
    for key in DATASET_KEYS:
        for name in _get(cfg, key):
            if name not in registered:
                near = difflib.get_close_matches(name, registered, n=1, cutoff=0.6)
                hint = f"; did you mean {near[0]}?" if near else \
                    f" (registered: {', '.join(n for n in registered if n.startswith('capetown'))})"
                raise ConfigError(f"{key}: {name!r} is not a registered dataset{hint}")


def _show(value):
    return str(list(value)) if isinstance(value, (list, tuple)) else repr(value)


def _as_float_where_float(value, default):
    """An integer given for a key whose default is a float, as that float (``1`` -> ``1.0``)."""
    if isinstance(default, float) and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    return value


def _ints_as_floats(tree, defaults):
    for key, value in tree.items():
        if key not in defaults:
            continue
        if isinstance(value, dict) and isinstance(defaults[key], dict):
            _ints_as_floats(value, defaults[key])
        else:
            tree[key] = _as_float_where_float(value, defaults[key])


def _rename(old, new, where):
    logger.warning("%s: %s is deprecated, read as %s (its new name)", where, old, new)


def rename_deprecated_keys(tree, where):
    """``tree`` (a YAML file's nested dict, its ``_BASE_`` merged in) with the old names of
    ``RENAMED_KEYS`` moved to the new ones, each with a warning naming ``where``. The bases are
    renamed first, so an old name comes from this file and replaces the new name's value."""
    for old, new in RENAMED_KEYS.items():
        *old_path, old_leaf = old.split(".")
        parent = tree
        for part in old_path:
            parent = parent.get(part) if isinstance(parent, dict) else None
        if not isinstance(parent, dict) or old_leaf not in parent:
            continue
        value = parent.pop(old_leaf)
        *new_path, new_leaf = new.split(".")
        node = tree
        for part in new_path:
            node = node.setdefault(part, {})
        node[new_leaf] = value
        _rename(old, new, where)
    return tree


def rename_deprecated_overrides(opts, where="command line"):
    """``KEY VALUE`` overrides with the old names of ``RENAMED_KEYS`` replaced by the new ones,
    each with a warning."""
    opts = list(opts)
    for i in range(0, len(opts) - 1, 2):
        new = RENAMED_KEYS.get(opts[i])
        if new is not None:
            _rename(opts[i], new, where)
            opts[i] = new
    return opts


class RooftopCfgNode(CN):
    """detectron2's ``CfgNode`` that reads the old names of renamed keys (``RENAMED_KEYS``) in
    YAML files (each ``_BASE_`` too) and ``KEY VALUE`` lists as the new ones, with a warning.

    An integer given for a key whose default is a float is read as that number (``SOLVER.BASE_LR
    1`` is 1.0), in YAML files and overrides alike."""

    @classmethod
    def load_yaml_with_base(cls, filename, allow_unsafe=False):
        return rename_deprecated_keys(super().load_yaml_with_base(filename, allow_unsafe),
                                      filename)

    def merge_from_other_cfg(self, cfg_other):
        _ints_as_floats(cfg_other, self)
        return super().merge_from_other_cfg(cfg_other)

    def merge_from_list(self, cfg_list):
        cfg_list = rename_deprecated_overrides(cfg_list)
        for i in range(0, len(cfg_list) - 1, 2):
            try:
                default, value = _get(self, cfg_list[i]), ast.literal_eval(str(cfg_list[i + 1]))
            except (KeyError, ValueError, SyntaxError):
                continue  # not a key, or a string: yacs reports it
            if _as_float_where_float(value, default) is not value:
                cfg_list[i + 1] = repr(float(value))
        return super().merge_from_list(cfg_list)


def get_rooftop_cfg():
    """A fresh detectron2 config with DeepLab, Mask2Former and rooftop keys added (a
    :class:`RooftopCfgNode`)."""
    from . import compat

    compat.apply()
    from detectron2.projects.deeplab import add_deeplab_config
    from mask2former import add_maskformer2_config

    cfg = get_cfg()
    add_deeplab_config(cfg)
    add_maskformer2_config(cfg)
    add_rooftop_config(cfg)
    return RooftopCfgNode(cfg)
