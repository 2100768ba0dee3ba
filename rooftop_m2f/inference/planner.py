"""A planner's summary of a city run's installations layer.

``city_summary.csv``: per zone (``ALL`` for the whole run) and foreground class, the number of
installations, their area (m²), for solar panels the estimated PV capacity in kWp with its low
and high bounds (the sums of the layer's ``est_kwp``, ``est_kwp_low``, ``est_kwp_high``: panel
area x ``ROOFTOP.CITY.KWP_PER_M2``, ``_LOW``, ``_HIGH``; estimates, see rooftop_m2f/config.py),
and the installations to review (the layer's ``review`` flag). With a zones layer
(any vector file GDAL reads, e.g. suburbs or wards), each installation is counted once, in the
zone that contains its centroid (installations cut by a zone border are not split); those whose
centroid is in no zone are counted under ``(outside zones)``.

``city_overview.png``: installations' centroids coloured by class over the zones' outlines;
``city_summary.png``: bar charts of installations and area per class (and per zone).
"""
import csv
import logging
import os

import numpy as np

from ..classes import CLASS_NAMES, FOREGROUND_CLASSES, PALETTE
from ..fileio import atomic_path
from ..reports.capacity import PANEL_CLASS

logger = logging.getLogger(__name__)

SUMMARY_CSV = "city_summary.csv"
OVERVIEW_PNG = "city_overview.png"
BARS_PNG = "city_summary.png"
SUMMARY_OUTPUTS = (SUMMARY_CSV, OVERVIEW_PNG, BARS_PNG)
SUMMARY_COLUMNS = ("zone", "class_id", "class_name", "installations", "area_m2", "est_kwp",
                   "est_kwp_low", "est_kwp_high", "to_review")
SUMMED = ("area_m2", "est_kwp", "est_kwp_low", "est_kwp_high", "review")  # the layer's columns
ALL_ZONES = "ALL"
OUTSIDE = "(outside zones)"


def load_zones(path, zone_field, crs):
    """(zones GeoDataFrame in ``crs``, name column). The field defaults to the first text column;
    a file without one gets the names "zone 1", "zone 2", ... in its order, with a warning naming
    it."""
    import geopandas as gpd

    from ..cli import UserError

    try:
        zones = gpd.read_file(path, engine="pyogrio")
    except Exception as e:  # noqa: BLE001 - pyogrio's errors: one line naming the file
        raise UserError(f"--zones {path}: cannot read a vector layer ({e})") from e
    if zones.crs is None:
        raise UserError(f"--zones {path}: has no CRS")
    zones = zones[zones.geometry.notna() & ~zones.geometry.is_empty]
    if zone_field is None:
        text = [c for c in zones.columns if c != zones.geometry.name
                and (zones[c].dtype == object or str(zones[c].dtype) in ("str", "string"))]
        zone_field = text[0] if text else None
    elif zone_field not in zones.columns:
        raise UserError(f"--zone-field {zone_field}: not a field of {path} (fields: "
                        f"{', '.join(c for c in zones.columns if c != zones.geometry.name)})")
    zones = zones.to_crs(crs).reset_index(drop=True)
    if zone_field:
        zones["zone"] = zones[zone_field].astype(str)
    else:
        zones["zone"] = [f"zone {i + 1}" for i in range(len(zones))]
        logger.warning("--zones %s: no text field to name the zones: named zone 1 .. zone %d in "
                       "the file's order (--zone-field NAME picks a field)", path, len(zones))
    return zones, zone_field


def assign_zones(layer, zones):
    """The zone name of each installation, by its centroid (the first zone when the centroid is
    on a shared border), ``OUTSIDE`` when in none."""
    import geopandas as gpd

    points = gpd.GeoDataFrame({"row": np.arange(len(layer))},
                              geometry=layer.geometry.centroid.values, crs=layer.crs)
    joined = gpd.sjoin(points, zones[["zone", "geometry"]], how="left", predicate="intersects")
    joined = joined.sort_values(["row", "index_right"]).drop_duplicates("row", keep="first")
    return joined.sort_values("row")["zone"].fillna(OUTSIDE).to_numpy()


