"""City-scale prediction (``tools/predict_city.py``): every tile of an orthophoto mosaic, on every
process of one or many machines, resumable, into one merged layer of installations.

The inputs are cut into work units (:func:`plan_units`), sharded by position over the processes,
predicted window by window (:class:`CityTilePredictor`), written per unit and recorded in a
manifest so a rerun skips finished units; rank 0 then merges the layer and the summary. The run's
fingerprint (``run.json``) refuses a rerun with another config or weights. README, "Predict a city".
"""
import hashlib
import json
import logging
import os
import queue
import re
import threading
import time
from dataclasses import dataclass, field
from typing import Dict, List, Optional, Tuple

import numpy as np

from ..data.capetown import PALETTE, DatasetError
from ..fileio import atomic_path, write_text_atomic
from .tiling import confidence_of, ramp

logger = logging.getLogger(__name__)

NODATA = 255             # class raster value of pixels without data (not predicted)
RUN_FILE = "run.json"
MANIFEST_GLOB = re.compile(r"^manifest-rank(\d+)\.jsonl$")
THROUGHPUT_GLOB = re.compile(r"^throughput-rank(\d+)\.json$")
TILES_DIR = "tiles"
LAYER_FILE = "installations.gpkg"
LAYER_WGS84_FILE = "installations_wgs84.geojson"
DONE_STATUSES = ("ok", "nodata")
# Config keys that do not change the per-tile predictions (the merge is redone on every run).
# ROOFTOP.CITY.PART_SIZE is fingerprinted: it decides the units' names and regions.
_NOT_FINGERPRINTED = ("OUTPUT_DIR", "ROOFTOP.TILE.BATCH_SIZE", "ROOFTOP.CITY.MIN_AREA_M2",
                      "ROOFTOP.CITY.SIMPLIFY_M", "ROOFTOP.CITY.RECTANGLE_CLASSES",
                      "ROOFTOP.CITY.RECTANGLE_MIN_FILL", "ROOFTOP.CITY.KWP_PER_M2")


# --------------------------------------------------------------------------------------------
# fingerprint and manifest
# --------------------------------------------------------------------------------------------
def fingerprint(cfg, random_weights: bool) -> Dict:
    """What makes per-tile predictions what they are: the config and the weights."""
    import yaml

    data = yaml.safe_load(cfg.dump())
    for key in _NOT_FINGERPRINTED:
        *parents, leaf = key.split(".")
        node = data
        for p in parents:
            node = node.get(p, {})
        node.pop(leaf, None)
    config_hash = hashlib.sha256(json.dumps(data, sort_keys=True).encode()).hexdigest()[:16]
    weights = cfg.MODEL.WEIGHTS
    if random_weights and not weights:
        weights_id = f"random weights, seed {seed_of(cfg)}"
    elif os.path.isfile(weights):
        st = os.stat(weights)
        weights_id = f"{os.path.abspath(weights)} ({st.st_size} bytes, mtime {int(st.st_mtime)})"
    else:
        weights_id = weights
    return {"config_hash": config_hash, "weights": weights_id}


def seed_of(cfg):
    """The seed of ``--random-weights`` models: the same untrained model in every process."""
    return int(cfg.SEED) if int(cfg.SEED) >= 0 else 0


def check_or_start_run(output_dir, fp: Dict, restart: bool):
    """Refuse a changed config or model (one line), or (``restart``) remove the previous run's
    files; then write ``run.json``. Returns the number of finished inputs kept."""
    path = os.path.join(output_dir, RUN_FILE)
    if os.path.isfile(path) and not restart:
        with open(path) as f:
            old = json.load(f)
        changed = [k for k in ("config_hash", "weights") if old.get(k) != fp[k]]
        if changed:
            what = " and ".join("the config" if k == "config_hash" else "the weights"
                                for k in changed)
            raise _user_error(
                f"{output_dir}: made with another config or model ({what} changed: "
                + "; ".join(f"{k} {old.get(k)} -> {fp[k]}" for k in changed)
                + "); add --restart to predict everything again, or use another --output-dir")
    if restart:
        remove_run(output_dir)
    os.makedirs(os.path.join(output_dir, TILES_DIR), exist_ok=True)
    write_text_atomic(path, json.dumps(fp, indent=1) + "\n")


