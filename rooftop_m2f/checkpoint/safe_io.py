"""Weights are data, never code: reading checkpoint files (:func:`read_checkpoint_file`) and
downloading ``MODEL.WEIGHTS`` (:func:`fetch_weights`). Every file of weights the project reads
goes through here; :class:`SafeDetectionCheckpointer` is the base of every checkpointer.
"""
import collections
import contextlib
import http.client
import importlib
import logging
import os
import pickle
import re
import urllib.error
import urllib.request
import zipfile
from typing import Any, Callable, Dict, Optional, Tuple
from urllib.parse import parse_qs, urlparse

import numpy as np
import torch
from detectron2.checkpoint import DetectionCheckpointer
from detectron2.utils import comm
from detectron2.utils.file_io import Detectron2Handler

from ..cli import UserError
from ..fileio import atomic_path

logger = logging.getLogger(__name__)

__all__ = ["WeightsError", "RestrictedUnpickler", "read_pkl", "read_torch",
           "read_checkpoint_file", "is_url", "weights_cache_dir", "cached_path", "fetch_weights",
           "SafeDetectionCheckpointer"]


class WeightsError(UserError, ValueError):
    """Weights that cannot be read or loaded; the message names the file and why, in one line
    where the user can act on it."""


# ---- .pkl: a restricted unpickler ------------------------------------------------------------
def _numpy_function(name: str, *modules: str) -> Optional[Callable]:
    """``name`` from the first of ``modules`` that has it (numpy 2 moved ``numpy.core`` to
    ``numpy._core``), or None."""
    for module in modules:
        with contextlib.suppress(ImportError, AttributeError):
            return getattr(importlib.import_module(module), name)
    return None


def _latin1_bytes(text, encoding="latin1", errors="strict"):
    """What ``_codecs.encode`` does for the bytes objects of a protocol 0-2 pickle, and nothing
    else: ``str`` to ``bytes`` through latin-1."""
    if not isinstance(text, str) or encoding.lower().replace("_", "-") not in ("latin1", "latin-1"):
        raise pickle.UnpicklingError(f"_codecs.encode with {type(text).__name__}, {encoding!r}: "
                                     "only latin-1 text (bytes of an old pickle protocol) is read")
    return text.encode("latin1", errors)


def _allowed_globals() -> Dict[Tuple[str, str], Any]:
    reconstruct = _numpy_function("_reconstruct", "numpy._core.multiarray", "numpy.core.multiarray")
    scalar = _numpy_function("scalar", "numpy._core.multiarray", "numpy.core.multiarray")
    frombuffer = _numpy_function("_frombuffer", "numpy._core.numeric", "numpy.core.numeric")
    table = {
        ("collections", "OrderedDict"): collections.OrderedDict,
        ("numpy", "ndarray"): np.ndarray,
        ("numpy", "dtype"): np.dtype,
        ("_codecs", "encode"): _latin1_bytes,
    }
    for module in ("numpy.core.multiarray", "numpy._core.multiarray"):
        table[(module, "_reconstruct")] = reconstruct
        table[(module, "scalar")] = scalar
    for module in ("numpy.core.numeric", "numpy._core.numeric"):
        table[(module, "_frombuffer")] = frombuffer
    return {key: value for key, value in table.items() if value is not None}


_ALLOWED = _allowed_globals()


class RefusedGlobal(pickle.UnpicklingError):
    """A pickle referred to a global outside :data:`_ALLOWED`; ``name`` is ``module.qualname``."""

    def __init__(self, name: str):
        super().__init__(name)
        self.name = name


class RestrictedUnpickler(pickle.Unpickler):
    """An unpickler for weights: ``find_class`` hands out only the few numpy and collections
    objects that model-zoo files need (dicts, lists, tuples, strings, bytes, numbers,
    ``collections.OrderedDict`` and numpy arrays, dtypes and scalars, through numpy's own
    reconstruction functions) and refuses every other global (a function, a class) with
    :class:`RefusedGlobal` *before* anything calls it; nothing the file names is imported or
    called, so a crafted file cannot run code. Persistent ids (torch's storages) are refused by
    ``pickle.Unpickler`` itself."""

    def find_class(self, module, name):
        try:
            return _ALLOWED[(module, name)]
        except KeyError:
            raise RefusedGlobal(f"{module}.{name}") from None


