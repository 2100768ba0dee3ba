"""Training augmentations for rooftop semantic segmentation, in detectron2 style, and the one
test-time preprocessing (:func:`inference_image_tensor`) of the mapper and the predictor.

Each ``Random*``/``FixedResize`` class is a :class:`detectron2.data.transforms.Augmentation`
that draws its random parameters and returns a deterministic
:class:`fvcore.transforms.Transform`; that transform is then applied to the image and to the
mask with the *same* parameters, which keeps them aligned. Conventions:

* images are (H, W, 3) uint8 RGB; masks are (H, W) uint8 class indices;
* geometric transforms interpolate the image bilinearly and the mask with nearest neighbour;
* pixels that come from outside the source image are 0 in the image and
  :data:`~rooftop_m2f.data.capetown.IGNORE_LABEL` (255) in the mask, so the loss ignores them;
* colour jitter changes the image only.

:func:`build_train_augmentations` builds the training list from ``cfg.ROOFTOP.AUG`` and
``cfg.INPUT.CROP``; use it with ``T.AugmentationList(augs)(T.AugInput(image, sem_seg=mask))``.
"""
import math

import cv2
import numpy as np
import torch
from detectron2.data import transforms as T
from fvcore.transforms.transform import NoOpTransform, Transform

from .capetown import IGNORE_LABEL

__all__ = [
    "Rot90Transform", "AffineTransform", "ElasticTransform", "ColorJitterTransform",
    "CropPadTransform", "CvResizeTransform",
    "RandomRot90", "RandomAffine", "RandomElastic", "RandomColorJitter", "RandomCropPad",
    "FixedResize", "affine_matrix", "color_jitter_matrix", "build_train_augmentations",
    "image_tensor", "inference_image_tensor",
]


# --- transforms (deterministic) -------------------------------------------------------------

class Rot90Transform(Transform):
    """Rotate by ``k`` quarter turns with ``np.rot90`` (exact, no interpolation).

    ``height``/``width`` are the input size (needed for coordinates).
    """

    def __init__(self, k: int, height: int, width: int):
        super().__init__()
        self._set_attributes(locals())

    def apply_image(self, img):
        return np.ascontiguousarray(np.rot90(img, self.k % 4))

    def apply_coords(self, coords):
        # np.rot90 moves pixel (row r, col c) to (row W-1-c, col r): (x, y) -> (y, W - x).
        coords = np.asarray(coords, dtype=np.float64).copy()
        h, w = self.height, self.width
        for _ in range(self.k % 4):
            coords = np.stack([coords[:, 1], w - coords[:, 0]], axis=1)
            h, w = w, h
        return coords

    def inverse(self):
        h, w = (self.width, self.height) if self.k % 2 else (self.height, self.width)
        return Rot90Transform((4 - self.k) % 4, h, w)


class AffineTransform(Transform):
    """``cv2.warpAffine`` with a 2x3 matrix (OpenCV convention: pixel centres at integers),
    output the same size as the input. Image: bilinear, border 0; mask: nearest, border 255."""

    def __init__(self, matrix: np.ndarray, height: int, width: int, ignore_label: int = IGNORE_LABEL):
        super().__init__()
        matrix = np.asarray(matrix, dtype=np.float64).reshape(2, 3)
        self._set_attributes(locals())

    def _warp(self, arr, interp, border):
        return cv2.warpAffine(arr, self.matrix, (self.width, self.height), flags=interp,
                              borderMode=cv2.BORDER_CONSTANT, borderValue=border)

    def apply_image(self, img):
        return self._warp(img, cv2.INTER_LINEAR, 0)

    def apply_segmentation(self, segmentation):
        return self._warp(segmentation, cv2.INTER_NEAREST, self.ignore_label)

    def apply_coords(self, coords):
        # detectron2 coordinates put pixel centres at +0.5; OpenCV's at integers.
        coords = np.asarray(coords, dtype=np.float64) - 0.5
        return coords @ self.matrix[:, :2].T + self.matrix[:, 2] + 0.5


