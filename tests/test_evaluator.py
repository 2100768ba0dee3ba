"""RooftopSemSegEvaluator: hand-computed case, GT sources, output file, agreement with
detectron2's SemSegEvaluator and gathering across processes."""
import json
import math
import os
import time
import uuid

import numpy as np
import pytest
import torch
from detectron2.data import DatasetCatalog, MetadataCatalog
from detectron2.utils import comm
from PIL import Image

from rooftop_m2f.data.capetown import CLASS_NAMES, FOREGROUND_CLASSES
from rooftop_m2f.evaluation import RooftopSemSegEvaluator
from rooftop_m2f.evaluation.metrics import confusion_counts

K = len(CLASS_NAMES)


def scores_for(pred, noise_seed=0):
    """(K, H, W) float scores whose argmax over K is ``pred``."""
    g = torch.Generator().manual_seed(noise_seed)
    pred = torch.as_tensor(pred, dtype=torch.int64)
    onehot = torch.nn.functional.one_hot(pred, K).permute(2, 0, 1).float()
    return onehot + 0.5 * torch.rand(onehot.shape, generator=g)


def make_dataset(tmp_path, gts, name=None):
    """Register a temporary dataset whose masks are single-channel uint8 PNGs."""
    name = name or f"rooftop_eval_test_{uuid.uuid4().hex[:8]}"
    (tmp_path / "masks").mkdir(exist_ok=True)
    dicts = []
    for i, gt in enumerate(gts):
        mask = tmp_path / "masks" / f"img{i}.png"
        Image.fromarray(gt.astype(np.uint8), mode="L").save(mask)
        dicts.append({"file_name": str(tmp_path / f"img{i}.jpg"), "sem_seg_file_name": str(mask),
                      "height": gt.shape[0], "width": gt.shape[1], "image_id": f"img{i}"})
    DatasetCatalog.register(name, lambda: [dict(d) for d in dicts])
    MetadataCatalog.get(name).set(stuff_classes=list(CLASS_NAMES), ignore_label=255,
                                  evaluator_type="rooftop_sem_seg")
    return name, dicts


@pytest.fixture
def registered(tmp_path):
    names = []

    def make(gts):
        name, dicts = make_dataset(tmp_path, gts)
        names.append(name)
        return name, dicts

    yield make
    for name in names:
        DatasetCatalog.remove(name)
        MetadataCatalog.remove(name)


def random_case(seed, n=3, shape=(24, 32)):
    rng = np.random.default_rng(seed)
    gts, preds = [], []
    for _ in range(n):
        gt = rng.integers(0, K, shape)
        gt[rng.random(shape) < 0.1] = 255
        right = np.where(gt == 255, 0, gt)
        pred = np.where(rng.random(shape) < 0.5, right, rng.integers(0, K, shape))
        gts.append(gt)
        preds.append(pred)
    return gts, preds


def load_mask_for_detectron2(path, dtype=int):
    """For detectron2's SemSegEvaluator(sem_seg_loading_fn=...): its default loader calls
    np.array(copy=False), which numpy 2 refuses."""
    with Image.open(path) as im:
        return np.asarray(im, dtype=dtype).copy()


def run(evaluator, dicts, preds):
    evaluator.reset()
    for i, (d, pred) in enumerate(zip(dicts, preds)):
        evaluator.process([d], [{"sem_seg": scores_for(pred, i)}])
    return evaluator.evaluate()