def _check_plain(obj, where: str, depth: int = 0):
    """Weights hold no Python objects inside arrays (an object-dtype array is pickled objects)."""
    if depth > 64:
        raise WeightsError(f"{where}: nested more than 64 levels deep; not a weights file")
    if isinstance(obj, np.ndarray):
        if obj.dtype.hasobject:
            raise WeightsError(f"{where}: holds an array of Python objects (dtype {obj.dtype}); "
                               "weights are numeric arrays")
    elif isinstance(obj, dict):
        for value in obj.values():
            _check_plain(value, where, depth + 1)
    elif isinstance(obj, (list, tuple)):
        for value in obj:
            _check_plain(value, where, depth + 1)


def read_pkl(path: str, name: Optional[str] = None):
    """The content of a pickled weights file, read with :class:`RestrictedUnpickler`
    (``encoding="latin1"`` for Python 2 files, as detectron2 does). ``name``: how messages call
    the file (default ``path``). Raises :class:`WeightsError`."""
    name = name or path
    try:
        with open(path, "rb") as f:
            data = RestrictedUnpickler(f, encoding="latin1").load()
    except RefusedGlobal as exc:
        raise WeightsError(
            f"{name}: refused: the file refers to {exc.name}, which is not weights data (a .pkl "
            "may hold only dicts, lists, strings, numbers and numpy arrays); nothing in it was "
            "run") from None
    except (pickle.UnpicklingError, EOFError, ValueError, TypeError, AttributeError,
            IndexError, KeyError, MemoryError, OverflowError, UnicodeDecodeError) as exc:
        raise WeightsError(f"{name}: cannot read the checkpoint ({type(exc).__name__}: "
                           f"{_first_line(exc)}); the file is truncated or not a model-zoo "
                           ".pkl") from None
    _check_plain(data, name)
    return data


# ---- .pth: torch's weights-only reader -------------------------------------------------------
_TORCH_GLOBAL = re.compile(r"GLOBAL ([\w.]+)")


def _first_line(exc: BaseException, limit: int = 200) -> str:
    text = next((line.strip() for line in str(exc).splitlines() if line.strip()), "")
    return text if len(text) <= limit else text[:limit] + "..."


_TORCH_BOILERPLATE = ("Weights only load failed", "Please file an issue", "Check the documentation")


def _torch_reason(exc: BaseException) -> str:
    """The line of torch's weights-only error that says what was wrong, without its advice to
    retry with ``weights_only=False``."""
    lines = [line.strip() for line in str(exc).splitlines() if line.strip()]
    reasons = [line for line in lines if not line.startswith(_TORCH_BOILERPLATE)]
    return (reasons[0] if reasons else "unreadable")[:200]


def read_torch(path: str, name: Optional[str] = None, mmap: bool = False):
    """``torch.load(path, map_location="cpu", weights_only=True)``: tensors and plain data only
    (``mmap``: tensors mapped from the file, not read, for a zip-format checkpoint). Raises
    :class:`WeightsError` with one line (torch's own message is several paragraphs and suggests
    ``weights_only=False``, which we never do)."""
    name = name or path
    try:
        if mmap and zipfile.is_zipfile(path):
            return torch.load(path, map_location="cpu", weights_only=True, mmap=True)
        return torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as exc:
        match = _TORCH_GLOBAL.search(str(exc))
        if match:
            raise WeightsError(
                f"{name}: refused: the file refers to {match.group(1)}, which is not weights data "
                "(a .pth/.pt may hold only tensors, dicts, lists, strings and numbers); nothing "
                "in it was run") from None
        raise WeightsError(
            f"{name}: cannot read the checkpoint (torch's weights-only reader: "
            f"{_torch_reason(exc)}); the file is truncated, not a PyTorch checkpoint, or holds "
            "more than tensors and plain data") from None
    except Exception as exc:  # torch raises RuntimeError, EOFError, OSError, ... for bad files
        raise WeightsError(f"{name}: cannot read the checkpoint ({type(exc).__name__}: "
                           f"{_first_line(exc)}); the file is truncated or not a PyTorch "
                           "checkpoint") from None