def _user_error(message):
    from ..cli import UserError

    return UserError(message)


def remove_run(output_dir):
    """The files a run writes (only those): manifests, tiles' outputs, layer and summary."""
    from .planner import SUMMARY_OUTPUTS

    if not os.path.isdir(output_dir):
        return
    for name in os.listdir(output_dir):
        if MANIFEST_GLOB.match(name) or THROUGHPUT_GLOB.match(name) or name in (
                RUN_FILE, LAYER_FILE, LAYER_WGS84_FILE, *SUMMARY_OUTPUTS):
            os.remove(os.path.join(output_dir, name))
    tiles = os.path.join(output_dir, TILES_DIR)
    if os.path.isdir(tiles):
        for name in os.listdir(tiles):
            if name.endswith(("_class.tif", "_features.gpkg")) or name.startswith("."):
                os.remove(os.path.join(tiles, name))


class Manifest:
    """``manifest-rank<R>.jsonl``: one JSON line per input handled by rank R, appended with one
    ``write`` and an fsync. A line cut by a kill is ignored when read (that input is redone)."""

    def __init__(self, output_dir, rank):
        self.path = os.path.join(output_dir, f"manifest-rank{rank}.jsonl")

    def append(self, record: Dict):
        record = {**record, "written_at": time.time()}  # the newest record of a unit wins
        line = (json.dumps(record, sort_keys=True) + "\n").encode()
        fd = os.open(self.path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o666)
        try:
            os.write(fd, line)
            os.fsync(fd)
        finally:
            os.close(fd)


def read_manifests(output_dir, units=None) -> Dict[str, Dict]:
    """unit name -> its record, over every rank's manifest (a unit may have records in several
    ranks' files after a rerun on another number of processes). Of a unit's records, one that is
    done (:func:`finished`) wins over one that is not, then the newest (``written_at``). With
    ``units``, only records of that input and region count: a record left by another input with
    the same name, or another part plan, is not the unit's."""
    by_name = {}
    if not os.path.isdir(output_dir):
        return {}
    for name in sorted(os.listdir(output_dir), key=lambda n: (len(n), n)):
        if not MANIFEST_GLOB.match(name):
            continue
        with open(os.path.join(output_dir, name)) as f:
            for line in f:
                try:
                    record = json.loads(line)
                except json.JSONDecodeError:
                    continue  # cut by a kill
                if isinstance(record, dict) and "unit" in record:
                    by_name.setdefault(record["unit"], []).append(record)
    if units is not None:
        wanted = {u.name: u for u in units}
        by_name = {name: [r for r in records if _is_record_of(r, wanted[name])]
                   for name, records in by_name.items() if name in wanted}
    # max() keeps the first of equal keys: reversed, so that the last one in file order wins
    return {name: max(reversed(records), key=lambda r: (_is_done(output_dir, r),
                                                        r.get("written_at", 0.0)))
            for name, records in by_name.items() if records}


def _is_record_of(record: Dict, unit) -> bool:
    region = list(unit.region) if unit.region else None
    return (os.path.realpath(str(record.get("input", ""))) == os.path.realpath(unit.path)
            and record.get("region") == region)


def _is_done(output_dir, record: Dict) -> bool:
    if record.get("status") not in DONE_STATUSES:
        return False
    outputs = record.get("outputs", {}).values()
    return all(os.path.isfile(os.path.join(output_dir, o)) for o in outputs)


def finished(output_dir, records: Dict[str, Dict]) -> Dict[str, Dict]:
    """The records of units that are done: status ok (outputs present) or nodata."""
    return {key: record for key, record in records.items() if _is_done(output_dir, record)}


