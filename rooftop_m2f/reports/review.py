"""The ``review`` flag of an installation: a reviewer's list of what to look at first.

An installation is flagged when its ``confidence`` (the pixel-weighted share of the predicted
class in the model's scores, 0.25..1 for four classes) is below ``min_confidence``, or when its
area is outside the plausible range of its class (:data:`AREA_BOUNDS_M2`). ``review_reason``
says which, e.g. ``area 40.0 m² > 12 m² for solar_water_heater``.

Defaults and why:

* ``MIN_CONFIDENCE`` 0.5: below it the other classes together outweigh the predicted one.
* solar panel 1-5000 m²: one module is 1.6-2.0 m² (60-cell 1.65 x 0.99 m to 108-half-cell
  1.72 x 1.13 m on manufacturers' datasheets), so less than 1 m² is not a whole module;
  5000 m² is ~1 MWp at 0.2 kWp/m², the size of the largest commercial roofs (a detection that
  large carries as much capacity as hundreds of homes: worth a look).
* solar water heater 0.8-12 m²: a domestic collector is ~2 m² gross (flat plate ~1 x 2 m;
  20-30 evacuated tubes 2-4 m²), a home has one or two and a tank; 12 m² leaves room for three
  collectors; a water heater of 40 m² is not one.
* solar pool heater 2-150 m²: unglazed strip collectors of ~1.2 x 3 m, sized at 50-100 % of
  the pool's surface (U.S. Department of Energy, *Energy Saver: Solar Swimming Pool Heaters*);
  home pools are ~20-50 m²; less than 2 m² is not one strip.
"""
from ..classes import CLASS_NAMES

MIN_CONFIDENCE = 0.5
AREA_BOUNDS_M2 = {1: (1.0, 5000.0), 2: (0.8, 12.0), 3: (2.0, 150.0)}


def review_flags(class_id, area_m2, confidence, min_confidence=MIN_CONFIDENCE,
                 area_bounds=None):
    """(review: bool array, review_reason: list of str, '' when not flagged)."""
    import numpy as np

    bounds = AREA_BOUNDS_M2 if area_bounds is None else area_bounds
    class_id = np.asarray(class_id)
    area = np.asarray(area_m2, dtype=float)
    conf = np.asarray(confidence, dtype=float)
    reasons = [[] for _ in range(len(class_id))]
    for k in np.flatnonzero(conf < min_confidence):
        reasons[k].append(f"confidence {conf[k]:.2f} < {min_confidence:g}")
    for c, (lo, hi) in bounds.items():
        for k in np.flatnonzero((class_id == c) & (area < lo)):
            reasons[k].append(f"area {area[k]:.1f} m² < {lo:g} m² for {CLASS_NAMES[c]}")
        for k in np.flatnonzero((class_id == c) & (area > hi)):
            reasons[k].append(f"area {area[k]:.1f} m² > {hi:g} m² for {CLASS_NAMES[c]}")
    text = ["; ".join(r) for r in reasons]
    return np.array([bool(t) for t in text], dtype=bool), text


def with_review(layer, min_confidence=MIN_CONFIDENCE, area_bounds=None):
    """A copy of an installations layer (``class_id``, ``area_m2``, ``confidence``) with the
    ``review`` and ``review_reason`` fields."""
    out = layer.copy()
    out["review"], out["review_reason"] = review_flags(
        out["class_id"], out["area_m2"], out["confidence"], min_confidence, area_bounds)
    return out


def parse_area_bounds(text):
    """``"1:1-5000,2:0.8-12"`` -> {1: (1.0, 5000.0), 2: (0.8, 12.0)} over the defaults."""
    from ..cli import UsageError

    bounds = dict(AREA_BOUNDS_M2)
    for item in filter(None, (t.strip() for t in text.split(","))):
        try:
            cls, rng = item.split(":")
            lo, hi = (float(v) for v in rng.split("-"))
            cls = int(cls)
        except ValueError:
            raise UsageError(f"--review-area {text}: expected CLASS:MIN-MAX,... in m², e.g. "
                             "2:0.8-12") from None
        if cls not in AREA_BOUNDS_M2 or not 0 <= lo < hi:
            raise UsageError(f"--review-area {item}: class 1..3 and 0 <= MIN < MAX")
        bounds[cls] = (lo, hi)
    return bounds
