"""COCO-format annotations: category names, rasterisation (polygons, RLE, crowd, overlaps),
every bad case named by the loader and the checker, and the PNG <-> COCO converter."""
import json

import numpy as np
import pytest
from PIL import Image

from conftest import run_tool
from rooftop_m2f.data import coco
from rooftop_m2f.data.capetown import DatasetError, load_split, read_mask
from rooftop_m2f.data.checks import check_datasets

H, W = 16, 20


def _uncompressed_rle(binary):
    """COCO's uncompressed RLE: run lengths of the column-major flattening, starting with 0s."""
    flat = binary.T.ravel().astype(np.uint8)
    runs, value, n = [], 0, 0
    for v in flat:
        if v == value:
            n += 1
        else:
            runs.append(n)
            value, n = v, 1
    runs.append(n)
    return {"size": [H, W], "counts": runs}


def _compressed_rle(binary):
    from pycocotools import mask as mask_utils

    rle = mask_utils.encode(np.asfortranarray(binary.astype(np.uint8)))
    return {"size": [H, W], "counts": rle["counts"].decode()}


def _box(y0, y1, x0, x1):
    m = np.zeros((H, W), dtype=bool)
    m[y0:y1, x0:x1] = True
    return m


def hand_made(tmp_path):
    """A 20x16 image with: a large PV polygon and a smaller water heater polygon on top of it
    (written first, so only the area rule puts it on top), a pool heater as uncompressed RLE, a
    PV as compressed RLE, a crowd water heater (uncompressed RLE), and two equal-area objects
    overlapping (the later one wins). Returns (json path, image root, expected masks)."""
    images = tmp_path / "images"
    images.mkdir(parents=True, exist_ok=True)
    Image.fromarray(np.full((H, W, 3), 90, np.uint8)).save(images / "roof.png")
    Image.fromarray(np.full((H, W, 3), 10, np.uint8)).save(images / "empty.jpg")
    anns = [
        # water heater (16 px) listed before the PV it sits on (120 px): the smaller is on top
        {"id": 1, "image_id": 7, "category_id": 12, "iscrowd": 0,
         "segmentation": [[8, 6, 12, 6, 12, 10, 8, 10]]},
        {"id": 2, "image_id": 7, "category_id": 11, "iscrowd": 0,
         "segmentation": [[0, 0, 12, 0, 12, 10, 0, 10]]},
        {"id": 3, "image_id": 7, "category_id": 13, "iscrowd": 0,
         "segmentation": _uncompressed_rle(_box(12, 15, 2, 6))},
        {"id": 4, "image_id": 7, "category_id": 11, "iscrowd": 0,
         "segmentation": _compressed_rle(_box(12, 16, 14, 18))},
        {"id": 5, "image_id": 7, "category_id": 12, "iscrowd": 1,
         "segmentation": _uncompressed_rle(_box(0, 4, 15, 20))},
        # equal areas (6 px each), overlapping at row 11 cols 8-9: the later (pool heater) wins
        {"id": 6, "image_id": 7, "category_id": 11, "iscrowd": 0,
         "segmentation": [[7, 11, 10, 11, 10, 13, 7, 13]]},
        {"id": 7, "image_id": 7, "category_id": 13, "iscrowd": 0,
         "segmentation": [[8, 10, 10, 10, 10, 13, 8, 13, 8, 11.5]]},
    ]
    payload = {
        "images": [{"id": 7, "file_name": "roof.png", "height": H, "width": W},
                   {"id": 8, "file_name": "empty.jpg", "height": H, "width": W}],
        "annotations": anns,
        "categories": [{"id": 11, "name": "Solar Panels"}, {"id": 12, "name": "solar-water_heater"},
                       {"id": 13, "name": "POOL HEATER"}, {"id": 14, "name": "pv"}],
    }
    path = tmp_path / "instances.json"
    path.write_text(json.dumps(payload))
    expected = np.zeros((H, W), np.uint8)
    expected[0:10, 0:12] = 1
    expected[6:10, 8:12] = 2
    expected[12:15, 2:6] = 3
    expected[12:16, 14:18] = 1
    crowd = _box(0, 4, 15, 20)
    expected[11:13, 7:10] = 1
    expected[10:13, 8:10] = 3
    as_ignore, as_class = expected.copy(), expected.copy()
    as_ignore[crowd] = 255
    as_class[crowd] = 2
    return path, images, {"ignore": as_ignore, "class": as_class}


