"""City-scale prediction (``tools/predict_city.py``; docs/CITY.md): a mosaic of
tiles (:mod:`.mosaic`) cut into units of work (:func:`plan_units`, whatever the tiles), sharded
over the processes of one or many machines, predicted with :class:`~.tiling.TiledPredictor`,
written per unit and recorded in a manifest (a rerun skips finished units); after a barrier each
process cuts its share of the inputs' class rasters from the units', and rank 0 merges the
layer and the summary. ``run.json`` refuses a rerun with another config or weights.
"""
import hashlib
import itertools
import json
import logging
import os
import re
import time
from dataclasses import dataclass, field
from typing import Dict, List, Optional, Tuple

import numpy as np

from ..fileio import write_text_atomic
from ..images import DatasetError
from .tiling import NODATA

logger = logging.getLogger(__name__)

RUN_FILE = "run.json"
MANIFEST_GLOB = re.compile(r"^manifest-rank(\d+)\.jsonl$")
THROUGHPUT_GLOB = re.compile(r"^throughput-rank(\d+)\.json$")
TILES_DIR, UNITS_DIR = "tiles", "units"
LAYER_FILE = "installations.gpkg"
LAYER_WGS84_FILE = "installations_wgs84.geojson"
DONE_STATUSES = ("ok", "nodata")
# Config keys that do not change the units' predictions (the merge is redone on every run).
# ROOFTOP.CITY.PART_SIZE is fingerprinted: it decides the units.
_NOT_FINGERPRINTED = ("OUTPUT_DIR", "ROOFTOP.TILE.BATCH_SIZE", "ROOFTOP.CITY.MIN_AREA_M2",
                      "ROOFTOP.CITY.SIMPLIFY_M", "ROOFTOP.CITY.RECTANGLE_CLASSES",
                      "ROOFTOP.CITY.RECTANGLE_MIN_FILL", "ROOFTOP.CITY.KWP_PER_M2",
                      "ROOFTOP.CITY.KWP_PER_M2_LOW", "ROOFTOP.CITY.KWP_PER_M2_HIGH",
                      "ROOFTOP.CITY.REVIEW_MIN_CONFIDENCE", "ROOFTOP.CITY.REVIEW_MIN_AREA_M2",
                      "ROOFTOP.CITY.REVIEW_MAX_AREA_M2")


def check_city_config(city_cfg):
    """One line naming the ``ROOFTOP.CITY`` key with a bad value (before any work)."""
    from ..classes import CLASS_NAMES, FOREGROUND_CLASSES
    from ..cli import UsageError
    from ..reports import capacity

    per_class = ", ".join(CLASS_NAMES)
    for key, example in (("MIN_AREA_M2", "[0.0,0.05,0.25,0.15]"),
                         ("REVIEW_MIN_AREA_M2", "[0,1,0.8,2]"),
                         ("REVIEW_MAX_AREA_M2", "[0,5000,12,150]")):
        values = list(city_cfg[key])
        if len(values) != len(CLASS_NAMES) or not all(
                isinstance(v, (int, float)) and v >= 0 for v in values):
            raise UsageError(f"ROOFTOP.CITY.{key} {values}: one area >= 0 (m²) per class "
                             f"({per_class}), e.g. {example}")
    lo, hi = city_cfg.REVIEW_MIN_AREA_M2, city_cfg.REVIEW_MAX_AREA_M2
    bad = [CLASS_NAMES[c] for c in FOREGROUND_CLASSES if not lo[c] < hi[c]]
    if bad:
        raise UsageError(f"ROOFTOP.CITY.REVIEW_MIN_AREA_M2 {list(lo)}, REVIEW_MAX_AREA_M2 "
                         f"{list(hi)}: the minimum must be below the maximum ({', '.join(bad)})")
    if not 0 <= city_cfg.REVIEW_MIN_CONFIDENCE <= 1:
        raise UsageError(f"ROOFTOP.CITY.REVIEW_MIN_CONFIDENCE {city_cfg.REVIEW_MIN_CONFIDENCE}: "
                         "must be in [0, 1]")
    capacity.check_densities(city_cfg.KWP_PER_M2_LOW, city_cfg.KWP_PER_M2,
                             city_cfg.KWP_PER_M2_HIGH, names=tuple(
                                 f"ROOFTOP.CITY.KWP_PER_M2{s}" for s in ("_LOW", "", "_HIGH")))


