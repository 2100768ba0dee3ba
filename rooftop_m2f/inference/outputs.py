"""The per-image outputs of ``tools/predict.py``: name, file suffix, what the file holds.

Plain data, importable without torch, so that ``predict.py --help`` lists them at once. The
writers are in :mod:`.writers`; :mod:`.batch` pairs each name with its writer.
"""
COCO_RESULTS_FILE = "coco_results.json"
COCO_IMAGES_FILE = "coco_images.json"

OUTPUT_FILES = {
    "index": ("_index.png", "class-index PNG (0 background, 1 solar_panel, 2 solar_water_heater, "
                            "3 solar_pool_heater)"),
    "color": ("_color.png", "RGB PNG: background black, solar_panel red, solar_water_heater "
                            "green, solar_pool_heater blue"),
    "overlay": ("_overlay.png", "the classes' colours blended over the image"),
    "json": ("_coords.json", 'reference JSON {"image_name", "predicted_coords": {"class_1": '
                             '[[row, col], ...], ...}}'),
    "geojson": ("_polygons.geojson", "one polygon per connected component with class_id, "
                                     "class_name, pixel_count, area_m2 (CRS coordinates when "
                                     "georeferenced, else pixels)"),
    "geotiff": ("_mask.tif", "uint8 class-index GeoTIFF with the input's CRS and transform "
                             "(georeferenced inputs only)"),
    # per run, not per image (no suffix): written once at the end
    "coco": ("", f"per run: {COCO_RESULTS_FILE}, COCO results (one RLE per 4-connected "
                 "component, category_id = class, score = mean confidence) and "
                 f"{COCO_IMAGES_FILE}, its images (ids 1, 2, ... or those of "
                 "ROOFTOP.COCO.PREDICTION_IMAGE_IDS) and categories"),
}
DEFAULT_OUTPUTS = ("index", "color", "overlay", "json", "geojson", "geotiff")


def describe_outputs():
    return "\n".join(f"  {name:8s} {'<stem>' + suffix if suffix else '':24s} {text}"
                     for name, (suffix, text) in OUTPUT_FILES.items())