# ---- detectron2's checkpoint formats, read as data -------------------------------------------
def read_checkpoint_file(path: str, name: Optional[str] = None) -> Dict[str, Any]:
    """A checkpoint as detectron2's checkpointer expects it: a dict with ``"model"`` (name ->
    array or tensor) and, for model-zoo files, ``"__author__"`` / ``"matching_heuristics"``.
    Same format rules as ``DetectionCheckpointer._load_file`` (model zoo ``.pkl``, Caffe2
    ``.pkl`` of blobs, pycls ``.pyth``, torch files), with the readers above: ``.pkl`` by
    :class:`RestrictedUnpickler`, anything else by ``torch.load(..., weights_only=True)``, stated
    here on purpose rather than left to torch's default. A file that holds anything else is a
    :class:`WeightsError` with one line naming the file and the refused name."""
    name = name or path
    if path.endswith(".pkl"):
        data = read_pkl(path, name)
        if not isinstance(data, dict):
            raise WeightsError(f"{name}: not a checkpoint: expected a dict, got "
                               f"{type(data).__name__}")
        if "model" in data and "__author__" in data:
            logger.info("Reading %s, written by %s", os.path.basename(name), data["__author__"])
            return data
        blobs = data.get("blobs", data)  # a Caffe2 / Detectron1 model zoo file
        if not isinstance(blobs, dict):
            raise WeightsError(f"{name}: 'blobs' is a {type(blobs).__name__}, not a dict")
        model = {k: v for k, v in blobs.items() if not str(k).endswith("_momentum")}
        return {"model": model, "__author__": "Caffe2", "matching_heuristics": True}
    data = read_torch(path, name)
    if path.endswith(".pyth"):  # pycls
        if not isinstance(data, dict) or "model_state" not in data:
            raise WeightsError(f"{name}: a pycls .pyth checkpoint must hold 'model_state'")
        model = {k: v for k, v in data["model_state"].items()
                 if not k.endswith("num_batches_tracked")}
        return {"model": model, "__author__": "pycls", "matching_heuristics": True}
    if not isinstance(data, dict):
        raise WeightsError(f"{name}: not a checkpoint: expected a dict, got {type(data).__name__}")
    return data if "model" in data else {"model": data}


# ---- downloads -------------------------------------------------------------------------------
_CHUNK = 1 << 20


def is_url(path: str) -> bool:
    return "://" in str(path)


def _http_url(url: str) -> str:
    if url.startswith(Detectron2Handler.PREFIX):
        return Detectron2Handler.S3_DETECTRON2_PREFIX + url[len(Detectron2Handler.PREFIX):]
    scheme = urlparse(url).scheme
    if scheme not in ("http", "https"):
        raise WeightsError(f"MODEL.WEIGHTS: {url}: only local paths and http(s):// or "
                           "detectron2:// URLs are supported")
    return url


def weights_cache_dir() -> str:
    """detectron2's (iopath's) download cache: ``$FVCORE_CACHE``, else ``~/.torch/iopath_cache``."""
    return os.path.expanduser(os.getenv("FVCORE_CACHE", "~/.torch/iopath_cache"))


def cached_path(url: str) -> str:
    """Where :func:`fetch_weights` keeps ``url``: the cache directory plus the URL's path, as
    detectron2 lays it out."""
    parsed = urlparse(_http_url(url))
    relative = parsed.path.lstrip("/")
    if not os.path.basename(relative):
        raise WeightsError(f"MODEL.WEIGHTS: {url}: the URL names no file")
    parts = [p for p in relative.split("/") if p not in ("", ".", "..")]
    return os.path.join(weights_cache_dir(), *parts)


def _offline_message(url: str, filename: str, reason: str) -> str:
    return (f"MODEL.WEIGHTS: cannot download {filename} ({reason}); on a machine without internet "
            f"access, download {url} elsewhere and pass the local path: MODEL.WEIGHTS "
            f"/path/to/{filename}")