def test_category_names_and_synonyms():
    assert coco.class_for_category("Solar Panels") == 1
    assert coco.class_for_category("PV") == 1
    assert coco.class_for_category("solar_water-heater") == 2
    assert coco.class_for_category("Pool  heater") == 3
    assert coco.class_for_category("_background_") == 0
    assert coco.class_for_category("void") == 255
    assert coco.class_for_category("roof") is None
    assert coco.class_for_category("roof", coco.parse_extra_names(["roof: background"])) == 0
    with pytest.raises(DatasetError, match="must be 'category name: class'"):
        coco.parse_extra_names(["roof: chimney"])


@pytest.mark.parametrize("crowd", ["ignore", "class"])
def test_hand_made_file_rasterises_polygons_rle_crowd_and_overlaps(tmp_path, crowd):
    path, images, expected = hand_made(tmp_path)
    records = coco.load_coco_json(path, images, crowd=crowd)
    assert [r["file_name"] for r in records] == [str(images / "roof.png"), str(images / "empty.jpg")]
    assert records[0]["image_id"] == 7 and (records[0]["height"], records[0]["width"]) == (H, W)
    mask = coco.rasterize_record(records[0])
    np.testing.assert_array_equal(mask, expected[crowd])
    assert not coco.rasterize_record(records[1]).any(), "an image without annotations is background"
    json.dumps(records)  # plain data: detectron2 can serialise the dicts


def _bad(tmp_path, edit):
    path, images, _ = hand_made(tmp_path)
    payload = json.loads(path.read_text())
    edit(payload)
    path.write_text(json.dumps(payload))
    return path, images


BAD_CASES = {
    "unknown_category": lambda p: p["categories"].append({"id": 99, "name": "chimney"}),
    "unknown_category_id": lambda p: p["annotations"][0].update(category_id=98),
    "missing_image": lambda p: p["images"].append({"id": 9, "file_name": "gone.png",
                                                   "height": H, "width": W}),
    "unknown_image": lambda p: p["annotations"][0].update(image_id=1234),
    "polygon_outside": lambda p: p["annotations"][1].update(
        segmentation=[[0, 0, 40, 0, 40, 10, 0, 10]]),
    "degenerate_polygon": lambda p: p["annotations"][1].update(segmentation=[[0, 0, 12, 0]]),
    "degenerate_polygon_zero_area": lambda p: p["annotations"][1].update(
        segmentation=[[0, 0, 5, 5, 10, 10]]),
    "bad_segmentation": lambda p: p["annotations"][2].update(
        segmentation={"size": [H + 1, W], "counts": [H * W]}),
    "bad_segmentation_short_rle": lambda p: p["annotations"][3]["segmentation"].update(counts="0"),
    "duplicate_image": lambda p: p["images"].append({"id": 7, "file_name": "roof.png",
                                                     "height": H, "width": W}),
}
EXPECTED_TEXT = {
    "unknown_category": "'chimney' (id 99)",
    "unknown_category_id": "category_id 98",
    "missing_image": "gone.png",
    "unknown_image": "image_id 1234",
    "polygon_outside": "(40, 0)",
    "degenerate_polygon": "4 coordinates",
    "degenerate_polygon_zero_area": "zero area",
    "bad_segmentation": "RLE size",
    "bad_segmentation_short_rle": "compressed RLE counts sum to 0",
    "duplicate_image": "image id 7",
}



def check_coco_file(path, images):
    coco.register_coco_semseg("checked_coco", path, images)
    return check_datasets(["checked_coco"], progress=False, workers=1, raise_errors=False)[0]

