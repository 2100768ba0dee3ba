"""Augmentations (rooftop_m2f.data.transforms) and RooftopSemanticDatasetMapper.

Alignment is checked with an image that encodes pixel positions: (R, G, B) = (x, y, MARK)
(images up to 256 px a side). Bilinear interpolation of a linear function is exact, so after
any geometric transform a pixel's (R, G) is its source position rounded to the nearest pixel,
i.e. where nearest-neighbour sampling of the mask must have read: the output mask must equal
``source_mask[G, R]``. B stays MARK only where no sample touched the zero border. The source
mask is random rectangular blocks (no symmetry), so a flip, rotation, half-pixel or larger
shift applied to one and not the other shows. Exact transforms must agree everywhere; for
interpolating ones, ties (positions within rounding of a half pixel) may differ, so agreement
is required where the source neighbourhood is one label and on nearly all pixels overall
(chained interpolations round twice: a looser bound per sample, a tight one on average).
"""
import math

import cv2
import numpy as np
import pytest
import torch
from PIL import Image

from detectron2.data import transforms as T
from rooftop_m2f.config import get_rooftop_cfg
from rooftop_m2f.data import capetown
from rooftop_m2f.data import transforms as RT
from rooftop_m2f.data.mapper import RooftopSemanticDatasetMapper, instances_from_sem_seg

IGNORE = capetown.IGNORE_LABEL
MARK = 100


# --- helpers --------------------------------------------------------------------------------

def block_labels(h, w, block, num_labels, rng):
    """(h, w) uint8 label map of random labels in blocks of ``block`` pixels (edges cut)."""
    grid = rng.integers(0, num_labels, (math.ceil(h / block), math.ceil(w / block)), dtype=np.uint8)
    return np.repeat(np.repeat(grid, block, 0), block, 1)[:h, :w].copy()


def position_image(h, w):
    assert h <= 256 and w <= 256
    ys, xs = np.mgrid[0:h, 0:w]
    return np.stack([xs, ys, np.full_like(xs, MARK)], axis=-1).astype(np.uint8)


def sample(h=96, w=128, block=12, num_labels=250, seed=0):
    """(position image, block mask) of one source tile."""
    return position_image(h, w), block_labels(h, w, block, num_labels, np.random.default_rng(seed))


def one_label_around(mask):
    """Pixels whose 3x3 neighbourhood in ``mask`` holds one label."""
    kernel = np.ones((3, 3), np.uint8)
    return cv2.erode(mask, kernel, borderType=cv2.BORDER_REPLICATE) == \
        cv2.dilate(mask, kernel, borderType=cv2.BORDER_REPLICATE)


def apply(tfm, image, mask):
    return tfm.apply_image(image), tfm.apply_segmentation(mask)


def alignment(image, mask, source_mask):
    """(agree, sure) over the pixels judged: mask == source_mask at the decoded position, and
    whether the source is one label around it. Pixels touched by the border are skipped."""
    assert image.shape[:2] == mask.shape and image.dtype == np.uint8
    valid = (image[..., 2] == MARK) & (mask != IGNORE)
    labelled = (mask != IGNORE).sum()
    assert labelled > 0 and valid.sum() >= 0.7 * labelled, (
        f"only {int(valid.sum())} of {int(labelled)} labelled pixels have an image pixel from "
        "inside the source")
    x, y = image[..., 0][valid].astype(int), image[..., 1][valid].astype(int)
    assert x.max() < source_mask.shape[1] and y.max() < source_mask.shape[0]
    return source_mask[y, x] == mask[valid], one_label_around(source_mask)[y, x]


def assert_exactly_aligned(image, mask, source_mask):
    agree, _ = alignment(image, mask, source_mask)
    assert agree.all(), f"{int((~agree).sum())} pixels disagree"
    assert ((image[..., 2] == MARK) == (mask != IGNORE)).all(), "image and mask borders differ"
    assert (image[mask == IGNORE] == 0).all(), "outside the source the image must be 0"