def fetch_weights(url: str, timeout: float = 60.0) -> str:
    """The local path of the weights at ``url``: the cached file if there is one, else a checked
    download. Raises :class:`WeightsError` with one line for a failed, incomplete or refused
    download; the cache is then left as it was.

    ``http://``, ``https://`` and ``detectron2://`` URLs are fetched into the iopath cache
    detectron2 uses (``$FVCORE_CACHE``, else ``~/.torch/iopath_cache``; same layout, so a file
    detectron2 already cached is reused, and still read as data): downloaded to a temporary
    name, checked (as many bytes as ``Content-Length`` says; readable by
    :func:`read_checkpoint_file`) and only then renamed into place."""
    http_url = _http_url(url)
    target = cached_path(url)
    filename = os.path.basename(target)
    if os.path.isfile(target):
        logger.info("MODEL.WEIGHTS %s: cached in %s", url, target)
        return target
    logger.info("Downloading %s to %s ...", http_url, target)
    try:
        with atomic_path(target) as tmp:
            received, expected = _download(http_url, tmp, filename, timeout)
            if expected is not None and received != expected:
                raise WeightsError(
                    f"MODEL.WEIGHTS: the download of {filename} is incomplete ({received} of "
                    f"{expected} bytes); nothing was cached, try again")
            if received == 0:
                raise WeightsError(f"MODEL.WEIGHTS: the download of {filename} is empty; nothing "
                                   "was cached")
            read_checkpoint_file(tmp, name=f"{filename} (downloaded from {http_url})")
    except OSError as exc:  # the cache directory cannot be written
        raise WeightsError(f"MODEL.WEIGHTS: cannot write {target} ({exc}); set FVCORE_CACHE to "
                           "a writable directory") from None
    logger.info("Downloaded %s (%d bytes), checked, cached as %s", filename, received, target)
    return target


def _download(url: str, dest: str, filename: str, timeout: float) -> Tuple[int, Optional[int]]:
    """Copy ``url`` into ``dest``; returns (bytes received, Content-Length or None)."""
    received = 0
    try:
        with urllib.request.urlopen(url, timeout=timeout) as response, open(dest, "wb") as out:
            length = response.headers.get("Content-Length")
            expected = int(length) if length and length.isdigit() else None
            while True:
                chunk = response.read(_CHUNK)
                if not chunk:
                    break
                out.write(chunk)
                received += len(chunk)
    except urllib.error.HTTPError as exc:
        raise WeightsError(f"MODEL.WEIGHTS: cannot download {filename}: {url} answered HTTP "
                           f"{exc.code} {exc.reason}") from None
    except http.client.IncompleteRead as exc:
        raise WeightsError(f"MODEL.WEIGHTS: the download of {filename} is incomplete "
                           f"({received + len(exc.partial)} bytes, then the connection closed); "
                           "nothing was cached, try again") from None
    except urllib.error.URLError as exc:
        raise WeightsError(_offline_message(url, filename, str(exc.reason))) from None
    except (http.client.HTTPException, ConnectionError, TimeoutError) as exc:
        raise WeightsError(_offline_message(url, filename, f"{type(exc).__name__}: {exc}")) \
            from None
    return received, expected


# ---- the checkpointer ------------------------------------------------------------------------
class SafeDetectionCheckpointer(DetectionCheckpointer):
    """detectron2's ``DetectionCheckpointer`` whose files are read by :func:`read_checkpoint_file`
    (never plain ``pickle.load``, ``torch.load`` always ``weights_only=True``) and whose URLs are
    fetched by :func:`fetch_weights` (on each machine its local rank 0 downloads first, the
    others then take the cached file). A local path that is not a file is a
    :class:`WeightsError`. Every checkpointer of this project derives from it."""

    what = "checkpoint"  # how messages about a missing file call it

    def load(self, path, *args, **kwargs):
        if path and is_url(str(path)):
            url, _, query = str(path).partition("?")
            local = self._fetch(url)
            try:
                return super().load(local + (f"?{query}" if query else ""), *args, **kwargs)
            except WeightsError as exc:
                if "cannot read the checkpoint" not in str(exc):
                    raise
                raise WeightsError(f"{exc}; it is the cached download of {url}: delete {local} "
                                   "to download it again") from None
        if path and not os.path.isfile(str(path).split("?", 1)[0]):
            raise WeightsError(f"{self.what}: {path} does not exist or is not a file")
        return super().load(path, *args, **kwargs)

    @staticmethod
    def _fetch(url: str) -> str:
        if comm.get_world_size() == 1:
            return fetch_weights(url)
        if comm.get_local_rank() != 0:
            comm.synchronize()  # local rank 0 downloads first
            return fetch_weights(url)
        try:
            return fetch_weights(url)
        finally:
            comm.synchronize()

    def _load_file(self, filename):
        data = read_checkpoint_file(filename)
        parsed = getattr(self, "_parsed_url_during_load", None)
        queries = parse_qs(parsed.query) if parsed is not None else {}
        if queries.pop("matching_heuristics", None) == ["True"]:
            data["matching_heuristics"] = True
        if queries:
            raise WeightsError(f"{filename}: unsupported URL query {sorted(queries)} (only "
                               "matching_heuristics=True)")
        return data
