"""Accuracy of an installations layer over a labelled area (``city_report.py accuracy``).

Both layers are cut to the labelled area's outline (an installation across it counts with its
part inside). A predicted installation matches a reference installation of the same class when
their IoU is at least ``iou_threshold`` (one-to-one, :func:`.matching.one_to_one`). Per class
(and ``all``), and per zone with zones: installation-level precision, recall and F1, count
error, area error of the matched installations, total area error, pixel IoU over the area,
and the panels' kWp with its bounds.

IoU and pixel IoU are those of the outlines, in a CRS with true areas
(:func:`~rooftop_m2f.inference.vector_layer.metric_crs`). An installation's area is its
``area_m2`` field where its layer has one (the city layer's: the area of its pixels, what the
summary and kWp add up; the published outline of a panel array may be a rectangle a little
larger) times the share of its outline inside the labelled area, else the area of its outline
inside: the same rule for both layers, so a layer against itself has no area error.
"""
import json
import logging
import math
import os
from dataclasses import dataclass
from typing import Optional

import numpy as np

from ..classes import CLASS_NAMES, FOREGROUND_CLASSES
from ..fileio import write_text_atomic
from . import capacity, inputs
from .matching import candidate_pairs, iou, one_to_one
from .outputs import write_csv

CSV_FILE, GPKG_FILE, PNG_FILE, JSON_FILE = ("accuracy.csv", "accuracy.gpkg", "accuracy.png",
                                            "accuracy.json")
OUTPUTS = (CSV_FILE, GPKG_FILE, PNG_FILE, JSON_FILE)  # the JSON last: the report is complete
ALL = "ALL"
ALL_CLASSES = "all"
CLASS_FIELDS = ("class_id", "class_name", "class")
AREA_FIELD = "area_m2"
logger = logging.getLogger(__name__)
COLUMNS = ("zone", "class_id", "class_name", "reference", "predicted", "true_positives",
           "false_positives", "false_negatives", "precision", "recall", "f1", "count_error",
           "count_error_rel", "reference_area_m2", "predicted_area_m2", "matched_reference_area_m2",
           "matched_predicted_area_m2", "area_error_rel", "mean_abs_area_error_rel",
           "total_area_error_rel", "pixel_iou", "est_kwp", "est_kwp_low", "est_kwp_high",
           "reference_kwp")


@dataclass
class Inputs:
    layer: object        # GeoDataFrame, the installations
    reference: object    # GeoDataFrame with class_id, in the layer's CRS
    area: object         # shapely geometry, in the layer's CRS
    zones: Optional[object] = None
    sources: dict = None


def load(layer_src, reference_src, area_src, class_field=None, zones_src=None, zone_field=None):
    """Read and check every input (one line per problem) before anything is computed."""
    layer = inputs.read_installations(layer_src, "--layer", fields=("class_id",))
    reference = inputs.polygons_only(inputs.read_vector(reference_src, "--reference"),
                                     "--reference", reference_src)
    if class_field is None:
        class_field = next((f for f in CLASS_FIELDS if f in reference.columns), None)
        if class_field is None:
            inputs.require_fields(reference, ["class_id, class_name or class (name it with "
                                              "--class-field)"], "--reference", reference_src)
    inputs.require_fields(reference, [class_field], "--reference", reference_src)
    reference["class_id"] = inputs.class_ids(reference[class_field], "--reference", reference_src,
                                             class_field)
    reference = inputs.reproject(reference, layer.crs, "--reference", reference_src)
    area = inputs.read_area(area_src, layer.crs)
    zones = inputs.read_zones(zones_src, zone_field, layer.crs)
    return Inputs(layer, reference, area, zones, {
        "layer": str(layer_src), "reference": str(reference_src), "area": str(area_src),
        "class_field": class_field, "zones": zones_src})