def assert_aligned(image, mask, source_mask, min_fraction=0.995):
    """Exact inside blocks; ``min_fraction`` overall (one correct transform agrees on ~100%,
    one half a pixel off on ~95%). Returns the fraction that agrees."""
    agree, sure = alignment(image, mask, source_mask)
    assert agree[sure].all(), f"{int((~agree[sure]).sum())} pixels inside blocks disagree"
    assert agree.mean() >= min_fraction, f"only {agree.mean():.4f} of the pixels agree"
    return agree.mean()


def cfg_for(crop=None, jitter=(0.0, 0.0, 0.0, 0.0), **aug):
    cfg = get_rooftop_cfg()
    cfg.INPUT.FORMAT = "RGB"  # as the project's configs (detectron2's default is BGR)
    if crop is None:
        cfg.INPUT.CROP.ENABLED = False
    else:
        cfg.INPUT.CROP.ENABLED = True
        cfg.INPUT.CROP.TYPE = "absolute"
        cfg.INPUT.CROP.SIZE = tuple(crop)
    cfg.ROOFTOP.AUG.COLOR_JITTER = tuple(jitter)
    for key, value in aug.items():
        setattr(cfg.ROOFTOP.AUG, key, value)
    return cfg


def write_sample(tmp_path, image, mask, name="tile"):
    img_path, mask_path = tmp_path / f"{name}.png", tmp_path / f"{name}_mask.png"
    Image.fromarray(image).save(img_path)
    Image.fromarray(mask).save(mask_path)
    return {"file_name": str(img_path), "sem_seg_file_name": str(mask_path),
            "height": image.shape[0], "width": image.shape[1], "image_id": name}


def hwc(tensor):
    return tensor.permute(1, 2, 0).numpy()


# --- the checks themselves fail on misalignment ---------------------------------------------

def test_alignment_checks_see_shifts():
    image, mask = sample()
    assert_exactly_aligned(image, mask, mask)
    with pytest.raises(AssertionError):
        assert_exactly_aligned(image, np.roll(mask, 1, axis=1), mask)
    with pytest.raises(AssertionError):
        assert_aligned(image, np.roll(mask, 1, axis=0), mask)
    # a mask warped half a pixel off (e.g. floor instead of round) fails the 98% check
    matrix = RT.affine_matrix(96, 128, scale=1.1, angle=20.0, shear=0.0)
    tfm = RT.AffineTransform(matrix, 96, 128)
    off = RT.AffineTransform(matrix + [[0, 0, 0.5], [0, 0, 0.5]], 96, 128)
    assert_aligned(tfm.apply_image(image), tfm.apply_segmentation(mask), mask)
    with pytest.raises(AssertionError):
        assert_aligned(tfm.apply_image(image), off.apply_segmentation(mask), mask)


# --- exact transforms -----------------------------------------------------------------------

@pytest.mark.parametrize("vertical", [False, True])
def test_flip_keeps_alignment(vertical):
    image, mask = sample()
    aug = T.RandomFlip(1.0, horizontal=not vertical, vertical=vertical)
    aug_input = T.AugInput(image, sem_seg=mask)
    aug(aug_input)
    assert not np.array_equal(aug_input.sem_seg, mask)
    np.testing.assert_array_equal(aug_input.sem_seg, np.flip(mask, 0 if vertical else 1))
    assert_exactly_aligned(aug_input.image, aug_input.sem_seg, mask)


@pytest.mark.parametrize("k", [1, 2, 3])
def test_rot90_keeps_alignment_and_coords(k):
    image, mask = sample()
    tfm = RT.Rot90Transform(k, *mask.shape)
    out_image, out_mask = apply(tfm, image, mask)
    np.testing.assert_array_equal(out_mask, np.rot90(mask, k))
    assert out_image.flags.c_contiguous and out_image.shape == out_mask.shape + (3,)
    assert_exactly_aligned(out_image, out_mask, mask)
    # a pixel centre lands on the pixel that holds its label
    ys, xs = np.array([5, 40, 90]), np.array([3, 77, 120])
    x2, y2 = tfm.apply_coords(np.stack([xs + 0.5, ys + 0.5], 1)).T
    np.testing.assert_array_equal(out_mask[np.floor(y2).astype(int), np.floor(x2).astype(int)], mask[ys, xs])
    np.testing.assert_array_equal(tfm.inverse().apply_segmentation(out_mask), mask)