def test_hand_computed_single_image(registered, tmp_path):
    # gt -> pred per pixel: 0->0, 0->1, 1->1, 1->1, 2->2, 2->0, 3->3, 255->2 (ignored)
    gt = np.array([[0, 0, 1, 1], [2, 2, 3, 255]])
    pred = np.array([[0, 1, 1, 1], [2, 0, 3, 2]])
    name, dicts = registered([gt])
    out_dir = tmp_path / "eval_out"
    ev = RooftopSemSegEvaluator(name, distributed=False, output_dir=str(out_dir))
    res = run(ev, dicts, [pred])["sem_seg"]
    # per class: TP, FP, FN counted from the list above
    tp, fp, fn = [1, 2, 1, 1], [1, 1, 0, 0], [1, 0, 1, 0]
    ious = [t / (t + p + n) for t, p, n in zip(tp, fp, fn)]
    assert res["mIoU"] == pytest.approx(sum(ious) / 4)
    assert res["macro_fg_mIoU"] == pytest.approx(sum(ious[1:]) / 3)
    assert res["pAcc"] == pytest.approx(5 / 7)
    assert res["fwIoU"] == pytest.approx(sum(g / 7 * i for g, i in zip([2, 2, 2, 1], ious)))
    for c, cname in enumerate(CLASS_NAMES):
        assert res[f"IoU-{cname}"] == pytest.approx(ious[c])
        assert res[f"precision-{cname}"] == pytest.approx(tp[c] / (tp[c] + fp[c]))
        assert res[f"recall-{cname}"] == pytest.approx(tp[c] / (tp[c] + fn[c]))
        assert res[f"F1-{cname}"] == pytest.approx(2 * tp[c] / (2 * tp[c] + fp[c] + fn[c]))
    assert res["num_undefined_classes"] == 0.0

    # structured result file: strict JSON, written atomically (no temporary file left over)
    assert os.listdir(out_dir) == ["sem_seg_evaluation.json"]
    saved = json.loads((out_dir / "sem_seg_evaluation.json").read_text(),
                       parse_constant=lambda c: pytest.fail(f"non-strict JSON {c}"))
    np.testing.assert_array_equal(saved["confusion_matrix"], confusion_counts(gt, pred, K))
    assert saved["mIoU"] == pytest.approx(res["mIoU"])
    assert saved["dataset"] == name and saved["num_images"] == 1
    assert saved["foreground_classes"] == list(FOREGROUND_CLASSES)


def test_undefined_class_is_left_out_of_flat_results(registered):
    gt = np.array([[0, 0, 1, 1]])
    pred = np.array([[0, 1, 1, 1]])  # classes 2 and 3 absent from gt and predictions
    name, dicts = registered([gt])
    ev = RooftopSemSegEvaluator(name, distributed=False)
    res = run(ev, dicts, [pred])["sem_seg"]
    assert not any(k.endswith(("-solar_water_heater", "-solar_pool_heater")) for k in res)
    assert res["num_undefined_classes"] == 2.0
    assert res["macro_fg_mIoU"] == pytest.approx(2 / 3)  # solar_panel only: TP 2, FP 1
    assert ev.last_metrics.undefined_classes == ["solar_water_heater", "solar_pool_heater"]
    assert all(not math.isnan(v) for v in res.values())


def test_ground_truth_sources_agree(registered):
    gts, preds = random_case(3)
    name, dicts = registered(gts)
    ev = RooftopSemSegEvaluator(name, distributed=False)
    from_file = run(ev, dicts, preds)
    # detectron2's test mapper drops sem_seg_file_name: found through the catalog by file_name
    no_key = [{k: v for k, v in d.items() if k != "sem_seg_file_name"} for d in dicts]
    assert run(ev, no_key, preds) == from_file
    # a full-size sem_seg tensor in the input
    with_tensor = [{"sem_seg": torch.as_tensor(g)} for g in gts]
    assert run(ev, with_tensor, preds) == from_file
    # a resized sem_seg tensor is refused with a clear message
    ev.reset()
    with pytest.raises(ValueError, match="input 'sem_seg' has shape"):
        ev.process([{"file_name": "x.jpg", "sem_seg": torch.zeros(5, 5, dtype=torch.int64)}],
                   [{"sem_seg": scores_for(preds[0])}])
    with pytest.raises(ValueError, match=r"img0\.png.*differ in size"):
        ev.process([dicts[0]], [{"sem_seg": scores_for(np.zeros((3, 3), int))}])


def test_agrees_with_detectron2_sem_seg_evaluator(registered):
    from detectron2.evaluation import SemSegEvaluator

    gts, preds = random_case(5, n=4, shape=(40, 48))
    assert all(np.isin(np.arange(K), np.concatenate([g.ravel() for g in gts])))
    name, dicts = registered(gts)
    ours = run(RooftopSemSegEvaluator(name, distributed=False), dicts, preds)["sem_seg"]
    d2 = SemSegEvaluator(name, distributed=False, sem_seg_loading_fn=load_mask_for_detectron2)
    theirs = run(d2, dicts, preds)["sem_seg"]
    # detectron2 reports percentages; we report fractions
    for key in ["mIoU", "fwIoU"] + [f"IoU-{c}" for c in CLASS_NAMES]:
        assert ours[key] == pytest.approx(theirs[key] / 100, abs=1e-12), key
    assert ours["pAcc"] == pytest.approx(theirs["pACC"] / 100, abs=1e-12)
    for c in CLASS_NAMES:  # detectron2's per-class accuracy is the recall
        assert ours[f"recall-{c}"] == pytest.approx(theirs[f"ACC-{c}"] / 100, abs=1e-12)


