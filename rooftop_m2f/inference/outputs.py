"""The per-image outputs of ``tools/predict.py``: name, file suffix, what the file holds.

Plain data, importable without torch, so that ``predict.py --help`` lists them at once. The
writers are in :mod:`.writers`; :mod:`.batch` pairs each name with its writer.
"""
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
}
DEFAULT_OUTPUTS = ("index", "color", "overlay", "json", "geojson", "geotiff")


def describe_outputs():
    return "\n".join(f"  {name:8s} <stem>{suffix:18s} {text}"
                     for name, (suffix, text) in OUTPUT_FILES.items())
