"""What every command-line tool shares: the argument convention, one-line errors for user
mistakes, and a quiet console.

This module imports only the standard library, so a tool can build its parser and answer
``--help`` before torch, detectron2 or Mask2Former are imported.

Convention (GETTING_STARTED.md, "The command-line convention"): ``--config-file``, detectron2's trailing
``KEY VALUE`` config overrides, ``--output-dir`` for the folder a tool writes, weights always
through ``MODEL.WEIGHTS``, ``--debug`` (or ``ROOFTOP_DEBUG=1``) for a traceback. Exit status: 0
done, 1 the run failed (bad data, a failed input), 2 a usage mistake (bad argument, key, path).
"""
import argparse
import difflib
import logging
import os
import re
import sys
import warnings

DEBUG_ENV = "ROOFTOP_DEBUG"
_CONFIG_KEY = re.compile(r"^[A-Z][A-Z0-9_]*(\.[A-Z0-9_]+)*$")
_ANSI = re.compile(r"\x1b\[[0-9;]*[A-Za-z]")


class UserError(Exception):
    """A user's mistake or bad input: reported as one line naming the file or key, no traceback.
    ``exit_code`` 1: the run failed; 2 (:class:`UsageError`): the command line is wrong."""

    exit_code = 1


class UsageError(UserError):
    exit_code = 2


class ConfigError(UsageError):
    """A config file that does not exist, a key that does not exist, a value of the wrong type."""


# --------------------------------------------------------------------------------------------
# Warnings and logging
# --------------------------------------------------------------------------------------------
# Third-party warnings that say nothing to a user of this project, filtered by message and
# module (never all warnings): deprecations inside detectron2 / Mask2Former / timm that we
# cannot change, and Swin's meshgrid call.
KNOWN_THIRD_PARTY_WARNINGS = (
    (FutureWarning, r"`torch\.jit\.script` is deprecated", r"torch\.jit"),
    (FutureWarning, r"Importing from timm\.models\.layers is deprecated", r"timm"),
    (FutureWarning, r"`torch\.cuda\.amp\.(autocast|GradScaler)\(args\.\.\.\)` is deprecated", r""),
    (UserWarning, r"torch\.meshgrid: in an upcoming release", r"torch"),
    (FutureWarning, r"You are using `torch\.load` with `weights_only=False`", r""),
    (DeprecationWarning, r"__array__ implementation doesn't accept a copy keyword", r"pycocotools"),
)


def quiet_third_party_warnings():
    for category, message, module in KNOWN_THIRD_PARTY_WARNINGS:
        warnings.filterwarnings("ignore", message=message, category=category, module=module)


# Records detectron2 logs at start-up that fill a screen: kept in log.txt, not on the console.
_LOG_FILE_ONLY = ("Environment info:", "Contents of args.config_file=", "Running with full config:",
                  "Model:\n", "Command line arguments:")


class _FileOnly(logging.Filter):
    """On a console handler: drops the long start-up records (they stay in log.txt)."""

    def filter(self, record):
        msg = record.msg if isinstance(record.msg, str) else ""
        return not msg.startswith(_LOG_FILE_ONLY)


class _PlainFormatter(logging.Formatter):
    """Wraps a file handler's formatter: no ANSI colour codes in log.txt."""

    def __init__(self, inner):
        super().__init__()
        self.inner = inner

    def format(self, record):
        return _ANSI.sub("", self.inner.format(record))


def tidy_log_handlers(*logger_names):
    """Console handlers of these loggers skip the start-up dumps; file handlers write no ANSI
    codes. Idempotent. Call it before the records are logged (detectron2's ``setup_logger`` is
    cached, so calling it first with the same arguments gives the handlers it will use)."""
    for name in logger_names:
        for handler in logging.getLogger(name).handlers:
            stream = getattr(handler, "stream", None)
            if stream in (sys.stdout, sys.stderr):
                if not any(isinstance(f, _FileOnly) for f in handler.filters):
                    handler.addFilter(_FileOnly())
            elif handler.formatter is not None and not isinstance(handler.formatter, _PlainFormatter):
                handler.setFormatter(_PlainFormatter(handler.formatter))