def test_random_rot90_draws_every_quarter_turn():
    image = np.zeros((4, 6, 3), np.uint8)
    np.random.seed(0)
    shapes = {RT.RandomRot90().get_transform(image).apply_image(image).shape for _ in range(40)}
    assert shapes == {(4, 6, 3), (6, 4, 3)}
    ks = {getattr(RT.RandomRot90().get_transform(image), "k", 0) for _ in range(40)}
    assert ks == {0, 1, 2, 3}


def test_crop_keeps_alignment():
    image, mask = sample()
    np.random.seed(1)
    offsets = set()
    for _ in range(10):
        aug_input = T.AugInput(image, sem_seg=mask)
        tfm = RT.RandomCropPad((64, 80))(aug_input)
        offsets.add((tfm.src_y, tfm.src_x))
        assert aug_input.sem_seg.shape == (64, 80) and aug_input.image.shape == (64, 80, 3)
        assert (aug_input.sem_seg != IGNORE).all()
        np.testing.assert_array_equal(
            aug_input.sem_seg, mask[tfm.src_y:tfm.src_y + 64, tfm.src_x:tfm.src_x + 80])
        assert_exactly_aligned(aug_input.image, aug_input.sem_seg, mask)
    assert len(offsets) > 1, "the crop position must be random"


def test_pad_when_smaller_than_crop():
    image, mask = sample(h=40, w=50)
    np.random.seed(2)
    for _ in range(5):
        aug_input = T.AugInput(image, sem_seg=mask)
        tfm = RT.RandomCropPad((64, 48))(aug_input)  # pad rows, crop columns
        out_image, out_mask = aug_input.image, aug_input.sem_seg
        assert out_mask.shape == (64, 48) and out_image.shape == (64, 48, 3)
        assert (out_mask == IGNORE).sum() == (64 - 40) * 48
        assert (out_image[out_mask == IGNORE] == 0).all()
        rows = slice(tfm.dst_y, tfm.dst_y + 40)
        np.testing.assert_array_equal(out_mask[rows], mask[:, tfm.src_x:tfm.src_x + 48])
        assert_exactly_aligned(out_image, out_mask, mask)
        np.testing.assert_allclose(tfm.apply_coords(np.array([[0.0, 0.0]])),
                                   [[-tfm.src_x, tfm.dst_y]])


def test_crop_of_exact_size_is_a_no_op():
    image, mask = sample(h=64, w=64)
    aug_input = T.AugInput(image, sem_seg=mask)
    RT.RandomCropPad((64, 64))(aug_input)
    np.testing.assert_array_equal(aug_input.sem_seg, mask)


# --- interpolating transforms ---------------------------------------------------------------

@pytest.mark.parametrize("seed", range(6))
def test_affine_keeps_alignment(seed):
    image, mask = sample(seed=seed)
    np.random.seed(seed)
    tfm = RT.RandomAffine((0.75, 1.25), 30.0, 8.0).get_transform(image)
    out_image, out_mask = apply(tfm, image, mask)
    assert out_mask.shape == mask.shape and out_mask.dtype == np.uint8
    assert not np.array_equal(out_mask, mask)
    assert_aligned(out_image, out_mask, mask)
    border = out_mask == IGNORE
    if border.any():  # image 0 where the mask is ignore, but for bilinear taps of the edge
        assert (out_image[border] == 0).all(axis=-1).mean() > 0.9


def test_affine_rotation_border_is_ignore_and_coords_match():
    image, mask = sample()
    tfm = RT.AffineTransform(RT.affine_matrix(96, 128, scale=1.0, angle=30.0, shear=0.0), 96, 128)
    out_image, out_mask = apply(tfm, image, mask)
    assert out_mask[0, 0] == IGNORE and out_mask[-1, -1] == IGNORE  # corners come from outside
    assert (out_image[0, 0] == 0).all()
    assert_aligned(out_image, out_mask, mask)
    # block centres map onto pixels of their label
    ys, xs = np.mgrid[6:96:12, 6:128:12]
    pts = tfm.apply_coords(np.stack([xs.ravel(), ys.ravel()], 1).astype(float))
    inside = (pts[:, 0] >= 0) & (pts[:, 0] < 128) & (pts[:, 1] >= 0) & (pts[:, 1] < 96)
    got = out_mask[pts[inside, 1].astype(int), pts[inside, 0].astype(int)]
    assert inside.sum() > 50
    np.testing.assert_array_equal(got, mask[ys.ravel()[inside], xs.ravel()[inside]])


