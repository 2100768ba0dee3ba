"""The ``coco`` prediction output: one COCO results JSON per folder (RLE per connected component,
category_id, score = mean confidence) and its image list, readable by pycocotools; a second
prediction into the folder keeps the earlier images' results."""
import json

import numpy as np
import pytest
from PIL import Image

from rooftop_m2f.inference.batch import predict_files
from rooftop_m2f.inference.writers import COCO_IMAGES_FILE, COCO_RESULTS_FILE
from rooftop_m2f.inference.tiling import TiledPredictor, confidence_of


class ScriptedScores:
    """Scores that depend on the image's first pixel: a panel block (class 1, two confidences)
    and a water heater block (class 2); background elsewhere."""

    def scores(self, image):
        h, w = image.shape[:2]
        s = np.zeros((4, h, w), np.float32)
        s[0] = 1.0
        s[1, 2:6, 3:9] = 3.0              # share 3 / 4 = 0.75
        s[1, 2:6, 3:5] = 9.0              # share 9 / 10 = 0.9 on 8 of the 24 pixels
        s[2, 10:12, 10:13] = 1.5          # share 1.5 / 2.5 = 0.6
        if image[0, 0, 0] > 100:          # the second image: one more, diagonal-only, panel
            s[1, 14, 1] = s[1, 15, 2] = 4.0
        return s


def test_confidence_is_the_predicted_share():
    scores = np.array([[[1.0, 0.0]], [[3.0, 0.0]]], np.float32)
    np.testing.assert_allclose(confidence_of(scores), [[0.75, 0.0]])


def test_predict_files_writes_coco_results_readable_by_pycocotools(tmp_path):
    from pycocotools.coco import COCO
    from pycocotools import mask as mask_utils

    paths = []
    for i, value in enumerate((20, 200)):
        path = tmp_path / f"img{i}.png"
        Image.fromarray(np.full((18, 16, 3), value, np.uint8)).save(path)
        paths.append(str(path))
    out = tmp_path / "out"
    failures = predict_files(TiledPredictor(ScriptedScores(), tile_size=64, overlap=0), paths,
                             out, outputs=["index", "coco"])
    assert failures == []
    images = json.loads((out / COCO_IMAGES_FILE).read_text())
    assert [(im["id"], im["file_name"], im["height"], im["width"]) for im in images["images"]] == \
        [(1, paths[0], 18, 16), (2, paths[1], 18, 16)]
    assert [c["id"] for c in images["categories"]] == [1, 2, 3]
    results = json.loads((out / COCO_RESULTS_FILE).read_text())
    assert {tuple(sorted(r)) for r in results} == {("category_id", "image_id", "score", "segmentation")}
    by_image = {i: [r for r in results if r["image_id"] == i] for i in (1, 2)}
    assert sorted(r["category_id"] for r in by_image[1]) == [1, 2]
    # the two diagonal pixels are two 4-connected components
    assert sorted(r["category_id"] for r in by_image[2]) == [1, 1, 1, 2]
    panel = next(r for r in by_image[1] if r["category_id"] == 1)
    assert panel["score"] == pytest.approx((8 * 0.9 + 16 * 0.75) / 24, abs=1e-5)
    heater = next(r for r in by_image[1] if r["category_id"] == 2)
    assert heater["score"] == pytest.approx(0.6, abs=1e-5)
    index = np.array(Image.open(out / "img0_index.png"))
    rle = dict(panel["segmentation"], counts=panel["segmentation"]["counts"].encode())
    np.testing.assert_array_equal(mask_utils.decode(rle).astype(bool), index == 1)

    gt = COCO(str(out / COCO_IMAGES_FILE))
    loaded = gt.loadRes(str(out / COCO_RESULTS_FILE))
    assert len(loaded.getAnnIds()) == len(results)
    assert sorted(loaded.getImgIds()) == [1, 2]


def test_without_the_coco_output_no_coco_files(tmp_path):
    path = tmp_path / "a.png"
    Image.fromarray(np.zeros((18, 16, 3), np.uint8)).save(path)
    predict_files(TiledPredictor(ScriptedScores(), tile_size=64, overlap=0), [str(path)],
                  tmp_path / "out", outputs=["index"])
    assert not (tmp_path / "out" / COCO_RESULTS_FILE).exists()