def clip(gdf, area, metric):
    """The rows of ``gdf`` inside ``area``, cut to it, with ``row`` (their position in
    ``gdf``), ``outline_m2`` (the outline's area inside, in ``metric``) and ``area_m`` (see
    the module docstring: ``area_m2`` x the share of the outline inside, or ``outline_m2``)."""
    import shapely

    rows = np.sort(gdf.sindex.query(area, predicate="intersects"))
    part = gdf.iloc[rows].copy()
    part["row"] = rows
    whole = part.geometry.to_crs(metric).area.to_numpy() if len(part) else np.zeros(0)
    part = part.set_geometry(inputs.polygonal(shapely.intersection(part.geometry.values, area)),
                             crs=gdf.crs)
    in_metric = part.geometry.to_crs(metric) if metric != gdf.crs else part.geometry
    part["outline_m2"] = in_metric.area.to_numpy()
    part["area_m"] = part["outline_m2"].to_numpy()
    if AREA_FIELD in part.columns:
        share = np.divide(part["outline_m2"].to_numpy(), whole, out=np.zeros(len(part)),
                          where=whole > 0)
        part["area_m"] = part[AREA_FIELD].to_numpy(dtype=float) * share
    keep = part["outline_m2"].to_numpy() > 0
    return part[keep].reset_index(drop=True), in_metric[keep].reset_index(drop=True)


def _zone_of(frame, zones):
    from ..inference.planner import assign_zones

    if zones is None or len(frame) == 0:
        return np.full(len(frame), ALL, dtype=object)
    return assign_zones(frame, zones)


def evaluate(data: Inputs, iou_threshold=0.5, kwp=(capacity.KWP_PER_M2_LOW, capacity.KWP_PER_M2,
                                                    capacity.KWP_PER_M2_HIGH)):
    """(rows of :data:`COLUMNS`, outcome frames {true_positives, false_positives,
    false_negatives} in the layer's CRS, settings dict)."""
    import geopandas as gpd
    import shapely

    from ..inference.vector_layer import metric_crs

    metric = metric_crs(data.layer)
    pred, pred_m = clip(data.layer, data.area, metric)
    ref, ref_m = clip(data.reference, data.area, metric)
    if len(pred) == 0 and len(ref) == 0:
        logger.warning("--area %s: no installation of the layer or the reference in the labelled "
                       "area; do they overlap?", (data.sources or {}).get("area", ""))
    pc, rc = pred["class_id"].to_numpy(), ref["class_id"].to_numpy()
    pa, ra = pred["area_m"].to_numpy(), ref["area_m"].to_numpy()
    i, j, inter = candidate_pairs(pred_m.values, pc, ref_m.values, rc)
    score = iou(inter, pred["outline_m2"].to_numpy()[i], ref["outline_m2"].to_numpy()[j])
    mi, mj = one_to_one(i, j, score, len(pred), len(ref), iou_threshold)
    pair_iou = dict(zip(zip(i.tolist(), j.tolist()), score.tolist()))
    best_p, best_r = np.zeros(len(pred)), np.zeros(len(ref))
    np.maximum.at(best_p, i, score)
    np.maximum.at(best_r, j, score)
    matched_p, matched_r = np.zeros(len(pred), bool), np.zeros(len(ref), bool)
    matched_p[mi], matched_r[mj] = True, True
    pred["zone"], ref["zone"] = _zone_of(pred, data.zones), _zone_of(ref, data.zones)
    area_m = gpd.GeoSeries([data.area], crs=data.layer.crs).to_crs(metric).iloc[0]
    zones_m = {} if data.zones is None else {
        name: shapely.intersection(area_m, geom) for name, geom in
        zip(data.zones["zone"], data.zones.geometry.to_crs(metric).values)}
    unions = {c: (shapely.union_all(pred_m.values[pc == c]),
                  shapely.union_all(ref_m.values[rc == c])) for c in FOREGROUND_CLASSES}
    m_iou = np.array([pair_iou[(a, b)] for a, b in zip(mi.tolist(), mj.tolist())])

    def row(zone, classes, where_p, where_r):
        sel_p = np.isin(pc, classes) & where_p
        sel_r = np.isin(rc, classes) & where_r
        tp_sel = sel_r[mj]  # a match counts in its reference's zone
        tp = int(tp_sel.sum())
        fp = int((sel_p & ~matched_p).sum())
        fn = int((sel_r & ~matched_r).sum())
        n_p, n_r = int(sel_p.sum()), int(sel_r.sum())
        mpa, mra = pa[mi][tp_sel], ra[mj][tp_sel]
        zone_area = area_m if zone == ALL else zones_m.get(zone)
        ious = [_area_iou(*unions[c], zone_area) for c in classes]
        ious = [v for v in ious if v is not None]
        p_area, r_area = float(pa[sel_p].sum()), float(ra[sel_r].sum())
        panel = classes == [capacity.PANEL_CLASS]
        out = {"zone": zone, "class_id": classes[0] if len(classes) == 1 else "",
               "class_name": CLASS_NAMES[classes[0]] if len(classes) == 1 else ALL_CLASSES,
               "reference": n_r, "predicted": n_p, "true_positives": tp, "false_positives": fp,
               "false_negatives": fn, "precision": _ratio(tp, tp + fp),
               "recall": _ratio(tp, tp + fn), "f1": _ratio(2 * tp, 2 * tp + fp + fn),
               "count_error": n_p - n_r, "count_error_rel": _ratio(n_p - n_r, n_r),
               "reference_area_m2": round(r_area, 3), "predicted_area_m2": round(p_area, 3),
               "matched_reference_area_m2": round(float(mra.sum()), 3),
               "matched_predicted_area_m2": round(float(mpa.sum()), 3),
               "area_error_rel": _ratio(float(mpa.sum() - mra.sum()), float(mra.sum())),
               "mean_abs_area_error_rel": _round(float(np.mean(np.abs(mpa - mra) / mra)))
               if tp else None,
               "total_area_error_rel": _ratio(p_area - r_area, r_area),
               "pixel_iou": _round(float(np.mean(ious))) if ious else None}
        for key, density in zip(("est_kwp_low", "est_kwp", "est_kwp_high"), kwp):
            out[key] = round(p_area * density, 3) if panel else None
        out["reference_kwp"] = round(r_area * kwp[1], 3) if panel else None
        return out

    everywhere_p, everywhere_r = np.ones(len(pred), bool), np.ones(len(ref), bool)
    zone_names = [ALL]
    if data.zones is not None:
        from ..inference.planner import OUTSIDE

        zone_names += list(dict.fromkeys(data.zones["zone"]))
        if (pred["zone"] == OUTSIDE).any() or (ref["zone"] == OUTSIDE).any():
            zone_names.append(OUTSIDE)
    rows = []
    for zone in zone_names:
        wp = everywhere_p if zone == ALL else (pred["zone"] == zone).to_numpy()
        wr = everywhere_r if zone == ALL else (ref["zone"] == zone).to_numpy()
        rows += [row(zone, [c], wp, wr) for c in FOREGROUND_CLASSES]
        rows.append(row(zone, list(FOREGROUND_CLASSES), wp, wr))
    frames = _outcomes(data, pred, ref, mi, mj, m_iou, best_p, best_r, matched_p, matched_r)
    settings = {**(data.sources or {}), "crs": data.layer.crs.to_string(),
                "area_crs": metric.to_string(), "labelled_area_m2": round(float(area_m.area), 2),
                "iou_threshold": iou_threshold,
                "matching": "one-to-one, same class, IoU >= threshold; most matches, then the "
                            "highest total IoU (linear_sum_assignment per group of candidates)",
                "kwp_per_m2": dict(zip(("low", "central", "high"), kwp)),
                "layer_installations_in_area": int(len(pred)),
                "reference_installations_in_area": int(len(ref))}
    return rows, frames, settings


