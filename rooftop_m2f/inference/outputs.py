"""The per-image outputs of ``tools/predict.py``: name, file suffix, what the file holds.

Plain data, importable without torch, so that ``predict.py --help`` lists them at once; the
class and colour prose is written from :mod:`rooftop_m2f.classes`. Each name's writer is in
:mod:`.writers` (``writers.OUTPUTS``, the registry: suffix, writer, help).
"""
from ..classes import class_indices_prose, palette_prose

COCO_RESULTS_FILE = "coco_results.json"
COCO_IMAGES_FILE = "coco_images.json"

OUTPUT_FILES = {
    "index": ("_index.png", f"class-index PNG ({class_indices_prose()})"),
    "color": ("_color.png", f"RGB PNG: {palette_prose()}"),
    "overlay": ("_overlay.png", "the classes' colours blended over the image"),
    "json": ("_coords.json", 'reference JSON {"image_name", "predicted_coords": {"class_1": '
                             '[[row, col], ...], ...}}'),
    "geojson": ("_polygons.geojson", "one polygon per connected component with class_id, "
                                     "class_name, pixel_count, area_m2 (CRS coordinates when "
                                     "georeferenced, else pixels)"),
    "geotiff": ("_mask.tif", "uint8 class-index GeoTIFF with the input's CRS and transform "
                             "(georeferenced inputs only)"),
    # per folder, not per image (no suffix): written once at the end, merged with earlier runs'
    "coco": ("", f"per folder: {COCO_RESULTS_FILE}, COCO results (one RLE per 4-connected "
                 "component, category_id = class, score = mean confidence) and "
                 f"{COCO_IMAGES_FILE}, its images (ids 1, 2, ... or those of "
                 "ROOFTOP.COCO.PREDICTION_IMAGE_IDS) and categories; earlier predictions into "
                 "the folder are kept, an image predicted again replaces its own"),
}
DEFAULT_OUTPUTS = ("index", "color", "overlay", "json", "geojson", "geotiff")


def describe_outputs():
    """One line per output (name, file name, what it holds): ``predict.py --help``."""
    return "\n".join(f"  {name:8s} {'<stem>' + suffix if suffix else '':24s} {text}"
                     for name, (suffix, text) in OUTPUT_FILES.items())