# --------------------------------------------------------------------------------------------
# fingerprint and manifest
# --------------------------------------------------------------------------------------------
def fingerprint(cfg, random_weights: bool) -> Dict:
    """What makes the units' predictions what they are: the config and the weights."""
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
    files; then write ``run.json``."""
    from ..cli import UserError

    path = os.path.join(output_dir, RUN_FILE)
    if os.path.isfile(path) and not restart:
        with open(path) as f:
            old = json.load(f)
        changed = [k for k in ("config_hash", "weights") if old.get(k) != fp[k]]
        if changed:
            what = " and ".join("the config" if k == "config_hash" else "the weights"
                                for k in changed)
            raise UserError(
                f"{output_dir}: made with another config or model ({what} changed: "
                + "; ".join(f"{k} {old.get(k)} -> {fp[k]}" for k in changed)
                + "); add --restart to predict everything again, or use another --output-dir")
    if restart:
        remove_run(output_dir)
    for folder in (TILES_DIR, UNITS_DIR):
        os.makedirs(os.path.join(output_dir, folder), exist_ok=True)
    write_text_atomic(path, json.dumps(fp, indent=1) + "\n")


def remove_run(output_dir):
    """The files a run writes (only those): manifests, units' and tiles' outputs, layer, summary."""
    from .planner import SUMMARY_OUTPUTS

    if not os.path.isdir(output_dir):
        return
    for name in os.listdir(output_dir):
        if MANIFEST_GLOB.match(name) or THROUGHPUT_GLOB.match(name) or name in (
                RUN_FILE, LAYER_FILE, LAYER_WGS84_FILE, *SUMMARY_OUTPUTS):
            os.remove(os.path.join(output_dir, name))
    for folder in (TILES_DIR, UNITS_DIR):
        folder = os.path.join(output_dir, folder)
        for name in os.listdir(folder) if os.path.isdir(folder) else ():
            if name.endswith(("_class.tif", "_features.gpkg")) or name.startswith("."):
                os.remove(os.path.join(folder, name))


def append_record(output_dir, rank, record: Dict):
    """One JSON line for a unit handled by ``rank``, appended to ``manifest-rank<R>.jsonl`` with
    one ``write`` and an fsync; a line cut by a kill is ignored when read (that unit is redone)."""
    record = {**record, "written_at": time.time()}  # the newest record of a unit wins
    fd = os.open(os.path.join(output_dir, f"manifest-rank{rank}.jsonl"),
                 os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o666)
    try:
        os.write(fd, (json.dumps(record, sort_keys=True) + "\n").encode())
        os.fsync(fd)
    finally:
        os.close(fd)


def read_manifests(output_dir, units=None) -> Dict[str, Dict]:
    """unit name -> its record, over every rank's manifest: of a unit's records (several after a
    rerun on another number of processes) one that is done (:func:`finished`) wins, then the
    newest. With ``units``, only records with the unit's key count (not those of another mosaic
    or part plan)."""
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
        keys = {u.name: u.key for u in units}
        by_name = {name: [r for r in records if r.get("key") == keys[name]]
                   for name, records in by_name.items() if name in keys}
    # max() keeps the first of equal keys: reversed, so that the last one in file order wins
    return {name: max(reversed(records), key=lambda r: (_is_done(output_dir, r),
                                                        r.get("written_at", 0.0)))
            for name, records in by_name.items() if records}


def _is_done(output_dir, record: Dict) -> bool:
    if record.get("status") not in DONE_STATUSES:
        return False
    return all(os.path.isfile(os.path.join(output_dir, o)) for o in record.get("outputs", {}).values())


def finished(output_dir, records: Dict[str, Dict]) -> Dict[str, Dict]:
    """The records of units that are done: status ok (outputs present) or nodata."""
    return {key: record for key, record in records.items() if _is_done(output_dir, record)}


def output_names(paths: List[str]) -> Dict[str, str]:
    """input path -> file name stem for its outputs (the stem, or stem_<hash> when two inputs
    share a stem)."""
    stems = {}
    for p in paths:
        stems.setdefault(os.path.splitext(os.path.basename(p))[0], []).append(p)
    return {p: stem if len(group) == 1 else
            f"{stem}_{hashlib.sha1(os.path.abspath(p).encode()).hexdigest()[:8]}"
            for stem, group in stems.items() for p in group}


# --------------------------------------------------------------------------------------------
# units
# --------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Unit:
    """A block of the mosaic, predicted from the windows that touch it."""

    name: str                                # output file stem: r<row0>_c<col0>
    region: Tuple[int, int, int, int]        # (row0, row1, col0, col1)
    extent: Tuple[int, int, int, int]        # the pixels its windows read
    key: str                                 # of what its pixels depend on: region, grid, tiles

    def describe(self):
        r0, r1, c0, c1 = self.region
        return f"mosaic rows {r0}-{r1}, columns {c0}-{c1}"


def _part_bounds(length, tile, stride, part_size):
    """Part boundaries along a side: every ~part_size pixels, at window starts."""
    from .tiling import window_starts

    starts = window_starts(length, tile, stride)
    step = max(1, int(round(part_size / stride)))
    return [starts[i] for i in range(0, len(starts), step)] + [length]


def plan_units(mosaic, tile_size, overlap, mode="auto", part_size=0) -> List[Unit]:
    """Blocks of about ``part_size`` px a side at window starts (``ROOFTOP.CITY.PART_SIZE``; 0:
    one unit), row by row, but those no tile covers: the same for any tiling of the pixels."""
    from .tiling import TiledPredictor

    layout = TiledPredictor(None, tile_size, overlap, mode)  # the windows only
    height, width = mosaic.height, mosaic.width
    rows, cols = [0, height], [0, width]
    if part_size > 0 and mode != "never":
        stride = tile_size - overlap
        rows = _part_bounds(height, tile_size, stride, part_size)
        cols = _part_bounds(width, tile_size, stride, part_size)
    grid = list(mosaic.transform)[:6]
    units = []
    for r0, r1 in zip(rows[:-1], rows[1:]):
        for c0, c1 in zip(cols[:-1], cols[1:]):
            region = (r0, r1, c0, c1)
            if not mosaic.tiles_in(*region):
                continue  # a gap between tiles
            extent = layout.window_extent(height, width, region)
            read = [os.path.realpath(t.path) for t in mosaic.tiles_in(*extent)]
            key = hashlib.sha1(json.dumps([region, grid, read]).encode()).hexdigest()[:16]
            units.append(Unit(f"r{r0}_c{c0}", region, extent, key))
    return units


def predict_unit(tiler, mosaic, unit: Unit, output_dir: str, rank: int = 0) -> Dict:
    """Predict and write one unit; its manifest record: status "failed" (a one-line message
    naming the tile that does not read), "nodata" (nothing written) or "ok"."""
    from affine import Affine

    from .sources import GeoReference
    from .vector_layer import unit_features, write_features
    from .writers import write_geotiff

    t0 = time.time()
    record = {"unit": unit.name, "key": unit.key, "region": list(unit.region), "rank": rank}
    try:
        with mosaic.open(unit.extent) as source:
            result = tiler.predict(source, unit.region, confidence=np.uint8)
    except DatasetError as e:
        return {**record, "status": "failed", "message": f"{e} ({unit.describe()})"}
    except (RuntimeError, ValueError, OSError, MemoryError) as e:
        return {**record, "status": "failed",
                "message": f"{unit.describe()}: prediction failed ({type(e).__name__}: {e})"}
    record.update(windows=result.windows, skipped_windows=result.skipped_windows,
                  predict_s=round(result.predict_s, 3), wait_s=round(result.wait_s, 3))
    counts = np.bincount(result.mask.ravel(), minlength=256)
    if counts[NODATA] == result.mask.size:
        return {**record, "status": "nodata", "outputs": {}, "seconds": round(time.time() - t0, 3),
                "message": f"{unit.describe()}: no data (nodata value, alpha, mask or no tile): "
                           "skipped"}
    r0, _, c0, _ = unit.region
    georef = GeoReference(mosaic.georef.crs, mosaic.transform @ Affine.translation(c0, r0))
    outputs = {"class": os.path.join(UNITS_DIR, f"{unit.name}_class.tif"),
               "features": os.path.join(UNITS_DIR, f"{unit.name}_features.gpkg")}
    write_geotiff(result.mask, os.path.join(output_dir, outputs["class"]), georef, NODATA)
    features = unit_features(result.mask, result.confidence, georef.transform, georef.crs, unit.name)
    write_features(features, os.path.join(output_dir, outputs["features"]))
    return {**record, "status": "ok", "outputs": outputs, "features": int(len(features)),
            "pixels_per_class": counts[:4].tolist(), "nodata_pixels": int(counts[NODATA]),
            "seconds": round(time.time() - t0, 3)}


# --------------------------------------------------------------------------------------------
# the run
# --------------------------------------------------------------------------------------------
@dataclass
class CityPlan:
    """What the launching process decided, handed to every worker."""

    config_file: str
    opts: List[str]
    output_dir: str
    mosaic: object                                   # :class:`~.mosaic.Mosaic`
    units: List[Unit] = field(default_factory=list)  # the work, in order (all shards)
    random_weights: bool = False
    zones: Optional[str] = None
    zone_field: Optional[str] = None
    num_processes_per_machine: int = 1


def run_shard(plan: CityPlan, rank: int, world_size: int, tiler_factory):
    """Predict this rank's unfinished units (``units[rank::world_size]``); logs throughput.
    ``tiler_factory()`` builds the :class:`~.tiling.TiledPredictor` (only when there is work)."""
    from tqdm import tqdm

    done = finished(plan.output_dir, read_manifests(plan.output_dir, plan.units))
    mine = plan.units[rank::world_size]
    todo = [u for u in mine if u.name not in done]
    if len(mine) > len(todo):
        logger.info("rank %d: %d of its %d unit(s) already finished: skipped", rank,
                    len(mine) - len(todo), len(mine))
    if not todo:
        return
    tiler = tiler_factory()
    totals = dict.fromkeys(("windows", "skipped_windows", "predict_s", "wait_s"), 0)
    t0 = time.time()
    for unit in tqdm(todo, desc=f"rank {rank}", unit="unit", disable=None):
        record = predict_unit(tiler, plan.mosaic, unit, plan.output_dir, rank)
        if record["status"] == "failed":
            logger.error("%s", record["message"])
        elif record["status"] == "nodata":
            logger.info("%s", record["message"])
        append_record(plan.output_dir, rank, record)
        for k in totals:
            totals[k] += record.get(k, 0)
    elapsed = time.time() - t0
    rate = totals["windows"] / elapsed if elapsed > 0 else 0.0
    write_text_atomic(os.path.join(plan.output_dir, f"throughput-rank{rank}.json"), json.dumps({
        "rank": rank, "world_size": world_size, "units": len(todo), **totals,
        "seconds": round(elapsed, 3), "windows_per_s": round(rate, 4),
        "wait_s": round(totals["wait_s"], 3), "predict_s": round(totals["predict_s"], 3),
        "batch_size": tiler.batch_size, "peak_rss_mb": round(peak_rss_mb(), 1),
        "torch_threads": _torch_threads()}, indent=1) + "\n")
    logger.info("rank %d: %d unit(s), %d windows (%d without data skipped) in %.1f s: %.2f "
                "windows/s; the model waited %.1f s for data, predicted %.1f s", rank, len(todo),
                totals["windows"], totals["skipped_windows"], elapsed, rate, totals["wait_s"],
                totals["predict_s"])


def peak_rss_mb():
    """This process's peak resident memory, MiB (Linux reports ru_maxrss in KiB)."""
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0