@pytest.mark.parametrize("seed", range(4))
def test_elastic_keeps_alignment(seed):
    image, mask = sample(seed=seed)
    np.random.seed(seed)
    tfm = RT.RandomElastic(alpha=250.0, sigma=8.0).get_transform(image)  # ~4 px RMS
    out_image, out_mask = apply(tfm, image, mask)
    assert out_mask.shape == mask.shape
    assert (out_mask != mask).mean() > 0.05, "the deformation must move pixels"
    assert_aligned(out_image, out_mask, mask)


def test_elastic_displacement_statistics_match_the_full_resolution_definition():
    """The coarse-grid field has the RMS of alpha * GaussianBlur(uniform(-1, 1), sigma)."""
    h = w = 512
    alpha, sigma = 300.0, 6.0
    rng = np.random.default_rng(0)
    full = [cv2.GaussianBlur(rng.uniform(-1, 1, (h, w)).astype(np.float32), (0, 0), sigma) * alpha
            for _ in range(2)]
    full_rms = float(np.sqrt(np.mean(np.square(full))))
    assert abs(full_rms - alpha / (sigma * math.sqrt(12 * math.pi))) < 0.1 * full_rms  # docstring
    np.random.seed(0)
    tfm = RT.RandomElastic(alpha, sigma).get_transform(np.zeros((h, w, 3), np.uint8))
    map_x, map_y = tfm.maps()
    dx = map_x - np.arange(w)[None, :]
    dy = map_y - np.arange(h)[:, None]
    rms = float(np.sqrt(np.mean(np.square(np.stack([dx, dy])))))
    assert 0.8 * full_rms < rms < 1.2 * full_rms, (rms, full_rms)
    # and it is smooth: neighbouring displacements are close, unlike the raw noise
    assert np.abs(np.diff(dx, axis=1)).mean() < 0.15 * np.abs(dx).mean()


@pytest.mark.parametrize("h, w, size", [(75, 105, 40), (30, 45, 64)])
def test_resize_keeps_alignment(h, w, size):
    # size ratios with odd numerators: no sample falls exactly half-way between two pixels
    image, mask = sample(h=h, w=w, block=6)
    tfm = RT.FixedResize(size).get_transform(image)
    out_image, out_mask = apply(tfm, image, mask)
    assert out_image.shape == (size, size, 3) and out_mask.shape == (size, size)
    assert_aligned(out_image, out_mask, mask)
    np.testing.assert_allclose(tfm.apply_coords(np.array([[w, h]], float)), [[size, size]])


# --- colour jitter --------------------------------------------------------------------------

def test_color_jitter_changes_the_image_only():
    mask = block_labels(64, 64, 8, 4, np.random.default_rng(0))
    image = np.random.default_rng(1).integers(0, 256, (64, 64, 3), dtype=np.uint8)
    np.random.seed(0)
    aug_input = T.AugInput(image.copy(), sem_seg=mask.copy())
    tfm = RT.RandomColorJitter(0.4, 0.4, 0.4, 0.1)(aug_input)
    assert isinstance(tfm, RT.ColorJitterTransform)
    np.testing.assert_array_equal(aug_input.sem_seg, mask)
    assert aug_input.image.dtype == np.uint8 and aug_input.image.shape == image.shape
    assert not np.array_equal(aug_input.image, image)


