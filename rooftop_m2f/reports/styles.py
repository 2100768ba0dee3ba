"""Default QGIS styles (QML) of the layers the reports write, stored by :mod:`.gpkg` in each
GeoPackage's ``layer_styles`` table, which QGIS reads when it opens a layer.

Installations are a categorized renderer on ``class_id`` (legend: the class names) in the
colours of :data:`rooftop_m2f.classes.PALETTE`; with a ``review`` field, the installations to
review get their own categories, outlined thick in magenta. Symbol layers are written as ``<prop>``
elements, which every QGIS 3 reads.
"""
from dataclasses import dataclass
from typing import Sequence, Tuple
from xml.sax.saxutils import quoteattr

from ..classes import CLASS_NAMES, FOREGROUND_CLASSES, PALETTE

REVIEW_RGB = (255, 0, 255)
QGIS_VERSION = "3.22.16-Białowieża"  # the version that read these styles in our check


@dataclass(frozen=True)
class Style:
    """A layer's QML and the geometry type its symbols draw (``Polygon``, ``Point``)."""

    qml: str
    geometry_type: str
    description: str = ""


def _rgba(rgb, alpha=255):
    return ",".join(str(int(v)) for v in (*rgb, alpha))


def _props(props):
    return "".join(f"<prop k={quoteattr(k)} v={quoteattr(str(v))}/>" for k, v in props.items())


def fill_symbol(name, fill, stroke, width_mm=0.26, fill_alpha=150, brush="solid"):
    props = {"color": _rgba(fill, fill_alpha), "style": brush, "outline_color": _rgba(stroke),
             "outline_style": "solid", "outline_width": width_mm, "outline_width_unit": "MM",
             "joinstyle": "miter", "offset": "0,0", "offset_unit": "MM"}
    return (f'<symbol type="fill" name={quoteattr(str(name))} alpha="1" clip_to_extent="1" '
            f'force_rhr="0"><layer class="SimpleFill" pass="0" locked="0" enabled="1">'
            f"{_props(props)}</layer></symbol>")


def marker_symbol(name, fill, stroke, size_mm=2.6, shape="circle"):
    props = {"name": shape, "color": _rgba(fill), "outline_color": _rgba(stroke),
             "outline_style": "solid", "outline_width": 0.3, "outline_width_unit": "MM",
             "size": size_mm, "size_unit": "MM", "angle": 0, "offset": "0,0"}
    return (f'<symbol type="marker" name={quoteattr(str(name))} alpha="1" clip_to_extent="1" '
            f'force_rhr="0"><layer class="SimpleMarker" pass="0" locked="0" enabled="1">'
            f"{_props(props)}</layer></symbol>")


def _qml(renderer):
    return ("<!DOCTYPE qgis PUBLIC 'http://mrcc.com/qgis.dtd' 'SYSTEM'>\n"
            f'<qgis version="{QGIS_VERSION}" styleCategories="Symbology">{renderer}'
            "<blendMode>0</blendMode><featureBlendMode>0</featureBlendMode>"
            "<layerOpacity>1</layerOpacity></qgis>\n")


def single_symbol(symbol):
    return _qml('<renderer-v2 type="singleSymbol" symbollevels="0" forceraster="0" '
                f'enableorderby="0"><symbols>{symbol}</symbols>'
                "</renderer-v2>")


def categorized(attr, categories: Sequence[Tuple[str, str, str]]):
    """``categories``: (value, legend label, symbol XML named by its position)."""
    cats = "".join(f'<category value={quoteattr(v)} label={quoteattr(label)} symbol="{k}" '
                   'render="true"/>' for k, (v, label, _) in enumerate(categories))
    symbols = "".join(sym for _, _, sym in categories)
    return _qml(f'<renderer-v2 type="categorizedSymbol" attr={quoteattr(attr)} symbollevels="0" '
                f'forceraster="0" enableorderby="0"><categories>{cats}</categories>'
                f"<symbols>{symbols}</symbols></renderer-v2>")


def _darker(rgb, f=0.55):
    return tuple(int(v * f) for v in rgb)


def installations_style(review=False):
    """Installations by class (palette colours); with ``review``, installations to review in
    their own categories, outlined thick in magenta."""
    cats = []
    for c in FOREGROUND_CLASSES:
        label = CLASS_NAMES[c].replace("_", " ")
        cats.append((str(c), label, fill_symbol(len(cats), PALETTE[c], _darker(PALETTE[c]))))
        if review:
            cats.append((f"{c} review", f"{label}: to review",
                         fill_symbol(len(cats), PALETTE[c], REVIEW_RGB, width_mm=0.8)))
    attr = ("concat(\"class_id\", CASE WHEN \"review\" THEN ' review' END)" if review
            else "class_id")
    return Style(categorized(attr, cats), "Polygon",
                 "installations by class" + (", to review outlined" if review else ""))


def polygons_style(rgb, description, fill_alpha=150, brush="solid", width_mm=0.4):
    return Style(single_symbol(fill_symbol(0, rgb, _darker(rgb), width_mm, fill_alpha, brush)),
                 "Polygon", description)


def outline_style(rgb, description, width_mm=0.6):
    return Style(single_symbol(fill_symbol(0, rgb, rgb, width_mm, 0, "no")), "Polygon",
                 description)


def points_style(rgb, description, shape="circle"):
    return Style(single_symbol(marker_symbol(0, rgb, _darker(rgb), shape=shape)), "Point",
                 description)


def categorized_polygons_style(field, values, description):
    """``values``: (value, label, rgb)."""
    cats = [(v, label, fill_symbol(k, rgb, _darker(rgb), 0.4))
            for k, (v, label, rgb) in enumerate(values)]
    return Style(categorized(field, cats), "Polygon", description)