def _torch_threads():
    import sys

    return sys.modules["torch"].get_num_threads() if "torch" in sys.modules else None


def cut_tiles(plan: CityPlan, rank: int = 0, world_size: int = 1):
    """``tiles/<name>_class.tif`` of this rank's share of the inputs, cut from the units' class
    rasters once all its units are done, again when one is newer; an input without data warned."""
    import rasterio
    from rasterio.windows import Window

    from .writers import write_geotiff

    done = finished(plan.output_dir, read_manifests(plan.output_dir, plan.units))
    regions = np.array([u.region for u in plan.units]).reshape(-1, 4)
    names = output_names([t.path for t in plan.mosaic.tiles])
    for tile in plan.mosaic.tiles[rank::world_size]:
        r0, r1, c0, c1 = tile.row, tile.row + tile.height, tile.col, tile.col + tile.width
        hit = ((regions[:, 0] < r1) & (regions[:, 1] > r0) & (regions[:, 2] < c1) &
               (regions[:, 3] > c0))
        units = [plan.units[i] for i in np.flatnonzero(hit)]
        if any(u.name not in done for u in units):
            continue  # a unit failed: named in the run's errors
        rasters = [(u, os.path.join(plan.output_dir, done[u.name]["outputs"]["class"]))
                   for u in units if done[u.name]["status"] == "ok"]
        path = os.path.join(plan.output_dir, TILES_DIR, f"{names[tile.path]}_class.tif")
        if os.path.isfile(path) and all(os.path.getmtime(r) <= os.path.getmtime(path)
                                        for _, r in rasters):
            continue
        mask = np.full((tile.height, tile.width), NODATA, dtype=np.uint8)
        for u, raster in rasters:
            a0, a1 = max(r0, u.region[0]), min(r1, u.region[1])
            b0, b1 = max(c0, u.region[2]), min(c1, u.region[3])
            with rasterio.open(raster) as ds:
                mask[a0 - r0:a1 - r0, b0 - c0:b1 - c0] = ds.read(1, window=Window(
                    b0 - u.region[2], a0 - u.region[0], b1 - b0, a1 - a0))
        if (mask == NODATA).all():
            logger.warning("%s: no data (nodata value, alpha or mask everywhere)", tile.path)
        write_geotiff(mask, path, plan.mosaic.tile_georef(tile), NODATA)