def test_color_jitter_components():
    rng = np.random.default_rng(0)
    image = rng.integers(0, 256, (16, 16, 3), dtype=np.uint8)
    same = RT.ColorJitterTransform(1.0, 1.0, 1.0, 0.0).apply_image(image)
    np.testing.assert_array_equal(same, image)
    bright = RT.ColorJitterTransform(1.3, 1.0, 1.0, 0.0).apply_image(image)
    expected = np.clip(np.floor(image * 1.3 + 0.5), 0, 255)
    assert np.abs(bright.astype(int) - expected).max() <= 1
    gray = RT.ColorJitterTransform(1.0, 1.0, 0.0, 0.0).apply_image(image).astype(int)
    assert np.abs(gray - gray[..., :1]).max() <= 1  # saturation 0: every channel equal
    flat = RT.ColorJitterTransform(1.0, 0.0, 1.0, 0.0).apply_image(image).astype(int)
    assert flat.max() - flat.min() <= 1  # contrast 0: the mean grey everywhere
    # hue rotates chroma and keeps grey pixels and luma
    gray_pixels = np.repeat(rng.integers(0, 256, (8, 8, 1), dtype=np.uint8), 3, axis=2)
    np.testing.assert_allclose(RT.ColorJitterTransform(1, 1, 1, 0.3).apply_image(gray_pixels),
                               gray_pixels, atol=1)
    red = np.zeros((2, 2, 3), np.uint8)
    red[..., 0] = 180
    shifted = RT.ColorJitterTransform(1, 1, 1, 1 / 3).apply_image(red).astype(int)
    assert shifted[0, 0, 0] < shifted[0, 0, 1], f"a third of the circle turns red greenish: {shifted[0, 0]}"
    mid = np.full((4, 4, 3), 100, np.uint8)
    mid[..., 0] = 150
    for hue in (-0.2, 0.1, 0.25):
        out = RT.ColorJitterTransform(1, 1, 1, hue).apply_image(mid).astype(float)
        assert abs(out[0, 0] @ [0.299, 0.587, 0.114] - mid[0, 0] @ [0.299, 0.587, 0.114]) < 1.5


# --- the composed training pipeline ---------------------------------------------------------

@pytest.mark.parametrize("always", [False, True])
def test_training_pipeline_keeps_alignment_over_many_seeds(always):
    cfg = cfg_for(crop=(80, 80), ELASTIC_ALPHA=150.0, ELASTIC_SIGMA=8.0)
    if always:
        cfg.ROOFTOP.AUG.FLIP_PROB = 1.0
        cfg.ROOFTOP.AUG.AFFINE_PROB = 1.0
        cfg.ROOFTOP.AUG.ELASTIC_PROB = 1.0
    augs = T.AugmentationList(RT.build_train_augmentations(cfg))
    image, mask = sample(h=96, w=112)
    fractions = []
    for seed in range(25):
        np.random.seed(seed)
        aug_input = T.AugInput(image, sem_seg=mask)
        augs(aug_input)
        assert aug_input.image.shape == (80, 80, 3) and aug_input.sem_seg.shape == (80, 80)
        fractions.append(assert_aligned(aug_input.image, aug_input.sem_seg, mask, min_fraction=0.96))
    assert np.mean(fractions) >= 0.985


def test_build_train_augmentations_follows_the_config():
    def kinds(cfg):
        out = []
        for aug in RT.build_train_augmentations(cfg):
            aug = getattr(aug, "aug", aug)  # RandomApply wraps
            out.append(type(aug).__name__)
        return out

    cfg = cfg_for(crop=(64, 64), jitter=(0.2, 0.2, 0.2, 0.02))
    assert kinds(cfg) == ["RandomFlip", "RandomFlip", "RandomRot90", "RandomAffine",
                          "RandomElastic", "RandomCropPad", "RandomColorJitter"]
    cfg = cfg_for(crop=None, FLIP_PROB=0.0, ROT90=False, AFFINE_PROB=0.0, ELASTIC_PROB=0.0)
    cfg.ROOFTOP.INPUT_SIZE = 32
    assert kinds(cfg) == ["FixedResize"]
    default = get_rooftop_cfg()
    assert default.ROOFTOP.INPUT_SIZE == 0
    cfg = cfg_for(crop=(64, 64))
    cfg.INPUT.CROP.TYPE = "relative_range"
    with pytest.raises(ValueError, match="INPUT.CROP.TYPE"):
        RT.build_train_augmentations(cfg)