class ElasticTransform(Transform):
    """Elastic deformation: ``out(p) = in(p + d(p))`` sampled with ``cv2.remap``.

    ``dx``/``dy`` are displacement fields in pixels of the full image, given at any (coarse)
    resolution and upsampled bilinearly to ``height`` x ``width`` on first use. Image: bilinear,
    border 0; mask: nearest, border 255.
    """

    def __init__(self, dx: np.ndarray, dy: np.ndarray, height: int, width: int,
                 ignore_label: int = IGNORE_LABEL):
        super().__init__()
        self._set_attributes(locals())
        self._maps = None

    def maps(self):
        if self._maps is None:
            size = (self.width, self.height)
            dx = cv2.resize(self.dx.astype(np.float32), size, interpolation=cv2.INTER_LINEAR)
            dy = cv2.resize(self.dy.astype(np.float32), size, interpolation=cv2.INTER_LINEAR)
            dx += np.arange(self.width, dtype=np.float32)[None, :]
            dy += np.arange(self.height, dtype=np.float32)[:, None]
            self._maps = (dx, dy)
        return self._maps

    def apply_image(self, img):
        map_x, map_y = self.maps()
        return cv2.remap(img, map_x, map_y, cv2.INTER_LINEAR,
                         borderMode=cv2.BORDER_CONSTANT, borderValue=0)

    def apply_segmentation(self, segmentation):
        map_x, map_y = self.maps()
        return cv2.remap(segmentation, map_x, map_y, cv2.INTER_NEAREST,
                         borderMode=cv2.BORDER_CONSTANT, borderValue=self.ignore_label)

    def apply_coords(self, coords):
        raise NotImplementedError("ElasticTransform maps output to input; coordinates would need "
                                  "the inverse field, which is not implemented")


# Luma weights (ITU-R BT.601), the Y row of RGB -> YIQ.
_LUMA = np.array([0.299, 0.587, 0.114])
_RGB_TO_YIQ = np.array([_LUMA, [0.596, -0.274, -0.322], [0.211, -0.523, 0.312]])


def color_jitter_matrix(brightness, contrast, saturation, hue, mean_luma):
    """3x4 affine RGB map for the jitter of :class:`ColorJitterTransform` (see there)."""
    gray = np.outer(np.ones(3), _LUMA)  # x -> (luma of x) in every channel
    a, b = np.eye(3) * brightness, np.zeros(3)
    a, b = contrast * a, contrast * b + (1.0 - contrast) * brightness * mean_luma
    a = (saturation * np.eye(3) + (1.0 - saturation) * gray) @ a
    theta = 2.0 * math.pi * hue
    rotate_iq = np.array([[1, 0, 0],
                          [0, math.cos(theta), -math.sin(theta)],
                          [0, math.sin(theta), math.cos(theta)]])
    a = np.linalg.inv(_RGB_TO_YIQ) @ rotate_iq @ _RGB_TO_YIQ @ a
    return np.hstack([a, b[:, None]])


class ColorJitterTransform(Transform):
    """Brightness, contrast and saturation factors (1 = unchanged) and a hue rotation
    (fraction of the colour circle) of an RGB uint8 image. Masks and coordinates pass through.

    All four are affine maps of the RGB value: brightness ``b x``; contrast
    ``c x + (1 - c) mean_luma``; saturation ``s x + (1 - s) luma(x)``; hue a rotation of the
    chroma (I, Q) plane of YIQ, which keeps the luma. They commute, so they are composed into
    one 3x4 matrix and applied with a single ``cv2.transform`` (rounded, saturated to 0..255
    once at the end rather than after each step as torchvision does).
    """

    def __init__(self, brightness: float, contrast: float, saturation: float, hue: float):
        super().__init__()
        self._set_attributes(locals())

    def apply_image(self, img):
        assert img.ndim == 3 and img.shape[2] == 3, f"expected an (H, W, 3) image, got {img.shape}"
        mean_luma = float(np.dot(cv2.mean(img)[:3], _LUMA)) if self.contrast != 1.0 else 0.0
        matrix = color_jitter_matrix(self.brightness, self.contrast, self.saturation, self.hue, mean_luma)
        out = cv2.transform(img, matrix.astype(np.float32))
        return out if img.dtype == np.uint8 else out.astype(img.dtype)

    def apply_segmentation(self, segmentation):
        return segmentation

    def apply_coords(self, coords):
        return coords