@pytest.mark.slow
def test_image_ids_from_a_ground_truth_file_and_cocoeval(tmp_path):
    """tools/predict.py --outputs coco with ROOFTOP.COCO.PREDICTION_IMAGE_IDS: the results carry
    the ground truth's ids, pycocotools' COCOeval runs on them, an input the file does not list
    is a named failure."""
    from conftest import TINY_CONFIG, run_tool
    from rooftop_m2f.data.coco_convert import categories, mask_annotations

    inputs = tmp_path / "in"
    inputs.mkdir()
    rng = np.random.default_rng(0)
    images, anns = [], []
    for i, image_id in enumerate((41, 42)):
        Image.fromarray(rng.integers(0, 256, (48, 40, 3), dtype=np.uint8)).save(inputs / f"t{i}.png")
        images.append({"id": image_id, "file_name": f"sub/t{i}.png", "height": 48, "width": 40})
        gt_mask = np.zeros((48, 40), np.uint8)
        gt_mask[5:20, 5:25] = 1
        anns += mask_annotations(gt_mask, image_id, len(anns) + 1)
    Image.fromarray(np.zeros((48, 40, 3), np.uint8)).save(inputs / "unlisted.png")
    gt_path = tmp_path / "gt.json"
    gt_path.write_text(json.dumps({"images": images, "annotations": anns, "categories": categories()}))
    out = tmp_path / "out"
    result = run_tool("predict.py", "--config-file", TINY_CONFIG, "--input", inputs, "--output-dir", out,
                      "--outputs", "index,coco", "--random-weights",
                      "ROOFTOP.COCO.PREDICTION_IMAGE_IDS", gt_path, check=False)
    assert result.returncode == 1
    assert "unlisted.png: no image named unlisted.png in the COCO file" in result.stderr
    listed = json.loads((out / COCO_IMAGES_FILE).read_text())["images"]
    assert sorted(im["id"] for im in listed) == [41, 42]
    # (a randomly initialised model: what it predicts is not known, only where it goes)
    results = json.loads((out / COCO_RESULTS_FILE).read_text())
    assert {r["image_id"] for r in results} <= {41, 42}
    assert all(0.0 <= r["score"] <= 1.0 for r in results)


def test_cocoeval_reads_the_results(tmp_path):
    from pycocotools.coco import COCO
    from pycocotools.cocoeval import COCOeval

    from rooftop_m2f.data.coco_convert import categories, mask_annotations

    path = tmp_path / "a.png"
    Image.fromarray(np.zeros((18, 16, 3), np.uint8)).save(path)
    predict_files(TiledPredictor(ScriptedScores(), tile_size=64, overlap=0), [str(path)],
                  tmp_path / "out", outputs=["coco"], coco_image_ids={"a.png": 5})
    gt_mask = np.zeros((18, 16), np.uint8)
    gt_mask[2:6, 3:9] = 1          # the predicted panel exactly; the water heater is a false positive
    gt_path = tmp_path / "gt.json"
    gt_path.write_text(json.dumps({
        "images": [{"id": 5, "file_name": "a.png", "height": 18, "width": 16}],
        "annotations": mask_annotations(gt_mask, 5), "categories": categories()}))
    gt = COCO(str(gt_path))
    evaluator = COCOeval(gt, gt.loadRes(str(tmp_path / "out" / COCO_RESULTS_FILE)), "segm")
    evaluator.evaluate()
    evaluator.accumulate()
    evaluator.summarize()
    precision = evaluator.eval["precision"]  # (IoU thresholds, recall, category, area, max dets)
    assert precision[:, :, 0, 0, -1].min() == pytest.approx(1.0)  # solar_panel: a perfect match


def _write_images(folder, values):
    folder.mkdir(exist_ok=True)
    paths = []
    for name, value in values.items():
        Image.fromarray(np.full((18, 16, 3), value, np.uint8)).save(folder / name)
        paths.append(str(folder / name))
    return paths