def test_resize_variant_trains_at_the_resize_size(tmp_path):
    image, mask = sample(h=100, w=100, block=20, num_labels=4)
    record = write_sample(tmp_path, image, mask)
    cfg = cfg_for(crop=(40, 40))
    cfg.ROOFTOP.INPUT_SIZE = 40
    out = RooftopSemanticDatasetMapper(cfg, is_train=True)(record)
    assert out["image"].shape == (3, 40, 40)
    sem_seg = out["sem_seg"].numpy()
    assert (sem_seg != IGNORE).mean() > 0.5  # resized, not cropped out of the 100 px tile


# --- the mapper -----------------------------------------------------------------------------

def check_training_output(out, crop):
    image, sem_seg, inst = out["image"], out["sem_seg"], out["instances"]
    assert image.dtype == torch.uint8 and image.shape == (3,) + crop
    assert sem_seg.dtype == torch.int64 and sem_seg.shape == crop
    assert inst.image_size == crop
    assert inst.gt_classes.dtype == torch.int64
    present = sorted(set(torch.unique(sem_seg).tolist()) - {IGNORE})
    assert inst.gt_classes.tolist() == present
    assert inst.gt_masks.shape == (len(present),) + crop
    for cls, gt_mask in zip(inst.gt_classes, inst.gt_masks):
        assert torch.equal(gt_mask.bool(), sem_seg == cls)


def test_mapper_training_output_and_alignment(tmp_path):
    image, mask = sample(h=120, w=100, block=10, num_labels=4)
    record = write_sample(tmp_path, image, mask)
    cfg = cfg_for(crop=(64, 64), FLIP_PROB=0.5, AFFINE_PROB=0.5, ELASTIC_PROB=0.5,
                  ELASTIC_ALPHA=150.0, ELASTIC_SIGMA=8.0)
    mapper = RooftopSemanticDatasetMapper(cfg, is_train=True)
    for seed in range(12):
        np.random.seed(seed)
        out = mapper(record)
        check_training_output(out, (64, 64))
        assert_aligned(hwc(out["image"]), out["sem_seg"].numpy().astype(np.uint8), mask,
                       min_fraction=0.96)
    assert record["file_name"] and "image" not in record, "the input dict must not be modified"


def test_mapper_with_color_jitter_keeps_the_mask(tmp_path):
    image, mask = sample(h=64, w=64, block=8, num_labels=4)
    record = write_sample(tmp_path, image, mask)
    cfg = cfg_for(crop=(64, 64), jitter=(0.3, 0.3, 0.3, 0.05), FLIP_PROB=0.0, ROT90=False,
                  AFFINE_PROB=0.0, ELASTIC_PROB=0.0)
    np.random.seed(0)
    out = RooftopSemanticDatasetMapper(cfg, is_train=True)(record)
    np.testing.assert_array_equal(out["sem_seg"].numpy(), mask)
    assert not np.array_equal(hwc(out["image"]), image)
    check_training_output(out, (64, 64))


def test_mapper_pads_small_images_with_ignore(tmp_path):
    image, mask = sample(h=40, w=30, block=5, num_labels=4)
    record = write_sample(tmp_path, image, mask)
    cfg = cfg_for(crop=(64, 64), FLIP_PROB=0.0, ROT90=False, AFFINE_PROB=0.0, ELASTIC_PROB=0.0)
    out = RooftopSemanticDatasetMapper(cfg, is_train=True)(record)
    check_training_output(out, (64, 64))
    sem_seg = out["sem_seg"].numpy()
    assert (sem_seg == IGNORE).sum() == 64 * 64 - 40 * 30
    assert (hwc(out["image"])[sem_seg == IGNORE] == 0).all()
    assert_exactly_aligned(hwc(out["image"]), sem_seg.astype(np.uint8), mask)


def test_instances_for_background_only_and_for_nothing():
    inst = instances_from_sem_seg(torch.zeros((5, 6), dtype=torch.int64))
    assert inst.gt_classes.tolist() == [0] and inst.gt_masks.shape == (1, 5, 6)
    assert inst.gt_masks.all()
    inst = instances_from_sem_seg(torch.full((5, 6), IGNORE, dtype=torch.int64))
    assert inst.gt_classes.shape == (0,) and inst.gt_classes.dtype == torch.int64
    assert inst.gt_masks.shape == (0, 5, 6)
    sem_seg = torch.tensor([[3, 3, 255], [1, 0, 3]])
    inst = instances_from_sem_seg(sem_seg)
    assert inst.gt_classes.tolist() == [0, 1, 3]
    assert inst.gt_masks.dtype == torch.bool
    assert inst.gt_masks[2].tolist() == [[True, True, False], [False, False, True]]


