"""The reports' PNG maps: a few layers in their colours, a legend with each layer's count.
Over a large extent (more than :data:`OUTLINES_UP_TO_M` across) installations are drawn as
dots at their centroids, since their outlines would be too small to see."""
from dataclasses import dataclass

import numpy as np

from ..fileio import atomic_path

# Colour-blind-safe (ColorBrewer Dark2): the same colours as the GeoPackages' styles.
TP_RGB = (27, 158, 119)
FP_RGB = (217, 95, 2)
FN_RGB = (117, 112, 179)
OUTLINE_RGB = (60, 60, 60)
OUTLINES_UP_TO_M = 2000.0


@dataclass
class MapLayer:
    frame: object       # GeoDataFrame
    rgb: tuple
    label: str
    kind: str = "fill"  # fill, outline, point


def _c(rgb):
    return np.array(rgb) / 255.0


def write_map(path, layers, title, outline=None):
    """``layers`` (:class:`MapLayer`) drawn in order over ``outline`` (a geometry: the labelled
    area, dashed); written atomically."""
    import geopandas as gpd
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure
    from matplotlib.lines import Line2D
    from matplotlib.patches import Patch

    fig = Figure(figsize=(9, 9))
    FigureCanvasAgg(fig)
    ax = fig.add_subplot(1, 1, 1)
    handles = []
    crs = next((m.frame.crs for m in layers if m.frame.crs is not None), None)
    frames = [m.frame for m in layers if len(m.frame)]
    bounds = np.array([f.total_bounds for f in frames]) if frames else np.zeros((1, 4))
    span = max(bounds[:, 2].max() - bounds[:, 0].min(), bounds[:, 3].max() - bounds[:, 1].min())
    metres = crs is not None and crs.is_projected
    dots = metres and span > OUTLINES_UP_TO_M
    if outline is not None:
        gpd.GeoSeries([outline], crs=crs).boundary.plot(ax=ax, color=_c(OUTLINE_RGB),
                                                       linewidth=1.0, linestyle="--")
        handles.append(Line2D([], [], color=_c(OUTLINE_RGB), linestyle="--", label="labelled area"))
    for m in layers:
        label = f"{m.label} ({len(m.frame)})"
        if m.kind == "point" or (dots and len(m.frame)):
            if len(m.frame):
                points = gpd.GeoSeries(m.frame.geometry.centroid, crs=crs)
                points.plot(ax=ax, color=_c(m.rgb), marker="o", edgecolor="black",
                            markersize=18 if m.kind == "point" else 8, linewidth=0.4)
            handles.append(Line2D([], [], marker="o", linestyle="", color=_c(m.rgb),
                                  markeredgecolor="black", label=label))
        elif m.kind == "outline":
            if len(m.frame):
                m.frame.boundary.plot(ax=ax, color=_c(m.rgb), linewidth=2.0)
            handles.append(Patch(facecolor="none", edgecolor=_c(m.rgb), linewidth=2.0, label=label))
        else:
            if len(m.frame):
                m.frame.plot(ax=ax, facecolor=_c(m.rgb), edgecolor=_c(m.rgb) * 0.6, alpha=0.8,
                             linewidth=0.5)
            handles.append(Patch(facecolor=_c(m.rgb), edgecolor=_c(m.rgb) * 0.6, label=label))
    ax.legend(handles=handles, loc="upper left", bbox_to_anchor=(1.01, 1.0), fontsize=10,
              frameon=False)
    ax.set_title(title, fontsize=11)
    ax.set_aspect("equal", adjustable="datalim")
    ax.ticklabel_format(useOffset=False, style="plain")
    ax.tick_params(labelsize=7)
    if crs is not None:
        unit = crs.axis_info[0].unit_name if crs.axis_info else ""
        ax.set_xlabel(f"{crs.to_string()} ({unit})", fontsize=8)
    fig.tight_layout()
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png", dpi=110, bbox_inches="tight")
    return path