def output_names(paths: List[str]) -> Dict[str, str]:
    """input path -> file name stem for its outputs (the stem, or stem_<hash> when two inputs
    share a stem)."""
    stems = {}
    for p in paths:
        stems.setdefault(os.path.splitext(os.path.basename(p))[0], []).append(p)
    names = {}
    for stem, group in stems.items():
        for p in group:
            names[p] = stem if len(group) == 1 else \
                f"{stem}_{hashlib.sha1(os.path.abspath(p).encode()).hexdigest()[:8]}"
    return names


# --------------------------------------------------------------------------------------------
# one tile
# --------------------------------------------------------------------------------------------
@dataclass
class TileStats:
    windows: int = 0
    skipped_windows: int = 0
    predict_s: float = 0.0
    wait_s: float = 0.0
    pixels_with_data: int = 0


@dataclass
class TileResult:
    mask: np.ndarray               # (H, W) uint8 classes, NODATA where no data
    confidence_q: np.ndarray       # (H, W) uint8, confidence x 255
    stats: TileStats = field(default_factory=TileStats)


def _read_ahead(source, ys, th, cols, read_fn, valid_fn, out: "queue.Queue",
                stop: threading.Event):
    try:
        for y0 in ys:
            if stop.is_set():
                return
            rows = read_fn(source, y0, y0 + th, *cols)
            valid = valid_fn(source, y0, y0 + th, *cols)
            out.put((y0, rows, valid))
    except BaseException as e:  # noqa: BLE001 - handed to the consumer, raised there
        out.put(e)