class Summary:
    """The summary of a layer given chunk by chunk (:meth:`add`); :meth:`close` writes
    ``city_summary.csv`` and the two figures into ``output_dir`` (when given) and returns the
    rows. Memory: the zones, and the centroid and class of each installation (for the map)."""

    def __init__(self, output_dir, zones_path=None, zone_field=None, crs=None):
        self.output_dir = output_dir
        self.zones = load_zones(zones_path, zone_field, crs)[0] if zones_path else None
        self.stats, self.points = [], []

    def add(self, layer):
        import pandas as pd

        frame = pd.DataFrame({"zone": ALL_ZONES, "class_id": layer["class_id"].to_numpy(),
                              **{c: layer[c].to_numpy(dtype=float) for c in SUMMED},
                              "installations": 1})
        if self.zones is not None and len(layer):
            frame = pd.concat([frame, frame.assign(zone=assign_zones(layer, self.zones))])
        self.stats.append(frame.groupby(["zone", "class_id"])[["installations", *SUMMED]].sum())
        centroids = layer.geometry.centroid
        self.points.append((centroids.x.to_numpy(), centroids.y.to_numpy(),
                            layer["class_id"].to_numpy()))

    def rows(self):
        """One row per zone (``ALL``, then the zones in order, then ``OUTSIDE`` when some
        installation is in no zone) and foreground class."""
        import pandas as pd

        stats = pd.concat(self.stats).groupby(level=[0, 1]).sum() if self.stats else None
        zones = [ALL_ZONES] + ([] if self.zones is None else list(dict.fromkeys(self.zones["zone"])))
        if stats is not None and OUTSIDE in stats.index.get_level_values(0):
            zones.append(OUTSIDE)
        rows = []
        for zone in zones:
            for c in FOREGROUND_CLASSES:
                sums = stats.loc[(zone, c)] if stats is not None and (zone, c) in stats.index \
                    else dict.fromkeys(("installations", *SUMMED), 0.0)
                rows.append({"zone": zone, "class_id": c, "class_name": CLASS_NAMES[c],
                             "installations": int(sums["installations"]),
                             "area_m2": round(float(sums["area_m2"]), 2),
                             **{k: round(float(sums[k]), 2) if c == PANEL_CLASS else ""
                                for k in ("est_kwp", "est_kwp_low", "est_kwp_high")},
                             "to_review": int(sums["review"])})
        return rows

    def close(self):
        rows, out = self.rows(), self.output_dir
        with atomic_path(os.path.join(out, SUMMARY_CSV)) as tmp:
            with open(tmp, "w", newline="") as f:
                writer = csv.DictWriter(f, fieldnames=SUMMARY_COLUMNS)
                writer.writeheader()
                writer.writerows(rows)
        x, y, classes = (np.concatenate(a) for a in zip(*self.points)) if self.points else \
            (np.zeros(0), np.zeros(0), np.zeros(0, int))
        _plot_overview(x, y, classes, self.zones, os.path.join(out, OVERVIEW_PNG))
        _plot_bars(rows, os.path.join(out, BARS_PNG))
        total = [r for r in rows if r["zone"] == ALL_ZONES]
        logger.info("summary: %s; estimated %s kWp of panels (%s-%s); %d to review -> %s",
                    ", ".join(f"{r['installations']} {r['class_name']} ({r['area_m2']} m²)"
                              for r in total), total[0]["est_kwp"], total[0]["est_kwp_low"],
                    total[0]["est_kwp_high"], sum(r["to_review"] for r in total),
                    os.path.join(out, SUMMARY_CSV))
        return rows


def _figure():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _plot_overview(x, y, classes, zones, path):
    plt = _figure()
    fig, ax = plt.subplots(figsize=(8, 8))
    if zones is not None:
        zones.boundary.plot(ax=ax, color="0.4", linewidth=0.8)
        for _, z in zones.iterrows():
            p = z.geometry.representative_point()
            ax.annotate(z["zone"], (p.x, p.y), ha="center", fontsize=8, color="0.3")
    for c in FOREGROUND_CLASSES:
        sel = classes == c
        if sel.any():
            ax.scatter(x[sel], y[sel], s=6, color=np.array(PALETTE[c]) / 255.0,
                       label=f"{CLASS_NAMES[c]} ({int(sel.sum())})")
    if len(classes):
        ax.legend(loc="upper right", fontsize=8)
    ax.set_title(f"{len(classes)} installations (centroids)")
    ax.set_aspect("equal")
    ax.ticklabel_format(useOffset=False, style="plain")
    ax.tick_params(labelsize=7)
    with atomic_path(path) as tmp:
        fig.savefig(tmp, dpi=100, bbox_inches="tight")
    plt.close(fig)


def _plot_bars(rows, path):
    plt = _figure()
    zones = list(dict.fromkeys(r["zone"] for r in rows))
    fig, axes = plt.subplots(1, 2, figsize=(11, 4))
    width = 0.8 / len(FOREGROUND_CLASSES)
    x = np.arange(len(zones))
    for k, c in enumerate(FOREGROUND_CLASSES):
        sel = [next(r for r in rows if r["zone"] == z and r["class_id"] == c) for z in zones]
        color = np.array(PALETTE[c]) / 255.0
        axes[0].bar(x + k * width, [r["installations"] for r in sel], width, color=color,
                    label=CLASS_NAMES[c])
        axes[1].bar(x + k * width, [r["area_m2"] for r in sel], width, color=color)
    for ax, title in zip(axes, ("installations", "area, m²")):
        ax.set_xticks(x + width, zones, rotation=30, ha="right", fontsize=8)
        ax.set_title(title)
    axes[0].legend(fontsize=8)
    with atomic_path(path) as tmp:
        fig.savefig(tmp, dpi=100, bbox_inches="tight")
    plt.close(fig)