def setup_plain_logging(output_file=None, name="rooftop_m2f"):
    """The project's logger where detectron2 is not imported (the ONNX Runtime path): INFO
    records on stdout and, given ``output_file``, appended to it; in detectron2's format.
    Idempotent."""
    logger = logging.getLogger(name)
    logger.setLevel(logging.INFO)
    logger.propagate = False
    fmt = logging.Formatter("[%(asctime)s %(name)s]: %(message)s", datefmt="%m/%d %H:%M:%S")
    wanted = [("stdout", None)] + ([("file", os.path.abspath(output_file))] if output_file else [])
    for kind, target in wanted:
        if any(getattr(h, "_rooftop", None) == (kind, target) for h in logger.handlers):
            continue
        if kind == "file":
            os.makedirs(os.path.dirname(target), exist_ok=True)
        handler = logging.StreamHandler(sys.stdout) if kind == "stdout" else \
            logging.FileHandler(target)
        handler._rooftop = (kind, target)
        handler.setFormatter(fmt)
        logger.addHandler(handler)
    return logger


class WarningCount(logging.Handler):
    """Counts the warnings (and errors) logged by the project while a tool runs, for its final
    line: nothing a run fell back on goes unsaid there."""

    def __init__(self, name="rooftop_m2f"):
        super().__init__(logging.WARNING)
        self.count = 0
        logging.getLogger(name).addHandler(self)

    def emit(self, record):
        self.count += 1

    def __str__(self):
        return f" ({self.count} warning(s) above)" if self.count else ""


# --------------------------------------------------------------------------------------------
# Arguments
# --------------------------------------------------------------------------------------------
def looks_like_config_key(token: str) -> bool:
    return bool(_CONFIG_KEY.match(token))


def add_config_file_argument(parser, required=True):
    parser.add_argument("--config-file", required=required, metavar="FILE",
                        help="YAML config (configs/*.yaml)")


def add_model_argument(parser):
    parser.add_argument("--model", default=None, metavar="MODEL.onnx",
                        help="an exported model (tools/export_onnx.py), predicted on ONNX Runtime "
                             "without torch or detectron2; in place of --config-file (the config "
                             "is the config.yaml beside it)")


def check_model_choice(args):
    """One of --config-file (a PyTorch model: MODEL.WEIGHTS) and --model (an exported one)."""
    if args.model and args.config_file:
        raise UsageError("--model and --config-file: give one (an exported model brings its "
                         "config, the config.yaml beside it; override it with KEY VALUE pairs)")
    if not args.model and not args.config_file:
        raise UsageError("--config-file is required (e.g. configs/capetown_swinS_1024.yaml with "
                         "MODEL.WEIGHTS ...), or --model exported/model.onnx")
    if args.model and getattr(args, "random_weights", False):
        raise UsageError("--random-weights is for a PyTorch model (--config-file); an exported "
                         "model has its weights")


def add_overrides_argument(parser):
    """The trailing ``KEY VALUE`` config overrides (``opts``); add it last."""
    parser.add_argument("opts", nargs=argparse.REMAINDER, metavar="KEY VALUE",
                        help="config overrides, last on the line, e.g. MODEL.WEIGHTS "
                             "output/run/model_best.pth OUTPUT_DIR output/run2")


def add_output_dir_argument(parser, required=True, default=None, help="output folder"):
    """``--output-dir`` (``--output`` is accepted as an alias)."""
    parser.add_argument("--output-dir", "--output", dest="output_dir", required=required,
                        default=default, metavar="DIR", help=help)


def add_debug_argument(parser):
    parser.add_argument("--debug", action="store_true",
                        help=f"show the traceback of an error (also {DEBUG_ENV}=1)")


def add_random_weights_argument(parser):
    parser.add_argument("--random-weights", action="store_true",
                        help="run without MODEL.WEIGHTS, with an untrained model, on purpose")


def split_trailing_overrides(items):
    """``--input a.tif b/ MODEL.WEIGHTS w.pth`` -> (["a.tif", "b/"], ["MODEL.WEIGHTS", "w.pth"]):
    the first item that looks like a config key (and is not an existing path) starts the
    overrides, as on every tool's command line."""
    for i, item in enumerate(items):
        if looks_like_config_key(item) and not os.path.exists(item):
            return list(items[:i]), list(items[i:])
    return list(items), []


def check_config_file(path):
    if not path:
        raise UsageError("--config-file is required (e.g. configs/capetown_swinS_1024.yaml)")
    if not os.path.isfile(path):
        near = difflib.get_close_matches(os.path.basename(path), _sibling_yamls(path), n=1)
        hint = f"; did you mean {os.path.join(os.path.dirname(path), near[0])}?" if near else ""
        raise ConfigError(f"--config-file {path}: no such file{hint}")