class CityTilePredictor:
    """Predicts one raster by windows: read ahead in a background thread, windows without data
    skipped, ``batch_size`` windows per forward pass, scores blended with the ramps of
    :class:`~.tiling.TiledPredictor` (same layout, same weights)."""

    def __init__(self, tiler, batch_size: int = 1, read_ahead: int = 2):
        if int(batch_size) < 1:
            raise ValueError(f"batch size must be >= 1, got {batch_size}")
        self.tiler = tiler
        self.batch_size = int(batch_size)
        self.read_ahead = read_ahead

    def _scores(self, windows):
        predictor = self.tiler.predictor
        if self.batch_size > 1 and not self.tiler.tta and hasattr(predictor, "scores_batch"):
            out = predictor.scores_batch(windows)
            return [np.asarray(s.numpy() if hasattr(s, "numpy") else s, dtype=np.float32)
                    for s in out]
        return [self.tiler.window_scores(w) for w in windows]

    def predict(self, source, valid_fn=None, region=None, read_fn=None) -> TileResult:
        """Class mask and confidence of ``region`` = (row0, row1, col0, col1) of the source
        (default: all of it). Only the windows that touch the region are predicted, with the
        blending weights of the whole image's layout, so the region's pixels are exactly those
        of a prediction of the whole image. ``read_fn(source, y0, y1, x0, x1)`` -> RGB rows and
        ``valid_fn`` (same arguments) -> bool data mask: :func:`.mosaic.read_block` and
        :func:`.mosaic.valid_block` by default."""
        from .mosaic import read_block, valid_block

        read_fn = read_fn or read_block
        valid_fn = valid_fn or valid_block
        height, width = source.height, source.width
        r0, r1, c0, c1 = region or (0, height, 0, width)
        ys, xs, th, tw = self.tiler.layout(height, width)
        ys = [y for y in ys if y < r1 and y + th > r0]
        xs = [x for x in xs if x < c1 and x + tw > c0]
        ax0, ax1 = xs[0], xs[-1] + tw  # the accumulator's columns (image coordinates)
        overlap = self.tiler.overlap
        col_w = {x0: ramp(tw, overlap, x0 > 0, x0 + tw < width) for x0 in xs}
        mask = np.full((r1 - r0, c1 - c0), NODATA, dtype=np.uint8)
        conf = np.zeros((r1 - r0, c1 - c0), dtype=np.uint8)
        valid_all = np.zeros((r1 - r0, c1 - c0), dtype=bool)
        stats = TileStats()
        acc = weights = None
        base = ys[0]

        def finish(y_from, n):  # image rows y_from .. y_from + n, clipped to the region
            lo, hi = max(y_from, r0), min(y_from + n, r1)
            if lo >= hi:
                return
            w = weights[lo - y_from:hi - y_from, c0 - ax0:c1 - ax0]
            covered = w > 0
            scores = acc[:, lo - y_from:hi - y_from, c0 - ax0:c1 - ax0] / np.where(covered, w, 1.0)
            ok = covered & valid_all[lo - r0:hi - r0]
            mask[lo - r0:hi - r0] = np.where(ok, scores.argmax(0).astype(np.uint8), NODATA)
            conf[lo - r0:hi - r0] = np.where(
                ok, np.round(confidence_of(scores) * 255).astype(np.uint8), 0)

        rows_q: "queue.Queue" = queue.Queue(maxsize=self.read_ahead)
        stop = threading.Event()
        reader = threading.Thread(target=_read_ahead, daemon=True,
                                  args=(source, ys, th, (ax0, ax1), read_fn, valid_fn, rows_q,
                                        stop))
        reader.start()
        try:
            for _ in ys:
                t0 = time.perf_counter()
                item = rows_q.get()
                stats.wait_s += time.perf_counter() - t0
                if isinstance(item, BaseException):
                    raise item
                y0, rows, valid = item
                if y0 > base:  # rows base .. y0 are final: no later window covers them
                    if acc is not None:
                        n = y0 - base
                        finish(base, n)
                        acc[:, :-n] = acc[:, n:].copy()
                        acc[:, -n:] = 0
                        weights[:-n] = weights[n:].copy()
                        weights[-n:] = 0
                    base = y0
                lo, hi = max(y0, r0), min(y0 + th, r1)
                valid_all[lo - r0:hi - r0] = valid[lo - y0:hi - y0, c0 - ax0:c1 - ax0]
                row_w = ramp(th, overlap, y0 > 0, y0 + th < height)
                todo = [x0 for x0 in xs if valid[:, x0 - ax0:x0 - ax0 + tw].any()]
                stats.skipped_windows += len(xs) - len(todo)
                for b in range(0, len(todo), self.batch_size):
                    batch = todo[b:b + self.batch_size]
                    t0 = time.perf_counter()
                    scores_list = self._scores([np.ascontiguousarray(rows[:, x0 - ax0:x0 - ax0 + tw])
                                                for x0 in batch])
                    stats.predict_s += time.perf_counter() - t0
                    stats.windows += len(batch)
                    for x0, scores in zip(batch, scores_list):
                        if acc is None:
                            acc = np.zeros((scores.shape[0], th, ax1 - ax0), dtype=np.float32)
                            weights = np.zeros((th, ax1 - ax0), dtype=np.float32)
                        w = row_w[:, None] * col_w[x0][None, :]
                        acc[:, :, x0 - ax0:x0 - ax0 + tw] += scores * w
                        weights[:, x0 - ax0:x0 - ax0 + tw] += w
            if acc is not None:
                finish(base, ys[-1] + th - base)
        finally:
            stop.set()
            while reader.is_alive():  # unblock a reader waiting on a full queue
                try:
                    rows_q.get_nowait()
                except queue.Empty:
                    reader.join(0.05)
        stats.pixels_with_data = int(np.count_nonzero(valid_all))
        return TileResult(mask, conf, stats)


