"""Change between two installations layers of the same area (``city_report.py change``), e.g.
the 2023 and 2024 flights.

Installations of one class overlap across the flights when their intersection covers at least
``min_overlap`` of the smaller of the two (so a registration shift between flights, or growth,
keeps them together). Overlapping installations form groups (connected components, so two
arrays that became one are one group). A group with installations only after is **new**, only
before is **removed**; otherwise its area (``area_m2``, the layers' own areas, so kWp changes
add up like the flights' summaries) changed when the difference is at least ``area_change`` of
the area before and at least ``min_area_change_m2``: **grown** or **shrunk**, else unchanged.
A class change (a water heater later seen as a panel) is a removal and an addition.
"""
import json
import os

from ..classes import CLASS_NAMES, FOREGROUND_CLASSES
from ..fileio import write_text_atomic
from . import capacity, inputs
from .matching import candidate_pairs, groups
from .outputs import write_csv

CSV_FILE, GPKG_FILE, PNG_FILE, JSON_FILE = ("change_summary.csv", "change.gpkg", "change.png",
                                            "change.json")
OUTPUTS = (CSV_FILE, GPKG_FILE, PNG_FILE, JSON_FILE)
ALL = "ALL"
FIELDS = ("installation_id", "class_id", "area_m2")
COLUMNS = ("zone", "class_id", "class_name", "before", "after", "new", "removed", "grown",
           "shrunk", "unchanged", "new_area_m2", "removed_area_m2", "changed_area_m2",
           "net_area_m2", "new_kwp", "removed_kwp", "changed_kwp", "net_kwp", "net_kwp_low",
           "net_kwp_high")
NEW_RGB, REMOVED_RGB, GROWN_RGB, SHRUNK_RGB = (27, 158, 119), (217, 95, 2), (117, 112, 179), \
    (231, 41, 138)


def load(before_src, after_src, zones_src=None, zone_field=None):
    before = inputs.read_installations(before_src, "--before", FIELDS)
    after = inputs.read_installations(after_src, "--after", FIELDS)
    after = inputs.reproject(after, before.crs, "--after", after_src)
    zones = inputs.read_zones(zones_src, zone_field, before.crs)
    return before, after, zones