class CropPadTransform(Transform):
    """An ``out_h`` x ``out_w`` output holding the source window
    ``[src_y, src_y + h) x [src_x, src_x + w)`` at ``(dst_y, dst_x)``; the rest is padding
    (0 in the image, 255 in the mask). Covers cropping, padding, and both at once."""

    def __init__(self, src_y: int, src_x: int, dst_y: int, dst_x: int, h: int, w: int,
                 out_h: int, out_w: int, ignore_label: int = IGNORE_LABEL):
        super().__init__()
        self._set_attributes(locals())

    def _apply(self, arr, fill):
        out = np.full((self.out_h, self.out_w) + arr.shape[2:], fill, dtype=arr.dtype)
        out[self.dst_y:self.dst_y + self.h, self.dst_x:self.dst_x + self.w] = \
            arr[self.src_y:self.src_y + self.h, self.src_x:self.src_x + self.w]
        return out

    def apply_image(self, img):
        return self._apply(img, 0)

    def apply_segmentation(self, segmentation):
        return self._apply(segmentation, self.ignore_label)

    def apply_coords(self, coords):
        return np.asarray(coords, dtype=np.float64) + [self.dst_x - self.src_x, self.dst_y - self.src_y]


class CvResizeTransform(Transform):
    """Resize (h, w) -> (new_h, new_w) with OpenCV: image bilinear, ``INTER_LINEAR_EXACT``
    (bit-exact; plain ``INTER_LINEAR`` on uint8 can be a level off and then disagrees with the
    nearest-neighbour mask at edges); mask ``INTER_NEAREST_EXACT`` (centre-aligned nearest,
    the same sample positions)."""

    def __init__(self, h: int, w: int, new_h: int, new_w: int):
        super().__init__()
        self._set_attributes(locals())

    def apply_image(self, img):
        if (img.shape[0], img.shape[1]) == (self.new_h, self.new_w):
            return img
        return cv2.resize(img, (self.new_w, self.new_h), interpolation=cv2.INTER_LINEAR_EXACT)

    def apply_segmentation(self, segmentation):
        if segmentation.shape[:2] == (self.new_h, self.new_w):
            return segmentation
        return cv2.resize(segmentation, (self.new_w, self.new_h), interpolation=cv2.INTER_NEAREST_EXACT)

    def apply_coords(self, coords):
        return np.asarray(coords, dtype=np.float64) * [self.new_w / self.w, self.new_h / self.h]


# --- augmentations (random policies) --------------------------------------------------------

class RandomRot90(T.Augmentation):
    """A uniformly random multiple of 90 degrees (aerial imagery has no upright)."""

    def __init__(self):
        super().__init__()

    def get_transform(self, image):
        k = int(np.random.randint(4))
        return Rot90Transform(k, *image.shape[:2]) if k else NoOpTransform()


def affine_matrix(height, width, scale, angle, shear):
    """2x3 matrix (OpenCV convention) scaling, shearing (x += tan(shear) * y) and rotating by
    ``angle`` degrees about the image centre."""
    a, s = math.radians(angle), math.radians(shear)
    rotation = np.array([[math.cos(a), -math.sin(a)], [math.sin(a), math.cos(a)]])
    linear = rotation @ np.array([[1.0, math.tan(s)], [0.0, 1.0]]) * scale
    centre = np.array([(width - 1) / 2.0, (height - 1) / 2.0])
    return np.hstack([linear, (centre - linear @ centre)[:, None]])


class RandomAffine(T.Augmentation):
    """Random scale in ``scale`` = (low, high), rotation in +-``rotate`` degrees and shear in
    +-``shear`` degrees, about the image centre, output the same size."""

    def __init__(self, scale=(1.0, 1.0), rotate=0.0, shear=0.0):
        super().__init__()
        scale = tuple(float(v) for v in scale)
        if len(scale) != 2 or not 0 < scale[0] <= scale[1]:
            raise ValueError(f"RandomAffine scale must be (low, high) with 0 < low <= high, got {scale}")
        self._init(locals())

    def get_transform(self, image):
        h, w = image.shape[:2]
        matrix = affine_matrix(
            h, w,
            scale=self._rand_range(*self.scale),
            angle=self._rand_range(-self.rotate, self.rotate),
            shear=self._rand_range(-self.shear, self.shear),
        )
        return AffineTransform(matrix, h, w)