def write_class_geotiff(mask: np.ndarray, path, crs, transform):
    """uint8 class GeoTIFF: deflate, 256 px internal tiles, NODATA 255, the palette."""
    import rasterio

    height, width = mask.shape
    profile = {"driver": "GTiff", "height": height, "width": width, "count": 1, "dtype": "uint8",
               "compress": "deflate", "nodata": NODATA, "crs": crs, "transform": transform}
    if height >= 256 and width >= 256:
        profile.update(tiled=True, blockxsize=256, blockysize=256)
    with atomic_path(path) as tmp:
        with rasterio.open(tmp, "w", **profile) as dst:
            dst.write_colormap(1, {i: tuple(c) + (255,) for i, c in enumerate(PALETTE)})
            dst.write(mask, 1)


@dataclass(frozen=True)
class Unit:
    """A unit of work: a whole input, or a part (region) of a large one."""

    path: str
    name: str                                        # output file stem, unique in the run
    region: Optional[Tuple[int, int, int, int]] = None  # (row0, row1, col0, col1); None: all

    def describe(self):
        if self.region is None:
            return self.path
        r0, r1, c0, c1 = self.region
        return f"{self.path} rows {r0}-{r1}, columns {c0}-{c1}"


def _part_bounds(length, tile, stride, part_size):
    """Part boundaries along a side: every ~part_size pixels, at window starts."""
    from .tiling import window_starts

    starts = window_starts(length, tile, stride)
    step = max(1, int(round(part_size / stride)))
    return [starts[i] for i in range(0, len(starts), step)] + [length]


def plan_units(inputs, tile_size, overlap, mode="auto", part_size=0) -> List[Unit]:
    """One unit per input, or, for an input larger than ``part_size`` on a side, one per block
    of about ``part_size`` x ``part_size`` pixels (``ROOFTOP.CITY.PART_SIZE``; 0: never), so
    that a huge raster (a VRT of a whole city) is shared by the processes and each holds one
    part in memory. ``inputs``: :class:`~.mosaic.MosaicInput`."""
    names = output_names([i.path for i in inputs])
    units = []
    for info in inputs:
        name = names[info.path]
        big = part_size > 0 and mode != "never" and max(info.height, info.width) > part_size
        if not big:
            units.append(Unit(info.path, name))
            continue
        stride = tile_size - overlap
        rows = _part_bounds(info.height, tile_size, stride, part_size)
        cols = _part_bounds(info.width, tile_size, stride, part_size)
        for r0, r1 in zip(rows[:-1], rows[1:]):
            for c0, c1 in zip(cols[:-1], cols[1:]):
                units.append(Unit(info.path, f"{name}_r{r0}_c{c0}", (r0, r1, c0, c1)))
    return units


def predict_input(tile_predictor: CityTilePredictor, unit: Unit, output_dir: str,
                  rank: int = 0) -> Dict:
    """Predict one unit and write its outputs; returns its manifest record. A problem with the
    file gives status "failed" with a one-line message naming it; a unit without any data
    "nodata" (nothing predicted, nothing written)."""
    from rasterio.windows import Window
    from rasterio.windows import transform as window_transform

    from .sources import RasterioSource
    from .vector_layer import tile_features, write_tile_features

    path, name = unit.path, unit.name
    t0 = time.time()
    record = {"input": path, "unit": name, "region": list(unit.region) if unit.region else None,
              "rank": rank}
    try:
        with RasterioSource(path) as source:
            result = tile_predictor.predict(source, region=unit.region)
            crs, transform = source.georef.crs, source.georef.transform
    except DatasetError as e:
        return {**record, "status": "failed", "message": str(e)}
    except (RuntimeError, ValueError, OSError, MemoryError) as e:
        return {**record, "status": "failed",
                "message": f"{unit.describe()}: prediction failed ({type(e).__name__}: {e})"}
    if unit.region is not None:
        r0, r1, c0, c1 = unit.region
        transform = window_transform(Window(c0, r0, c1 - c0, r1 - r0), transform)
    stats = result.stats
    record.update(windows=stats.windows, skipped_windows=stats.skipped_windows,
                  predict_s=round(stats.predict_s, 3), wait_s=round(stats.wait_s, 3))
    if stats.pixels_with_data == 0:
        return {**record, "status": "nodata", "outputs": {},
                "message": f"{unit.describe()}: no data (nodata value, alpha or mask "
                           "everywhere): skipped", "seconds": round(time.time() - t0, 3)}
    class_rel = os.path.join(TILES_DIR, f"{name}_class.tif")
    features_rel = os.path.join(TILES_DIR, f"{name}_features.gpkg")
    write_class_geotiff(result.mask, os.path.join(output_dir, class_rel), crs, transform)
    features = tile_features(result.mask, result.confidence_q, transform, crs,
                             os.path.basename(path), part=name)
    write_tile_features(features, os.path.join(output_dir, features_rel))
    counts = np.bincount(result.mask.ravel(), minlength=256)
    return {**record, "status": "ok", "outputs": {"class": class_rel, "features": features_rel},
            "features": int(len(features)), "pixels_per_class": counts[:4].tolist(),
            "nodata_pixels": int(counts[NODATA]), "seconds": round(time.time() - t0, 3)}