def test_documented_difference_class_predicted_but_absent_from_gt(registered):
    """detectron2 gives such a class IoU NaN and leaves it out of mIoU; we count IoU 0."""
    from detectron2.evaluation import SemSegEvaluator

    gt = np.array([[0, 0, 1, 1, 2, 2]])
    pred = np.array([[0, 3, 1, 1, 2, 2]])  # class 3 predicted, absent from gt
    name, dicts = registered([gt])
    ours = run(RooftopSemSegEvaluator(name, distributed=False), dicts, [pred])["sem_seg"]
    d2 = SemSegEvaluator(name, distributed=False, sem_seg_loading_fn=load_mask_for_detectron2)
    theirs = run(d2, dicts, [pred])["sem_seg"]
    assert math.isnan(theirs["IoU-solar_pool_heater"])
    assert ours["IoU-solar_pool_heater"] == 0.0
    iou0 = 1 / 2  # background: TP 1, FN 1
    assert theirs["mIoU"] / 100 == pytest.approx((iou0 + 1 + 1) / 3)
    assert ours["mIoU"] == pytest.approx((iou0 + 1 + 1 + 0) / 4)


def test_evaluate_sums_what_gather_returns(registered, monkeypatch):
    gts, preds = random_case(7, n=4)
    name, dicts = registered(gts)
    expected = run(RooftopSemSegEvaluator(name, distributed=False), dicts, preds)

    sent = {}
    monkeypatch.setattr(comm, "get_world_size", lambda: 2)
    # rank 1 processes the last two images; gather sends its state to rank 0
    monkeypatch.setattr(comm, "is_main_process", lambda: False)
    monkeypatch.setattr(comm, "gather", lambda data, dst=0, group=None: sent.setdefault("rank1", data) and [])
    assert run(RooftopSemSegEvaluator(name, distributed=True), dicts[2:], preds[2:]) is None
    assert "rank1" in sent
    # rank 0 processes the first two and receives [its own, rank 1's]
    monkeypatch.setattr(comm, "is_main_process", lambda: True)
    monkeypatch.setattr(comm, "gather", lambda data, dst=0, group=None: [data, sent["rank1"]])
    ev0 = RooftopSemSegEvaluator(name, distributed=True)
    assert run(ev0, dicts[:2], preds[:2]) == expected
    assert ev0.last_metrics.num_images == 4


def test_no_image_processed_returns_empty(registered):
    name, _ = registered([np.zeros((2, 2), int)])
    assert RooftopSemSegEvaluator(name, distributed=False).evaluate() == {}


def test_metadata_without_classes_is_a_clear_error():
    with pytest.raises(ValueError, match="stuff_classes"):
        RooftopSemSegEvaluator(f"not_registered_{uuid.uuid4().hex[:6]}")


def _gloo_worker(rank, init_file, gts, preds, results):
    import torch.distributed as dist

    dist.init_process_group("gloo", init_method="file://" + init_file, rank=rank, world_size=2)
    try:
        ev = RooftopSemSegEvaluator("capetown_sem_seg_val", distributed=True)
        ev.reset()
        for i in range(rank, len(gts), 2):  # each rank sees a different share of the images
            ev.process([{"sem_seg": torch.as_tensor(gts[i])}], [{"sem_seg": scores_for(preds[i], i)}])
        results.put((rank, ev.evaluate()))
    finally:
        dist.destroy_process_group()


def test_real_two_process_gloo_gather(registered, tmp_path):
    """Two forked processes in a gloo group (fork: the children need not import anything)."""
    import torch.multiprocessing as mp

    gts, preds = random_case(11, n=5)
    name, dicts = registered(gts)
    expected = run(RooftopSemSegEvaluator(name, distributed=False), dicts, preds)
    queue = mp.get_context("fork").SimpleQueue()
    ctx = mp.start_processes(_gloo_worker, args=(str(tmp_path / "init"), gts, preds, queue),
                             nprocs=2, join=False, start_method="fork")
    deadline = time.monotonic() + 120
    while not ctx.join(timeout=1):
        if time.monotonic() > deadline:
            for p in ctx.processes:
                p.kill()
            pytest.fail("2-process gloo evaluation timed out")
    results = dict(queue.get() for _ in range(2))
    assert results[1] is None  # non-main ranks return None
    assert results[0] == expected