def _blurred_noise_std(sigma):
    """Standard deviation of uniform(-1, 1) white noise after ``cv2.GaussianBlur(sigma)``."""
    ksize = 2 * int(math.ceil(4 * sigma)) + 1  # as wide as OpenCV's default kernel, or wider
    k = cv2.getGaussianKernel(ksize, sigma).ravel()
    return math.sqrt(1.0 / 3.0) * float((k ** 2).sum())  # 2-D kernel: (sum k^2)^2, sqrt -> sum k^2


class RandomElastic(T.Augmentation):
    """Elastic deformation in the convention of Simard et al. (2003): the displacement field
    is ``alpha`` x (uniform(-1, 1) noise smoothed by a Gaussian of std ``sigma`` pixels).
    Its RMS is about ``alpha / (sigma * sqrt(12 pi))`` pixels (0.8 px for alpha 30, sigma 6).

    For speed, the noise is drawn on a grid ``step = max(1, sigma // 2)`` times coarser, blurred
    with ``sigma / step`` and upsampled bilinearly; it is rescaled so that its expected RMS
    equals that of the full-resolution field.
    """

    def __init__(self, alpha=30.0, sigma=6.0):
        super().__init__()
        if sigma <= 0 or alpha < 0:
            raise ValueError(f"RandomElastic needs sigma > 0 and alpha >= 0, got {alpha=}, {sigma=}")
        self._init(locals())

    def get_transform(self, image):
        h, w = image.shape[:2]
        step = max(1, int(self.sigma // 2))
        coarse_sigma = self.sigma / step
        gain = self.alpha * _blurred_noise_std(self.sigma) / _blurred_noise_std(coarse_sigma)
        shape = (math.ceil(h / step) + 1, math.ceil(w / step) + 1)
        fields = []
        for _ in range(2):
            noise = np.random.uniform(-1.0, 1.0, shape).astype(np.float32)
            fields.append(cv2.GaussianBlur(noise, (0, 0), coarse_sigma,
                                           borderType=cv2.BORDER_REFLECT_101) * np.float32(gain))
        return ElasticTransform(fields[0], fields[1], h, w)


class RandomColorJitter(T.Augmentation):
    """Like torchvision's ColorJitter: brightness, contrast and saturation factors uniform in
    [max(0, 1 - v), 1 + v], hue rotation uniform in [-hue, hue] (fraction of the circle,
    at most 0.5). Image only (see :class:`ColorJitterTransform`)."""

    def __init__(self, brightness=0.0, contrast=0.0, saturation=0.0, hue=0.0):
        super().__init__()
        if min(brightness, contrast, saturation, hue) < 0 or hue > 0.5:
            raise ValueError("RandomColorJitter values must be >= 0 and hue <= 0.5, got "
                             f"{(brightness, contrast, saturation, hue)}")
        self._init(locals())

    def get_transform(self, image):
        def factor(v):
            return self._rand_range(max(0.0, 1.0 - v), 1.0 + v) if v else 1.0

        return ColorJitterTransform(
            float(factor(self.brightness)), float(factor(self.contrast)),
            float(factor(self.saturation)),
            float(self._rand_range(-self.hue, self.hue)) if self.hue else 0.0,
        )


class RandomCropPad(T.Augmentation):
    """A random ``crop_size`` = (h, w) window; along an axis where the image is smaller than
    the crop, the whole image is placed at a random offset and the rest is padded
    (image 0, mask 255)."""

    def __init__(self, crop_size):
        super().__init__()
        crop_size = tuple(int(v) for v in crop_size)
        if len(crop_size) != 2 or min(crop_size) <= 0:
            raise ValueError(f"RandomCropPad crop_size must be (h, w) > 0, got {crop_size}")
        self._init(locals())

    def get_transform(self, image):
        h, w = image.shape[:2]
        out_h, out_w = self.crop_size
        if (h, w) == (out_h, out_w):
            return NoOpTransform()

        def axis(size, out):  # -> (source start, destination start, length)
            if size >= out:
                return int(np.random.randint(size - out + 1)), 0, out
            return 0, int(np.random.randint(out - size + 1)), size

        (sy, dy, ch), (sx, dx, cw) = axis(h, out_h), axis(w, out_w)
        return CropPadTransform(sy, sx, dy, dx, ch, cw, out_h, out_w)


class FixedResize(T.Augmentation):
    """Resize every image to ``size`` x ``size`` (see :class:`CvResizeTransform`)."""

    def __init__(self, size: int):
        super().__init__()
        self._init(locals())

    def get_transform(self, image):
        h, w = image.shape[:2]
        return CvResizeTransform(h, w, self.size, self.size)


def build_train_augmentations(cfg):
    """The training augmentation list from ``cfg.ROOFTOP.AUG`` and ``cfg.INPUT.CROP``.

    Order: resize (``ROOFTOP.INPUT_SIZE`` > 0), horizontal and vertical flips, 90-degree rotation,
    affine, elastic, random crop/pad to ``INPUT.CROP.SIZE`` (when ``INPUT.CROP.ENABLED``;
    ``TYPE`` must be "absolute"), colour jitter.
    """
    aug = cfg.ROOFTOP.AUG
    augs = []
    if cfg.ROOFTOP.INPUT_SIZE > 0:
        augs.append(FixedResize(int(cfg.ROOFTOP.INPUT_SIZE)))
    if aug.FLIP_PROB > 0:
        augs.append(T.RandomFlip(aug.FLIP_PROB, horizontal=True, vertical=False))
        augs.append(T.RandomFlip(aug.FLIP_PROB, horizontal=False, vertical=True))
    if aug.ROT90:
        augs.append(RandomRot90())
    if aug.AFFINE_PROB > 0:
        augs.append(T.RandomApply(
            RandomAffine(aug.AFFINE_SCALE, aug.AFFINE_ROTATE, aug.AFFINE_SHEAR), aug.AFFINE_PROB))
    if aug.ELASTIC_PROB > 0 and aug.ELASTIC_ALPHA > 0:
        augs.append(T.RandomApply(
            RandomElastic(aug.ELASTIC_ALPHA, aug.ELASTIC_SIGMA), aug.ELASTIC_PROB))
    if cfg.INPUT.CROP.ENABLED:
        if cfg.INPUT.CROP.TYPE != "absolute":
            raise ValueError(f"INPUT.CROP.TYPE must be 'absolute' (pixels), got {cfg.INPUT.CROP.TYPE!r}")
        augs.append(RandomCropPad(cfg.INPUT.CROP.SIZE))
    jitter = tuple(float(v) for v in aug.COLOR_JITTER)
    if len(jitter) != 4:
        raise ValueError(f"ROOFTOP.AUG.COLOR_JITTER must be (brightness, contrast, saturation, hue), got {jitter}")
    if any(jitter):
        augs.append(RandomColorJitter(*jitter))
    return augs


# --- model input ------------------------------------------------------------------------------

def image_tensor(image: np.ndarray, image_format: str = "RGB") -> torch.Tensor:
    """An (H, W, 3) uint8 RGB array as the model's (3, H, W) uint8 tensor, channels in
    ``image_format`` order ("RGB", or "BGR": reversed)."""
    if image_format == "BGR":
        image = image[:, :, ::-1]
    return torch.as_tensor(np.ascontiguousarray(image.transpose(2, 0, 1)))


def inference_image_tensor(image: np.ndarray, image_format: str = "RGB",
                      input_size: int = 0) -> torch.Tensor:
    """Test-time preprocessing of an (H, W, 3) uint8 RGB image (evaluation and prediction):
    resized to ``input_size`` x ``input_size`` when > 0 (``ROOFTOP.INPUT_SIZE``, the same resize
    as training's :class:`FixedResize`), then :func:`image_tensor`."""
    if input_size > 0:
        height, width = image.shape[:2]
        image = CvResizeTransform(height, width, input_size, input_size).apply_image(image)
    return image_tensor(image, image_format)