# --------------------------------------------------------------------------------------------
# the run
# --------------------------------------------------------------------------------------------
@dataclass
class CityPlan:
    """What the launching process decided, handed to every worker."""

    config_file: str
    opts: List[str]
    output_dir: str
    inputs: List[str]                   # to predict, in order
    crs_wkt: Optional[str]
    units: List[Unit] = field(default_factory=list)  # the work, in order (all shards)
    random_weights: bool = False
    zones: Optional[str] = None
    zone_field: Optional[str] = None
    num_processes_per_machine: int = 1


def shard(units: List, rank: int, world_size: int) -> List:
    return list(units[rank::world_size])


def run_shard(plan: CityPlan, rank: int, world_size: int, tile_predictor_factory):
    """Predict this rank's unfinished units; logs throughput. ``tile_predictor_factory()``
    builds the :class:`CityTilePredictor` (only when there is work)."""
    from tqdm import tqdm

    done = finished(plan.output_dir, read_manifests(plan.output_dir, plan.units))
    mine = shard(plan.units, rank, world_size)
    todo = [u for u in mine if u.name not in done]
    if len(mine) > len(todo):
        logger.info("rank %d: %d of its %d input(s) already finished: skipped", rank,
                    len(mine) - len(todo), len(mine))
    if not todo:
        return
    tile_predictor = tile_predictor_factory()
    manifest = Manifest(plan.output_dir, rank)
    totals = TileStats()
    t0 = time.time()
    for unit in tqdm(todo, desc=f"rank {rank}", unit="tile", disable=None):
        record = predict_input(tile_predictor, unit, plan.output_dir, rank)
        if record["status"] == "failed":
            logger.error("%s", record["message"])
        elif record["status"] == "nodata":  # a part of a large raster: its margins often are
            (logger.warning if unit.region is None else logger.info)("%s", record["message"])
        manifest.append(record)
        totals.windows += record.get("windows", 0)
        totals.skipped_windows += record.get("skipped_windows", 0)
        totals.predict_s += record.get("predict_s", 0.0)
        totals.wait_s += record.get("wait_s", 0.0)
    elapsed = time.time() - t0
    write_text_atomic(os.path.join(plan.output_dir, f"throughput-rank{rank}.json"), json.dumps({
        "rank": rank, "world_size": world_size, "tiles": len(todo), "windows": totals.windows,
        "skipped_windows": totals.skipped_windows, "seconds": round(elapsed, 3),
        "windows_per_s": round(totals.windows / elapsed, 4) if elapsed > 0 else 0.0,
        "wait_s": round(totals.wait_s, 3), "predict_s": round(totals.predict_s, 3),
        "batch_size": tile_predictor.batch_size, "peak_rss_mb": round(peak_rss_mb(), 1),
        "torch_threads": _torch_threads()}, indent=1) + "\n")
    logger.info("rank %d: %d tile(s), %d windows (%d without data skipped) in %.1f s: %.2f "
                "windows/s; the model waited %.1f s for data, predicted %.1f s", rank, len(todo),
                totals.windows, totals.skipped_windows, elapsed,
                totals.windows / elapsed if elapsed > 0 else 0.0, totals.wait_s, totals.predict_s)