def merge_run(plan: CityPlan, city_cfg):
    """Rank 0, after every rank finished: the layer, its WGS84 copy and the summary, streamed by
    rows of units: an installation is published with the row where it ends (memory: one row of
    units' features, those reaching the next row, and the map's centroids). Returns the counts."""
    import geopandas as gpd
    import pandas as pd
    import shapely

    from .planner import Summary
    from .vector_layer import (finish_layer, layer_options, merge_features, metric_crs,
                               read_features, write_layer)

    done = finished(plan.output_dir, read_manifests(plan.output_dir, plan.units))
    ok = [u for u in plan.units if done.get(u.name, {}).get("status") == "ok"]
    rows = [[u for u in ok if u.region[0] == r0] for r0 in dict.fromkeys(u.region[0] for u in ok)]
    mosaic, t = plan.mosaic, plan.mosaic.transform
    crs = mosaic.georef.crs
    (x0, y0), (x1, y1) = t @ (0, 0), t @ (mosaic.width, mosaic.height)
    metric = metric_crs(gpd.GeoDataFrame(geometry=[shapely.box(min(x0, x1), min(y0, y1),
                                                               max(x0, x1), max(y0, y1))], crs=crs))
    summary = Summary(plan.output_dir, plan.zones, plan.zone_field, crs)
    options = layer_options(city_cfg)
    counts = dict(features=0, groups=0, installations=0)

    def chunks():
        carry = read_features([], crs)  # installations reaching the next row of units
        for k, units in enumerate(rows):
            features = read_features([os.path.join(plan.output_dir, done[u.name]["outputs"][
                "features"]) for u in units], crs)
            counts["features"] += len(features)
            merged = merge_features(pd.concat([carry, features], ignore_index=True), mosaic)
            bottom = t.f + units[0].region[1] * t.e  # the row's lower edge, in the CRS
            bounds, tol = shapely.bounds(merged.geometry.values), 1e-3 * abs(t.e)
            reach = ((bounds[:, 1] - tol <= bottom) & (bottom <= bounds[:, 3] + tol)
                     if k + 1 < len(rows) else np.zeros(len(merged), bool))
            carry = merged[reach].assign(at_border=True, part="carried")[list(carry.columns)]
            counts["groups"] += int((~reach).sum())
            layer = finish_layer(merged[~reach], metric=metric,
                                 first_id=counts["installations"] + 1, **options)
            counts["installations"] += len(layer)
            summary.add(layer)
            yield layer

    empty = finish_layer(merge_features(read_features([], crs), mosaic), **options)
    write_layer(itertools.chain(chunks(), [empty]), os.path.join(plan.output_dir, LAYER_FILE),
                os.path.join(plan.output_dir, LAYER_WGS84_FILE))
    logger.info("%s: %d installation(s) from %d feature(s) of %d unit(s) (%d merged across unit "
                "borders, %d below ROOFTOP.CITY.MIN_AREA_M2 dropped)",
                os.path.join(plan.output_dir, LAYER_FILE), counts["installations"],
                counts["features"], len(ok), counts["features"] - counts["groups"],
                counts["groups"] - counts["installations"])
    summary.close()
    return counts