def _area_iou(pred_union, ref_union, zone_area):
    import shapely

    if zone_area is None:
        return None
    p = shapely.intersection(pred_union, zone_area)
    r = shapely.intersection(ref_union, zone_area)
    both = shapely.intersection(p, r).area
    union = p.area + r.area - both
    return None if union <= 0 else both / union


def _ratio(a, b):
    return None if not b else _round(a / b)


def _round(v):
    return None if v is None or math.isnan(v) else round(float(v), 6) + 0.0  # no -0.0


def _outcomes(data, pred, ref, mi, mj, m_iou, best_p, best_r, matched_p, matched_r):
    import geopandas as gpd
    import pandas as pd

    def ids(frame, src, field):
        if field in src.columns:
            return src[field].to_numpy()[frame["row"].to_numpy()]
        return frame["row"].to_numpy() + 1

    pid = ids(pred, data.layer, "installation_id")
    rid = data.reference.index.to_numpy()[ref["row"].to_numpy()]
    names = np.array(CLASS_NAMES, dtype=object)
    crs = data.layer.crs
    pa, ra = pred["area_m"].to_numpy()[mi], ref["area_m"].to_numpy()[mj]
    tp = gpd.GeoDataFrame(pd.DataFrame({
        "installation_id": pid[mi], "reference_fid": rid[mj],
        "class_id": pred["class_id"].to_numpy()[mi],
        "class_name": names[pred["class_id"].to_numpy()[mi]], "iou": np.round(m_iou, 4),
        "predicted_area_m2": np.round(pa, 3), "reference_area_m2": np.round(ra, 3),
        "area_error_rel": np.round(pa / ra - 1, 4),
        "zone": ref["zone"].to_numpy()[mj]}), geometry=pred.geometry.values[mi], crs=crs)
    fp_sel, fn_sel = ~matched_p, ~matched_r
    fp = gpd.GeoDataFrame(pd.DataFrame({
        "installation_id": pid[fp_sel], "class_id": pred["class_id"].to_numpy()[fp_sel],
        "class_name": names[pred["class_id"].to_numpy()[fp_sel]],
        "predicted_area_m2": np.round(pred["area_m"].to_numpy()[fp_sel], 3),
        "best_iou": np.round(best_p[fp_sel], 4), "zone": pred["zone"].to_numpy()[fp_sel]}),
        geometry=pred.geometry.values[fp_sel], crs=crs)
    fn = gpd.GeoDataFrame(pd.DataFrame({
        "reference_fid": rid[fn_sel], "class_id": ref["class_id"].to_numpy()[fn_sel],
        "class_name": names[ref["class_id"].to_numpy()[fn_sel]],
        "reference_area_m2": np.round(ref["area_m"].to_numpy()[fn_sel], 3),
        "best_iou": np.round(best_r[fn_sel], 4), "zone": ref["zone"].to_numpy()[fn_sel]}),
        geometry=ref.geometry.values[fn_sel], crs=crs)
    frames = {"true_positives": tp, "false_positives": fp, "false_negatives": fn}
    if data.zones is None:
        frames = {k: f.drop(columns="zone") for k, f in frames.items()}
    return frames