def test_a_second_prediction_keeps_the_earlier_images_results(tmp_path):
    """Earlier images keep their ids and results; an image predicted again is replaced and keeps
    its id; a new image gets the next free id."""
    predictor = TiledPredictor(ScriptedScores(), tile_size=64, overlap=0)
    out = tmp_path / "out"
    a, b = _write_images(tmp_path / "first", {"a.png": 20, "b.png": 20})
    assert predict_files(predictor, [a, b], out, outputs=["coco"]) == []
    first = json.loads((out / COCO_RESULTS_FILE).read_text())
    a_results = [r for r in first if r["image_id"] == 1]
    # b predicted again (now the bright version: one more panel pair) and a new image c
    b2, c = _write_images(tmp_path / "second", {"b.png": 200, "c.png": 20})
    assert predict_files(predictor, [b2, c], out, outputs=["coco"]) == []
    images = json.loads((out / COCO_IMAGES_FILE).read_text())["images"]
    assert [(i["id"], i["file_name"]) for i in images] == [(1, a), (2, b2), (3, c)]
    results = json.loads((out / COCO_RESULTS_FILE).read_text())
    assert [r for r in results if r["image_id"] == 1] == a_results
    assert sorted(r["category_id"] for r in results if r["image_id"] == 2) == [1, 1, 1, 2]
    assert sorted(r["category_id"] for r in results if r["image_id"] == 3) == [1, 2]


def test_coco_files_that_cannot_be_merged_are_refused_before_the_work(tmp_path):
    from rooftop_m2f.inference.writers import SummaryError, folder_outputs

    out = tmp_path / "out"
    out.mkdir()
    (out / COCO_RESULTS_FILE).write_text("[]")
    with pytest.raises(SummaryError, match=f"{COCO_RESULTS_FILE}: earlier COCO results without "
                                           f"{COCO_IMAGES_FILE}"):
        folder_outputs(out, ["coco"])
    folder_outputs(out, ["index"])  # not asked for: not read
    (out / COCO_IMAGES_FILE).write_text("{not json")
    with pytest.raises(SummaryError, match=f"{COCO_IMAGES_FILE}: cannot read"):
        folder_outputs(out, ["coco"])
    (out / COCO_IMAGES_FILE).write_text('{"images": [{"id": 1}]}')
    with pytest.raises(SummaryError, match="not the COCO image list"):
        folder_outputs(out, ["coco"])
    (out / COCO_IMAGES_FILE).write_text("{not json")
    [path] = _write_images(tmp_path / "in", {"a.png": 20})
    with pytest.raises(SummaryError):
        predict_files(TiledPredictor(ScriptedScores(), tile_size=64, overlap=0), [path], out,
                      outputs=["index", "coco"])
    assert not (out / "a_index.png").exists()  # refused before any prediction was written
    assert (out / COCO_IMAGES_FILE).read_text() == "{not json"  # and nothing overwritten


def test_a_given_image_id_taken_by_an_earlier_image_is_a_named_failure(tmp_path):
    predictor = TiledPredictor(ScriptedScores(), tile_size=64, overlap=0)
    out = tmp_path / "out"
    [a] = _write_images(tmp_path / "first", {"a.png": 20})
    assert predict_files(predictor, [a], out, outputs=["coco"], coco_image_ids={"a.png": 7}) == []
    [b] = _write_images(tmp_path / "second", {"b.png": 20})
    failures = predict_files(predictor, [b], out, outputs=["coco"], coco_image_ids={"b.png": 7})
    assert failures == [f"{b}: image id 7 is already used by {a} in {out / COCO_IMAGES_FILE}; "
                        "predict into another folder"]
    images = json.loads((out / COCO_IMAGES_FILE).read_text())["images"]
    assert [(i["id"], i["file_name"]) for i in images] == [(7, a)]


def test_an_earlier_image_whose_new_prediction_fails_keeps_its_id_to_itself(tmp_path):
    """The earlier image's id stays reserved while it is re-predicted: if that fails, the earlier
    image stays, and no other image may take its id."""
    predictor = TiledPredictor(ScriptedScores(), tile_size=64, overlap=0)
    out = tmp_path / "out"
    [a] = _write_images(tmp_path / "first", {"a.png": 20})
    assert predict_files(predictor, [a], out, outputs=["coco"], coco_image_ids={"a.png": 10}) == []
    second = tmp_path / "second"
    second.mkdir()
    (second / "a.png").write_bytes(b"not an image")
    [c] = _write_images(second, {"c.png": 20})
    failures = predict_files(predictor, [str(second / "a.png"), c], out, outputs=["coco"],
                             coco_image_ids={"a.png": 3, "c.png": 10})
    assert len(failures) == 2 and failures[0].startswith(str(second / "a.png"))
    assert failures[1] == (f"{c}: image id 10 is already used by {a} in "
                           f"{out / COCO_IMAGES_FILE}; predict into another folder")
    images = json.loads((out / COCO_IMAGES_FILE).read_text())["images"]
    assert [(i["id"], i["file_name"]) for i in images] == [(10, a)]