@pytest.mark.parametrize("case", sorted(BAD_CASES))
def test_each_bad_case_is_named_by_loader_and_checker(tmp_path, case):
    path, images = _bad(tmp_path, BAD_CASES[case])
    kind = next((k for k in ("unknown_category", "degenerate_polygon", "bad_segmentation")
                 if case.startswith(k)), case)
    with pytest.raises(DatasetError) as info:
        coco.load_coco_json(path, images)
    message = str(info.value)
    assert "\n" not in message and f"[{kind}]" in message and EXPECTED_TEXT[case] in message
    assert str(path) in message or "gone.png" in message
    report = check_coco_file(path, images)
    assert not report.usable
    assert [p.kind for p in report.errors] == [kind], report.errors
    assert EXPECTED_TEXT[case] in report.errors[0].message or EXPECTED_TEXT[case] in report.errors[0].file
    if case not in ("missing_image", "duplicate_image", "unknown_category"):
        assert "annotation" in report.errors[0].file  # the annotation id is named


def test_checker_on_the_good_file_statistics_and_size_mismatch(tmp_path):
    path, images, expected = hand_made(tmp_path)
    (images / "stray.png").write_bytes((images / "roof.png").read_bytes())
    report = check_coco_file(path, images)
    assert report.usable, report.errors
    assert [p.kind for p in report.warnings] == ["unlisted_image"]
    assert report.masks_decoded == 2
    labelled = expected["ignore"][expected["ignore"] != 255]
    np.testing.assert_array_equal(report.pixel_counts[1:], np.bincount(labelled, minlength=4)[1:])
    Image.fromarray(np.zeros((H, W + 1, 3), np.uint8)).save(images / "roof.png")
    report = check_coco_file(path, images)
    assert [p.kind for p in report.errors] == ["size_mismatch"]
    assert "21x16" in report.errors[0].message and str(path) in str(report.errors[0])


def test_check_dataset_tool_reads_a_coco_file(tmp_path):
    path, images = _bad(tmp_path, BAD_CASES["polygon_outside"])
    result = run_tool("check_dataset.py", "--coco-json", path, "--image-root", images,
                      "--output-dir", tmp_path / "out", check=False)
    assert result.returncode == 1, result.stderr[-2000:]
    assert "[polygon_outside]" in result.stdout and "annotation 2" in result.stdout


def test_png_to_coco_to_png_round_trip_rle_exact_polygons_lose_only_holes(tmp_path):
    from rooftop_m2f.data.coco_convert import mask_annotations

    mask = np.zeros((12, 14), np.uint8)
    mask[1:5, 1:6] = 1
    mask[2:4, 2:4] = 0            # a background hole in the PV
    mask[6:11, 1:7] = 2
    mask[7:9, 3:5] = 3            # a pool heater inside the water heater
    mask[1, 8] = 1
    mask[2, 9] = 1                # diagonal neighbours: 2 components (4-conn.) or 1 (8-conn.)
    mask[9:12, 10:14] = 255
    for connectivity, n_pv in ((4, 3), (8, 2)):
        anns = mask_annotations(mask, 1, connectivity=connectivity)
        assert sum(a["category_id"] == 1 for a in anns) == n_pv
        assert [a["iscrowd"] for a in anns if a["category_id"] == 255] == [1]
        for mode in ("rle", "polygon"):
            anns = mask_annotations(mask, 1, segmentation=mode, connectivity=connectivity)
            objects = []
            for a in anns:
                rle = coco.to_rle(a["segmentation"], 12, 14)
                objects.append({"label": a["category_id"], "rle": rle,
                                "area": int(coco.decode_rle(rle).sum())})
            back = coco.rasterize(coco.paint_order(objects), 12, 14)
            diff = back != mask
            if mode == "rle":
                assert not diff.any()
            else:  # only the background hole of the PV differs (the pool heater is on top)
                np.testing.assert_array_equal(np.argwhere(diff), np.argwhere(_box(2, 4, 2, 4)[:12, :14]))


