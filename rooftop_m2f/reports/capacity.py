"""Estimated PV capacity (kWp) of panel installations, with low and high bounds.

kWp = panel area (m², the footprint seen from above) x a power density (kWp per m²); only solar
panels (class 1) have a capacity. The densities are peak power at standard test conditions
(1000 W/m²), i.e. module efficiency, per m² of footprint:

* ``KWP_PER_M2`` 0.20: modules ~20-21 % efficient, the average of commercial wafer-based modules
  in Fraunhofer ISE's *Photovoltaics Report* (2023), seen flat (the city summary's default,
  ``ROOFTOP.CITY.KWP_PER_M2``).
* ``KWP_PER_M2_LOW`` 0.15: modules ~16 % efficient (multicrystalline modules of the late 2010s:
  Fraunhofer ISE's report of 2019 gives 17 % for the average commercial module then; LBNL's
  *Tracking the Sun* about 17 % for multicrystalline modules installed in the USA in 2019), with
  ~6 % of an array's outline lost to gaps between modules and rows.
* ``KWP_PER_M2_HIGH`` 0.25: modules ~22 % efficient (the upper end of today's commercial
  datasheets) on a roof pitched ~26° (a common pitch of tiled roofs, an assumption): the
  footprint is the module area x cos(pitch), so 0.22 / cos 26° = 0.245 kWp per m² of footprint.
"""
PANEL_CLASS = 1
KWP_PER_M2 = 0.20
KWP_PER_M2_LOW = 0.15
KWP_PER_M2_HIGH = 0.25


def check_densities(low, central, high,
                    names=("--kwp-per-m2-low", "--kwp-per-m2", "--kwp-per-m2-high")):
    """One line naming the options (or config keys, ``names``) unless 0 < low <= central <= high."""
    from ..cli import UsageError

    if not 0 < low <= central <= high:
        raise UsageError(", ".join(f"{n} {v}" for n, v in zip(names, (low, central, high)))
                         + ": must be 0 < low <= central <= high")


def est_kwp(area_m2, class_id, density=KWP_PER_M2):
    """kWp of each installation (0 for classes other than solar panels)."""
    import numpy as np

    area = np.asarray(area_m2, dtype=float)
    return np.where(np.asarray(class_id) == PANEL_CLASS, np.round(area * density, 3), 0.0)


def kwp_columns(area_m2, class_id, low=KWP_PER_M2_LOW, central=KWP_PER_M2, high=KWP_PER_M2_HIGH,
                prefix="est_kwp"):
    """``{prefix: ..., prefix_low: ..., prefix_high: ...}`` arrays for a layer's rows; for an
    area change (negative when an installation shrank) low is still the smaller value."""
    import numpy as np

    a, b = est_kwp(area_m2, class_id, low), est_kwp(area_m2, class_id, high)
    return {prefix: est_kwp(area_m2, class_id, central), f"{prefix}_low": np.minimum(a, b),
            f"{prefix}_high": np.maximum(a, b)}