def setup_city_logging(output_dir, rank=0):
    """detectron2's logger for the run (console on rank 0, log.txt / log.txt.rank<R>); the same
    call in the launcher and in its worker, so the cached handlers are not added twice."""
    from detectron2.utils.logger import setup_logger

    from ..cli import tidy_log_handlers

    logger_ = setup_logger(output=output_dir, distributed_rank=rank, name="rooftop_m2f")
    tidy_log_handlers("rooftop_m2f")
    return logger_


def city_worker(plan: CityPlan, make_scorer=None):
    """One process of a run (rank from detectron2's ``launch``): :func:`run_city` with the
    PyTorch model of ``plan.config_file``. ``make_scorer(cfg)``: the window scorer (default
    :class:`~.predictor.RooftopPredictor`)."""
    import torch
    from detectron2.utils import comm

    from ..engine import build_cfg
    from .tiling import TiledPredictor

    rank, world = comm.get_rank(), comm.get_world_size()
    setup_city_logging(plan.output_dir, rank)
    cfg = build_cfg(plan.config_file, plan.opts)
    if world > 1 and cfg.MODEL.DEVICE == "cpu":  # share this machine's cores
        torch.set_num_threads(max(1, (os.cpu_count() or 1) // plan.num_processes_per_machine))

    def tiler():
        if plan.random_weights:
            torch.manual_seed(seed_of(cfg))  # the same untrained model in every process
        return TiledPredictor.from_config(cfg, make_scorer(cfg) if make_scorer else None,
                                          cfg.ROOFTOP.TILE.BATCH_SIZE)

    run_city(plan, cfg, rank, world, tiler, comm.synchronize)


def onnx_city(plan: CityPlan, cfg):
    """A run in this one process with an exported model on ONNX Runtime (no torch)."""
    from ..export.onnx_runtime import OnnxPredictor
    from .tiling import TiledPredictor

    run_city(plan, cfg, 0, 1, lambda: TiledPredictor.from_config(
        cfg, OnnxPredictor.from_config(cfg), cfg.ROOFTOP.TILE.BATCH_SIZE), lambda: None)


def run_city(plan: CityPlan, cfg, rank, world, tiler, synchronize):
    """Predict this rank's units, cut its inputs' class rasters, then (rank 0) merge;
    ``synchronize()`` waits for every rank."""
    run_shard(plan, rank, world, tiler)
    synchronize()  # every unit is written
    cut_tiles(plan, rank, world)
    synchronize()
    if rank == 0:
        merge_run(plan, cfg.ROOFTOP.CITY)