def test_convert_tool_round_trip_on_the_synthetic_set(tiny_datasets_root, tmp_path):
    png_root = tiny_datasets_root / "capetown"
    run_tool("convert_coco.py", "to-coco", "--root", png_root, "--output-dir", tmp_path / "coco")
    run_tool("convert_coco.py", "to-png", "--root", tmp_path / "coco", "--output-dir", tmp_path / "back")
    run_tool("convert_coco.py", "to-coco", "--root", png_root, "--split", "val", "--segmentation",
             "polygon", "--connectivity", "8", "--output-dir", tmp_path / "poly")
    for split in ("train", "val", "test"):
        original = load_split(png_root / split)
        back = load_split(tmp_path / "back" / split)
        assert [d["image_id"] for d in back] == [d["image_id"] for d in original]
        for a, b in zip(original, back):
            np.testing.assert_array_equal(read_mask(a["sem_seg_file_name"]), read_mask(b["sem_seg_file_name"]))
            assert open(a["file_name"], "rb").read() == open(b["file_name"], "rb").read()
    data = json.loads((tmp_path / "coco" / "train" / "annotations.json").read_text())
    assert {c["name"] for c in data["categories"]} == {"solar_panel", "solar_water_heater", "solar_pool_heater"}
    assert all(isinstance(a["segmentation"]["counts"], str) for a in data["annotations"])
    poly = json.loads((tmp_path / "poly" / "val" / "annotations.json").read_text())
    assert poly["annotations"] and all(isinstance(a["segmentation"], list) for a in poly["annotations"])
    # polygons: the synthetic objects have no holes, so their round trip is exact too
    for r in coco.load_coco_json(tmp_path / "poly" / "val" / "annotations.json", tmp_path / "poly" / "val" / "images"):
        src = next(d for d in load_split(png_root / "val") if d["image_id"] + ".png" == r["file_name"].split("/")[-1])
        np.testing.assert_array_equal(coco.rasterize_record(r), read_mask(src["sem_seg_file_name"]))


def test_convert_tool_bad_json_is_one_line(tmp_path):
    path, images = _bad(tmp_path, BAD_CASES["unknown_category"])
    result = run_tool("convert_coco.py", "to-png", "--json", path, "--image-root", images,
                      "--split", "train", "--output-dir", tmp_path / "out", check=False)
    assert result.returncode == 1
    last = result.stderr.strip().splitlines()[-1]
    assert last.startswith("convert_coco.py: error: ") and "'chimney' (id 99)" in last and "Traceback" not in result.stderr
    assert not (tmp_path / "out").exists()


def test_component_rle_from_the_box_equals_pycocotools_encode():
    from scipy import ndimage

    from rooftop_m2f.data.coco_convert import component_rle, encode_rle, label_components

    rng = np.random.default_rng(3)
    for i in range(40):
        h, w = rng.integers(1, 30, 2)
        binary = rng.random((h, w)) < rng.random()
        if i % 7 == 0:
            binary[:] = True  # a component reaching the last pixel: no trailing zero run
        labels, count = label_components(binary, 4 if i % 2 else 8)
        boxes = ndimage.find_objects(labels)
        for label in range(1, count + 1):
            assert component_rle(labels, label, boxes[label - 1]) == encode_rle(labels == label)


def test_convert_tool_takes_config_keys_and_trailing_overrides(tmp_path):
    from conftest import TINY_CONFIG

    path, images, expected = hand_made(tmp_path)
    run_tool("convert_coco.py", "to-png", "--config-file", TINY_CONFIG, "--split", "val",
             "--output-dir", tmp_path / "out", "ROOFTOP.COCO.VAL_JSON", path,
             "ROOFTOP.COCO.VAL_IMAGES", images, "ROOFTOP.COCO.CROWD", "class")
    np.testing.assert_array_equal(read_mask(tmp_path / "out" / "val" / "masks" / "roof.png"), expected["class"])
    assert (tmp_path / "out" / "val" / "images" / "empty.jpg").read_bytes() == (images / "empty.jpg").read_bytes()