def _sibling_yamls(path):
    folder = os.path.dirname(path) or "."
    try:
        return [f for f in os.listdir(folder) if f.endswith((".yaml", ".yml"))]
    except OSError:
        return []


def check_overrides(opts):
    opts = [str(o) for o in opts]
    if len(opts) % 2 and not any(o.startswith("--") for o in opts):
        raise UsageError(f"config overrides come in KEY VALUE pairs; got {len(opts)} items: "
                         f"{' '.join(opts)}")
    for item in opts:
        if item.startswith("--"):
            raise UsageError(f"{item} comes after the config overrides: put options first and the "
                             "KEY VALUE pairs last on the line")
    for key in opts[::2]:
        if not looks_like_config_key(key):
            raise UsageError(f"{key!r} is not a config key (KEY VALUE pairs such as "
                             "MODEL.WEIGHTS path.pth come last on the line)")


def config_keys(node, prefix=""):
    """Every leaf key of a config (``MODEL.WEIGHTS``, ...), for :func:`closest_key`."""
    for key, value in node.items():
        yield from config_keys(value, f"{prefix}{key}.") if isinstance(value, dict) else [prefix + key]


def closest_key(key, valid_keys):
    near = difflib.get_close_matches(key, valid_keys, n=1, cutoff=0.6)
    return near[0] if near else None


def check_weights(weights, allow_random=False, what="this tool"):
    """Before any model is built: weights were given (or random weights asked for), a local
    file exists and looks like a checkpoint (a PyTorch zip or a pickle), a URL is downloaded
    (checked, then cached; offline: one line saying how to pass a local copy)."""
    if not weights:
        if allow_random:
            return
        raise UsageError(f"{what} needs weights: add MODEL.WEIGHTS path/to/model_best.pth (a run's "
                         "checkpoint, a model-zoo .pkl or a converted Hugging Face .pth) at the end "
                         "of the command, or --random-weights for an untrained model on purpose")
    if "://" in weights:
        from .checkpoint.safe_io import fetch_weights  # torch: only for a URL

        fetch_weights(weights)  # into the cache, where the loader finds it
        return
    if weights.lower().endswith(".onnx"):
        raise UsageError(f"MODEL.WEIGHTS {weights}: an exported ONNX model; predict with it as "
                         f"--model {weights} (instead of --config-file)")
    if not os.path.exists(weights):
        raise UserError(f"MODEL.WEIGHTS {weights}: no such file")
    if not os.path.isfile(weights):
        raise UserError(f"MODEL.WEIGHTS {weights}: not a file")
    with open(weights, "rb") as f:
        head = f.read(4)
    if not (head.startswith(b"PK\x03\x04") or head[:1] == b"\x80"):
        raise UserError(f"MODEL.WEIGHTS {weights}: not a checkpoint (neither a PyTorch .pth nor a "
                        "pickled .pkl file)")


def parse_tta(text):
    """``hflip,vflip`` -> list of views; a bad name is a usage error before any model loads."""
    valid = ("hflip", "vflip", "rot90")
    views = [v.strip() for v in text.split(",") if v.strip()]
    bad = [v for v in views if v not in valid]
    if bad:
        raise UsageError(f"--tta {text}: unknown view(s) {', '.join(bad)}; choose from "
                         f"{','.join(valid)}")
    return views


# --------------------------------------------------------------------------------------------
# Running a tool
# --------------------------------------------------------------------------------------------
def debug_requested(argv=None):
    argv = sys.argv[1:] if argv is None else argv
    return "--debug" in argv or os.environ.get(DEBUG_ENV, "") not in ("", "0")


def run(main, argv=None, prog=None):
    """Call ``main(argv)`` and turn a :class:`UserError` (a failed write among them), or an
    ``OSError`` of the storage (:data:`~rooftop_m2f.fileio.WRITE_ERRNOS`), into one line on
    stderr and its exit status (the traceback only with ``--debug``). Returns what ``main`` returns (an exit code)."""
    prog = prog or os.path.basename(sys.argv[0])
    try:
        return main(argv)
    except UserError as e:
        if debug_requested(argv):
            raise
        print(f"{prog}: error: {e}", file=sys.stderr)
        return e.exit_code
    except OSError as e:  # the storage, not the program: full, read-only, no permission
        from .fileio import WRITE_ERRNOS

        if e.errno not in WRITE_ERRNOS or debug_requested(argv):
            raise
        print(f"{prog}: error: {e.filename or 'a file'}: {e.strerror} (errno {e.errno})",
              file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print(f"{prog}: interrupted", file=sys.stderr)
        return 130