def compare(before, after, zones=None, min_overlap=0.3, area_change=0.2, min_area_change_m2=1.0,
            kwp=(capacity.KWP_PER_M2_LOW, capacity.KWP_PER_M2, capacity.KWP_PER_M2_HIGH)):
    """(rows of :data:`COLUMNS`, {new, removed, changed} frames in the before layer's CRS)."""
    import geopandas as gpd
    import numpy as np
    import pandas as pd
    import shapely

    from ..inference.planner import OUTSIDE, assign_zones
    from ..inference.vector_layer import metric_crs

    metric = metric_crs(before)
    before, after = before.reset_index(drop=True), after.reset_index(drop=True)
    bg, ag = before.geometry.to_crs(metric).values, after.geometry.to_crs(metric).values
    bc, ac = before["class_id"].to_numpy(), after["class_id"].to_numpy()
    i, j, inter = candidate_pairs(bg, bc, ag, ac)
    smaller = np.minimum(shapely.area(bg[i]), shapely.area(ag[j])) if len(i) else np.zeros(0)
    keep = inter >= min_overlap * smaller
    i, j = i[keep], j[keep]
    nb, na = len(before), len(after)
    label = groups(i, j, nb, na)
    gb, ga = label[:nb], label[nb:]
    paired = np.zeros(nb + na, bool)
    paired[i], paired[nb + j] = True, True
    removed = before[~paired[:nb]].copy()
    new = after[~paired[nb:]].copy()
    # groups with both sides: sums and member lists by group, in one pass
    ba, aa = before["area_m2"].to_numpy(float), after["area_m2"].to_numpy(float)
    pb, pa = np.flatnonzero(paired[:nb]), np.flatnonzero(paired[nb:])
    b = pd.DataFrame({"g": gb[pb], "id": before["installation_id"].to_numpy()[pb].astype(str),
                      "area": ba[pb], "cls": bc[pb]}).groupby("g", sort=True).agg(
        area_before_m2=("area", "sum"), class_id=("cls", "first"), before_ids=("id", ";".join))
    members = pd.DataFrame({"g": ga[pa], "id": after["installation_id"].to_numpy()[pa].astype(str),
                            "area": aa[pa], "k": pa})
    a = members.groupby("g", sort=True).agg(area_after_m2=("area", "sum"),
                                            after_ids=("id", ";".join), k=("k", "first"),
                                            n=("k", "size"))
    t = b.join(a, how="inner")
    geoms = after.geometry.values[t["k"].to_numpy()] if len(t) else np.array([], dtype=object)
    multi = t.index[t["n"] > 1]
    if len(multi):
        parts = members[members["g"].isin(multi)].groupby("g")["k"].apply(list)
        where = {g: n for n, g in enumerate(t.index)}
        for g, ks in parts.items():
            geoms[where[g]] = shapely.union_all(after.geometry.values[ks])
    a0, a1 = t["area_before_m2"].to_numpy(float), t["area_after_m2"].to_numpy(float)
    delta = a1 - a0
    moved = np.abs(delta) >= np.maximum(area_change * a0, min_area_change_m2)
    cls = t["class_id"].to_numpy(int)
    groups_frame = gpd.GeoDataFrame(pd.DataFrame({
        "change": np.where(moved, np.where(delta > 0, "grown", "shrunk"), "unchanged"),
        "class_id": cls, "class_name": np.array(CLASS_NAMES, dtype=object)[cls],
        "before_ids": t["before_ids"].to_numpy(), "after_ids": t["after_ids"].to_numpy(),
        "area_before_m2": np.round(a0, 3), "area_after_m2": np.round(a1, 3),
        "area_change_m2": np.round(delta, 3),
        "area_change_rel": np.round(np.divide(delta, a0, out=np.full(len(t), np.nan),
                                              where=a0 > 0), 4)}),
        geometry=gpd.GeoSeries(list(geoms), crs=before.crs), crs=before.crs)
    for frame, area_col, prefix in ((new, "area_m2", "est_kwp"), (removed, "area_m2", "est_kwp"),
                                    (groups_frame, "area_change_m2", "kwp_change")):
        for k, v in capacity.kwp_columns(frame[area_col], frame["class_id"], *kwp,
                                         prefix=prefix).items():
            frame[k] = v

    def zone_of(frame):
        if zones is None or len(frame) == 0:
            return np.full(len(frame), ALL, dtype=object)
        return assign_zones(frame, zones)

    zb, za = zone_of(before), zone_of(after)
    new["zone"], removed["zone"] = za[~paired[nb:]], zb[~paired[:nb]]
    groups_frame["zone"] = zone_of(groups_frame)
    names = [ALL]
    if zones is not None:
        names += list(dict.fromkeys(zones["zone"]))
        if any((z == OUTSIDE).any() for z in (zb, za)):
            names.append(OUTSIDE)
    kinds, delta_g = groups_frame["change"].to_numpy(), groups_frame["area_change_m2"].to_numpy()
    new_area, removed_area = new["area_m2"].to_numpy(float), removed["area_m2"].to_numpy(float)
    rows = []
    for zone in names:
        def where(frame_class, frame_zone, c):
            return (frame_class == c) & ((frame_zone == zone) if zone != ALL else True)

        for c in FOREGROUND_CLASSES:
            sb, sa = where(bc, zb, c), where(ac, za, c)
            sn = where(new["class_id"].to_numpy(), new["zone"].to_numpy(), c)
            sr = where(removed["class_id"].to_numpy(), removed["zone"].to_numpy(), c)
            sg = where(groups_frame["class_id"].to_numpy(), groups_frame["zone"].to_numpy(), c)
            net = float(aa[sa].sum() - ba[sb].sum())
            row = {"zone": zone, "class_id": c, "class_name": CLASS_NAMES[c],
                   "before": int(sb.sum()), "after": int(sa.sum()), "new": int(sn.sum()),
                   "removed": int(sr.sum()), "grown": int((sg & (kinds == "grown")).sum()),
                   "shrunk": int((sg & (kinds == "shrunk")).sum()),
                   "unchanged": int((sg & (kinds == "unchanged")).sum()),
                   "new_area_m2": round(float(new_area[sn].sum()), 3),
                   "removed_area_m2": round(float(removed_area[sr].sum()), 3),
                   "changed_area_m2": round(float(delta_g[sg & (kinds != "unchanged")].sum()), 3),
                   "net_area_m2": round(net, 3)}
            panel = c == capacity.PANEL_CLASS
            row["new_kwp"] = round(row["new_area_m2"] * kwp[1], 3) if panel else None
            row["removed_kwp"] = round(row["removed_area_m2"] * kwp[1], 3) if panel else None
            row["changed_kwp"] = round(row["changed_area_m2"] * kwp[1], 3) if panel else None
            bounds = sorted((net * kwp[0], net * kwp[2]))  # a net loss: low is the larger loss
            for key, value in (("net_kwp_low", bounds[0]), ("net_kwp", net * kwp[1]),
                               ("net_kwp_high", bounds[1])):
                row[key] = round(value, 3) if panel else None
            rows.append({k: row[k] for k in COLUMNS})
    changed = groups_frame[groups_frame["change"] != "unchanged"].reset_index(drop=True)
    keep = [c for c in ("installation_id", "class_id", "class_name", "area_m2", "confidence")
            if c in new.columns]
    extra = ["est_kwp", "est_kwp_low", "est_kwp_high", "zone"]
    if zones is None:
        extra.remove("zone")
        changed = changed.drop(columns="zone")
    frames = {"new": new[keep + extra + [new.geometry.name]].reset_index(drop=True),
              "removed": removed[keep + extra + [removed.geometry.name]].reset_index(drop=True),
              "changed": changed}
    return rows, frames


def write(output_dir, rows, frames, settings):
    from . import maps, styles
    from .gpkg import Layer, write_gpkg

    os.makedirs(output_dir, exist_ok=True)
    write_csv(os.path.join(output_dir, CSV_FILE), rows, COLUMNS)
    write_gpkg(os.path.join(output_dir, GPKG_FILE), [
        Layer("new", frames["new"], styles.polygons_style(NEW_RGB, "installations new after")),
        Layer("removed", frames["removed"], styles.outline_style(REMOVED_RGB, "installations "
                                                                 "removed (outline before)")),
        Layer("changed", frames["changed"], styles.categorized_polygons_style(
            "change", [("grown", "grown", GROWN_RGB), ("shrunk", "shrunk", SHRUNK_RGB)],
            "installations whose area changed (outline after)"))])
    changed = frames["changed"]
    maps.write_map(os.path.join(output_dir, PNG_FILE), [
        maps.MapLayer(frames["new"], NEW_RGB, "new"),
        maps.MapLayer(frames["removed"], REMOVED_RGB, "removed", kind="outline"),
        maps.MapLayer(changed[changed["change"] == "grown"], GROWN_RGB, "grown"),
        maps.MapLayer(changed[changed["change"] == "shrunk"], SHRUNK_RGB, "shrunk")],
        "change between the flights")
    write_text_atomic(os.path.join(output_dir, JSON_FILE), json.dumps(
        {"settings": settings, "rows": rows}, indent=1, allow_nan=False) + "\n")
    return [os.path.join(output_dir, n) for n in OUTPUTS]