def peak_rss_mb():
    """This process's peak resident memory, MiB (Linux reports ru_maxrss in KiB)."""
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0


def _torch_threads():
    try:
        import torch

        return torch.get_num_threads()
    except ImportError:  # pragma: no cover
        return None


def merge_run(plan: CityPlan, city_cfg, kwp_per_m2: float):
    """Rank 0, after every rank finished: the merged layer, its WGS84 copy and the summary."""
    import geopandas as gpd

    from . import planner
    from .vector_layer import finish_layer, merge_tile_features, read_features, write_layer

    done = finished(plan.output_dir, read_manifests(plan.output_dir, plan.units))
    frames = []
    for unit in plan.units:  # input order, whatever order the ranks finished in
        record = done.get(unit.name)
        if record and record["status"] == "ok":
            frames.append(read_features(os.path.join(plan.output_dir,
                                                      record["outputs"]["features"])))
    crs = gpd.GeoSeries([], crs=plan.crs_wkt).crs if plan.crs_wkt else None
    merged = merge_tile_features(frames, crs)
    parts = sum(len(f) for f in frames)
    layer = finish_layer(merged, list(city_cfg.MIN_AREA_M2), float(city_cfg.SIMPLIFY_M),
                         tuple(city_cfg.RECTANGLE_CLASSES), float(city_cfg.RECTANGLE_MIN_FILL))
    write_layer(layer, os.path.join(plan.output_dir, LAYER_FILE),
                os.path.join(plan.output_dir, LAYER_WGS84_FILE))
    logger.info("%s: %d installation(s) from %d tile feature(s) of %d tile(s) (%d merged across "
                "tile borders, %d below ROOFTOP.CITY.MIN_AREA_M2 dropped)",
                os.path.join(plan.output_dir, LAYER_FILE), len(layer), parts, len(frames),
                parts - len(merged), len(merged) - len(layer))
    planner.write_summary(layer, plan.output_dir, kwp_per_m2, plan.zones, plan.zone_field)
    return layer


def setup_city_logging(output_dir, rank=0):
    """detectron2's logger for the run (console on rank 0, log.txt / log.txt.rank<R>); the same
    call in the launcher and in its worker, so the cached handlers are not added twice."""
    from detectron2.utils.logger import setup_logger

    from ..cli import tidy_log_handlers

    logger_ = setup_logger(output=output_dir, distributed_rank=rank, name="rooftop_m2f")
    tidy_log_handlers("rooftop_m2f")
    return logger_


def city_worker(plan: CityPlan):
    """One process of a run (its rank from detectron2's ``launch``): predict this rank's shard,
    wait for every rank, then (rank 0) merge."""
    import torch
    from detectron2.utils import comm
    from ..engine import build_cfg
    from .tiling import TiledPredictor

    rank, world = comm.get_rank(), comm.get_world_size()
    setup_city_logging(plan.output_dir, rank)
    cfg = build_cfg(plan.config_file, plan.opts)
    if world > 1 and cfg.MODEL.DEVICE == "cpu":  # share this machine's cores
        torch.set_num_threads(max(1, (os.cpu_count() or 1) // plan.num_processes_per_machine))

    def tile_predictor():
        if plan.random_weights:
            torch.manual_seed(seed_of(cfg))  # the same untrained model in every process
        return CityTilePredictor(TiledPredictor.from_config(cfg), cfg.ROOFTOP.TILE.BATCH_SIZE)

    run_shard(plan, rank, world, tile_predictor)
    comm.synchronize()  # every rank's tiles are written
    if rank == 0:
        merge_run(plan, cfg.ROOFTOP.CITY, float(cfg.ROOFTOP.CITY.KWP_PER_M2))