def write(output_dir, rows, frames, settings, area):
    """The report's files (:data:`OUTPUTS`), each atomically, the JSON last."""
    import geopandas as gpd

    from . import maps, styles
    from .gpkg import Layer, write_gpkg

    crs = frames["true_positives"].crs
    os.makedirs(output_dir, exist_ok=True)
    write_csv(os.path.join(output_dir, CSV_FILE), rows, COLUMNS)
    area_frame = gpd.GeoDataFrame({"area_m2": [settings["labelled_area_m2"]]}, geometry=[area],
                                  crs=crs)
    write_gpkg(os.path.join(output_dir, GPKG_FILE), [
        Layer("true_positives", frames["true_positives"],
              styles.polygons_style(maps.TP_RGB, "true positives: predicted outlines")),
        Layer("false_positives", frames["false_positives"],
              styles.polygons_style(maps.FP_RGB, "false positives: predicted, not labelled")),
        Layer("false_negatives", frames["false_negatives"],
              styles.outline_style(maps.FN_RGB, "false negatives: labelled, not predicted")),
        Layer("labelled_area", area_frame, styles.outline_style(maps.OUTLINE_RGB, "labelled area"))])
    total = next(r for r in rows if r["zone"] == ALL and r["class_name"] == ALL_CLASSES)
    maps.write_map(os.path.join(output_dir, PNG_FILE), [
        maps.MapLayer(frames["true_positives"], maps.TP_RGB, "true positive"),
        maps.MapLayer(frames["false_positives"], maps.FP_RGB, "false positive"),
        maps.MapLayer(frames["false_negatives"], maps.FN_RGB, "false negative", kind="outline")],
        f"installations against labels (IoU >= {settings['iou_threshold']:g}): precision "
        f"{_fmt(total['precision'])}, recall {_fmt(total['recall'])}", outline=area)
    figures = {}
    for r in rows:
        figures.setdefault(r["zone"], {})[r["class_name"]] = {
            k: v for k, v in r.items() if k not in ("zone", "class_name")}
    write_text_atomic(os.path.join(output_dir, JSON_FILE),
                      json.dumps({"settings": settings, "figures": figures}, indent=1,
                                 allow_nan=False) + "\n")
    return [os.path.join(output_dir, n) for n in OUTPUTS]


def _fmt(v):
    return "n/a" if v is None else f"{v:.3f}"