def test_mapper_all_ignore_mask_gives_empty_instances(tmp_path):
    image = np.full((32, 32, 3), 90, np.uint8)
    record = write_sample(tmp_path, image, np.full((32, 32), IGNORE, np.uint8))
    out = RooftopSemanticDatasetMapper(cfg_for(crop=(32, 32)), is_train=True)(record)
    assert len(out["instances"]) == 0 and out["instances"].gt_masks.shape == (0, 32, 32)


def test_mapper_size_mismatch_names_both_files(tmp_path):
    image, _ = sample(h=32, w=48)
    record = write_sample(tmp_path, image, np.zeros((32, 40), np.uint8))
    mapper = RooftopSemanticDatasetMapper(cfg_for(crop=(32, 32)), is_train=True)
    with pytest.raises(capetown.DatasetError) as err:
        mapper(record)
    message = str(err.value)
    assert record["file_name"] in message and record["sem_seg_file_name"] in message
    assert "48x32" in message and "40x32" in message


def test_mapper_inference_output(tmp_path):
    image, mask = sample(h=50, w=70, num_labels=4)
    record = write_sample(tmp_path, image, mask)
    record["sem_seg_file_name"] = str(tmp_path / "not_read.png")  # inference must not read it
    cfg = cfg_for(crop=(32, 32))
    out = RooftopSemanticDatasetMapper(cfg, is_train=False)(record)
    assert set(out) >= {"image", "height", "width", "file_name", "sem_seg_file_name"}
    assert "sem_seg" not in out and "instances" not in out
    assert out["image"].dtype == torch.uint8
    np.testing.assert_array_equal(hwc(out["image"]), image)  # no augmentation
    assert (out["height"], out["width"]) == (50, 70)
    cfg.ROOFTOP.INPUT_SIZE = 32
    out = RooftopSemanticDatasetMapper(cfg, is_train=False)(record)
    assert out["image"].shape == (3, 32, 32)
    assert (out["height"], out["width"]) == (50, 70), "the prediction goes back to the original size"


def test_mapper_bgr_format_reverses_channels(tmp_path):
    image, mask = sample(h=32, w=32)
    record = write_sample(tmp_path, image, np.zeros((32, 32), np.uint8))
    cfg = cfg_for(crop=(32, 32))
    cfg.INPUT.FORMAT = "BGR"
    out = RooftopSemanticDatasetMapper(cfg, is_train=False)(record)
    np.testing.assert_array_equal(hwc(out["image"]), image[:, :, ::-1])
    cfg.INPUT.FORMAT = "L"
    with pytest.raises(ValueError, match="image_format"):
        RooftopSemanticDatasetMapper(cfg, is_train=False)


def test_mapped_sample_fits_maskformer_prepare_targets(tmp_path):
    from types import SimpleNamespace

    from detectron2.structures import ImageList
    from mask2former.maskformer_model import MaskFormer

    image, mask = sample(h=50, w=60, block=10, num_labels=4)
    record = write_sample(tmp_path, image, mask)
    out = RooftopSemanticDatasetMapper(cfg_for(crop=(50, 60), AFFINE_PROB=0.0,
                                               ELASTIC_PROB=0.0), is_train=True)(record)
    images = ImageList.from_tensors([out["image"].float()], size_divisibility=32)
    assert tuple(images.tensor.shape[-2:]) == (64, 64)  # padded to a multiple of 32
    targets = MaskFormer.prepare_targets(SimpleNamespace(), [out["instances"]], images)
    assert targets[0]["labels"] is out["instances"].gt_classes
    masks = targets[0]["masks"]
    k, h, w = out["instances"].gt_masks.shape
    assert masks.shape == (k,) + tuple(images.tensor.shape[-2:])
    assert torch.equal(masks[:, :h, :w], out["instances"].gt_masks)
    assert not masks[:, h:, :].any() and not masks[:, :, w:].any()
    assert masks.float().sum() == (out["sem_seg"] != IGNORE).sum()
