"""Training views (random resized crop, flip, colour jitter, grayscale, blur) and an eval-style center view.

Both take a *lazy* PIL image (opened, not yet decoded) and decode it once. For JPEGs the decode uses
`Image.draft`, the DCT-domain downscale by 1/2, 1/4 or 1/8, chosen as the largest factor that still leaves
every requested crop at least `image_size` pixels on its short side, so no view is ever upsampled because of
the draft. After the decode everything runs on one HWC uint8 array with OpenCV:

* crop + resize: `cv2.INTER_LINEAR` when the remaining downscale is below 2x (the official eval resize is
  cv2 INTER_LINEAR too), `cv2.INTER_AREA` beyond, so large non-JPEG sources are not aliased;
* colour jitter (brightness, contrast, saturation, hue, in random order) and random grayscale are all
  affine maps of RGB, so they are composed into one 3x4 matrix and applied in a single `cv2.transform`
  (saturating to uint8 once, at the end, instead of after each op). Hue is a rotation of the chroma
  plane in YIQ space, the linear approximation of an HSV hue shift;
* Gaussian blur with a random sigma, then normalisation to float32 [3,S,S] in one pass.

Defaults are *caption-safe*: the caption must stay true for the augmented image. Horizontal flip is off
(`flip_p=0`: "左边的狗" becomes wrong when mirrored), and hue shift and grayscale are off (they break
colour words like "红色的车"). Crops keep at least half of the image (`scale=(0.5, 1.0)`): captions describe
the whole picture, so aggressive crops cut away what the caption names. All of these are parameters.
"""

from __future__ import annotations

import math
import random
from collections.abc import Sequence

import cv2
import numpy as np
import torch
from PIL import Image

from ernievil2_train.imaging import to_rgb
from ernievil2_train.vision.transforms import MEAN, STD

_LUMA = np.array([0.299, 0.587, 0.114])
_RGB_TO_YIQ = np.array([[0.299, 0.587, 0.114], [0.596, -0.274, -0.322], [0.211, -0.523, 0.312]])
_YIQ_TO_RGB = np.linalg.inv(_RGB_TO_YIQ)
_SWAPS_AXES = {5, 6, 7, 8}
_ORIENT_OPS = {
    2: Image.Transpose.FLIP_LEFT_RIGHT,
    3: Image.Transpose.ROTATE_180,
    4: Image.Transpose.FLIP_TOP_BOTTOM,
    5: Image.Transpose.TRANSPOSE,
    6: Image.Transpose.ROTATE_270,
    7: Image.Transpose.TRANSVERSE,
    8: Image.Transpose.ROTATE_90,
}

Box = tuple[float, float, float, float]


def _orientation(image: Image.Image) -> int:
    return image.getexif().get(0x0112, 1) if image.format in ("JPEG", "MPO", "WEBP", "PNG", "TIFF") else 1


def oriented_size(image: Image.Image) -> tuple[int, int]:
    """(width, height) after the EXIF orientation is applied, read from the header only."""
    w, h = image.size
    return (h, w) if _orientation(image) in _SWAPS_AXES else (w, h)


def draft_factor(short_side: float, out_size: int) -> int:
    """Largest JPEG draft reduction (1, 2, 4 or 8) keeping `short_side / factor >= out_size`."""
    factor = 1
    while factor < 8 and short_side >= 2 * factor * out_size:
        factor *= 2
    return factor


def decode_rgb(image: Image.Image, factor: int = 1) -> np.ndarray:
    """Decode a lazy PIL image once, reduced by `factor` where the format allows it; EXIF-oriented RGB HWC."""
    orientation = _orientation(image)
    if factor > 1 and image.format in ("JPEG", "MPO"):
        w, h = image.size
        image.draft("RGB", (w // factor, h // factor))
    image.load()
    image = to_rgb(image)
    if orientation in _ORIENT_OPS:
        image = image.transpose(_ORIENT_OPS[orientation])
    return np.asarray(image)


def _resize(crop: np.ndarray, size: int) -> np.ndarray:
    h, w = crop.shape[:2]
    interp = cv2.INTER_LINEAR if max(h, w) < 2 * size else cv2.INTER_AREA
    return cv2.resize(crop, (size, size), interpolation=interp)


def _crop(array: np.ndarray, box: Box) -> np.ndarray:
    h, w = array.shape[:2]
    left, top = min(int(box[0]), w - 1), min(int(box[1]), h - 1)
    right, bottom = max(left + 1, min(w, round(box[2]))), max(top + 1, min(h, round(box[3])))
    return array[top:bottom, left:right]


class Normalize:
    """uint8 HWC RGB -> float32 CHW, `(x / 255 - mean) / std` fused into one scale and shift.

    With `enabled=False` it stops at uint8 CHW: the batch then crosses process boundaries 4x smaller and
    `normalize_uint8` finishes the job on the device (the DataModule does this after the transfer).
    """

    def __init__(
        self, mean: Sequence[float] = MEAN, std: Sequence[float] = STD, enabled: bool = True
    ) -> None:
        self.mean, self.std, self.enabled = tuple(mean), tuple(std), enabled

    def __call__(self, array: np.ndarray) -> torch.Tensor:
        chw = torch.from_numpy(np.ascontiguousarray(array.transpose(2, 0, 1)))
        return normalize_uint8(chw, self.mean, self.std) if self.enabled else chw


def normalize_uint8(
    images: torch.Tensor, mean: Sequence[float] = MEAN, std: Sequence[float] = STD
) -> torch.Tensor:
    """uint8 [..., 3, H, W] -> float32 `(x / 255 - mean) / std`, on the tensor's device. Each channel's
    scale and shift go to the device as kernel arguments (float32 numbers), not as tensors: a tensor made
    from host values is a blocking copy, which would make the training step wait for the device."""
    out = images.float()
    for channel, (m, s) in enumerate(zip(mean, std, strict=True)):
        scale = np.float32(1.0) / (np.float32(255.0) * np.float32(s))
        out[..., channel, :, :].mul_(float(scale)).sub_(float(np.float32(m) / np.float32(s)))
    return out


class CenterView:
    """Eval-style view: short side to `image_size`, center crop, normalise (one decode, draft-reduced)."""

    def __init__(
        self,
        image_size: int = 224,
        mean: Sequence[float] = MEAN,
        std: Sequence[float] = STD,
        normalize: bool = True,
    ) -> None:
        self.image_size = image_size
        self.normalize = Normalize(mean, std, enabled=normalize)

    def __call__(self, image: Image.Image) -> torch.Tensor:
        w, h = oriented_size(image)
        side = min(w, h)
        array = decode_rgb(image, draft_factor(side, self.image_size))
        sx, sy = array.shape[1] / w, array.shape[0] / h
        left, top = (w - side) / 2, (h - side) / 2
        box = (left * sx, top * sy, (left + side) * sx, (top + side) * sy)
        return self.normalize(_resize(_crop(array, box), self.image_size))


class TrainViews:
    """`num_views` independently augmented views of one image, decoded once: PIL image -> float32 [3,S,S]s
    (uint8 [3,S,S]s with `normalize=False`)."""

    def __init__(
        self,
        image_size: int = 224,
        num_views: int = 2,
        scale: Sequence[float] = (0.5, 1.0),
        ratio: Sequence[float] = (3 / 4, 4 / 3),
        flip_p: float = 0.0,
        jitter_p: float = 0.8,
        brightness: float = 0.4,
        contrast: float = 0.4,
        saturation: float = 0.2,
        hue: float = 0.0,
        grayscale_p: float = 0.0,
        blur_p: float = 0.5,
        blur_sigma: Sequence[float] = (0.1, 2.0),
        mean: Sequence[float] = MEAN,
        std: Sequence[float] = STD,
        normalize: bool = True,
    ) -> None:
        if num_views < 1:
            raise ValueError(f"num_views must be at least 1, got {num_views}")
        if not 0 < scale[0] <= scale[1] <= 1:
            raise ValueError(f"scale must satisfy 0 < min <= max <= 1, got {tuple(scale)}")
        if not 0 <= hue <= 0.5:
            raise ValueError(f"hue must be in [0, 0.5], got {hue}")
        if not 0 < ratio[0] <= ratio[1]:
            raise ValueError(f"ratio must satisfy 0 < min <= max, got {tuple(ratio)}")
        for name, p in (("flip_p", flip_p), ("jitter_p", jitter_p), ("grayscale_p", grayscale_p),
                        ("blur_p", blur_p)):
            if not 0 <= p <= 1:
                raise ValueError(f"{name} must be a probability in [0, 1], got {p}")
        strengths = {"brightness": brightness, "contrast": contrast, "saturation": saturation}
        for name, strength in strengths.items():
            if strength < 0:
                raise ValueError(f"{name} must be 0 or more, got {strength}")
        if not 0 < blur_sigma[0] <= blur_sigma[1]:
            raise ValueError(f"blur_sigma must satisfy 0 < min <= max, got {tuple(blur_sigma)}")
        self.image_size = image_size
        self.num_views = num_views
        self.scale = (float(scale[0]), float(scale[1]))
        self.log_ratio = (math.log(ratio[0]), math.log(ratio[1]))
        self.flip_p = flip_p
        self.jitter_p = jitter_p
        self.jitter = {"brightness": brightness, "contrast": contrast, "saturation": saturation, "hue": hue}
        self.grayscale_p = grayscale_p
        self.blur_p = blur_p
        self.blur_sigma = (float(blur_sigma[0]), float(blur_sigma[1]))
        self.normalize = Normalize(mean, std, enabled=normalize)

    def __call__(self, image: Image.Image) -> tuple[torch.Tensor, ...]:
        w, h = oriented_size(image)
        boxes = [self.sample_box(w, h) for _ in range(self.num_views)]
        short = min(min(b[2] - b[0], b[3] - b[1]) for b in boxes)
        array = decode_rgb(image, draft_factor(short, self.image_size))
        sx, sy = array.shape[1] / w, array.shape[0] / h
        return tuple(self.view(array, (b[0] * sx, b[1] * sy, b[2] * sx, b[3] * sy)) for b in boxes)

    def sample_box(self, width: int, height: int) -> Box:
        """A random crop (left, top, right, bottom) with area fraction in `scale`, aspect ratio in `ratio`."""
        area = width * height
        for _ in range(10):
            target = area * random.uniform(*self.scale)
            aspect = math.exp(random.uniform(*self.log_ratio))
            cw, ch = round(math.sqrt(target * aspect)), round(math.sqrt(target / aspect))
            if 0 < cw <= width and 0 < ch <= height:
                left, top = random.randint(0, width - cw), random.randint(0, height - ch)
                return (left, top, left + cw, top + ch)
        low, high = math.exp(self.log_ratio[0]), math.exp(self.log_ratio[1])
        aspect = min(max(width / height, low), high)
        if width / height < aspect:
            cw, ch = width, round(width / aspect)
        else:
            cw, ch = round(height * aspect), height
        cw, ch = min(cw, width), min(ch, height)
        left, top = (width - cw) // 2, (height - ch) // 2
        return (left, top, left + cw, top + ch)

    def view(self, array: np.ndarray, box: Box) -> torch.Tensor:
        """One augmented view of the decoded `array` cropped to `box` (in `array` pixels)."""
        out = _resize(_crop(array, box), self.image_size)
        if self.flip_p > 0 and random.random() < self.flip_p:
            out = cv2.flip(out, 1)
        matrix = self.colour_matrix(out)
        if matrix is not None:
            out = cv2.transform(out, matrix)
        if self.blur_p > 0 and random.random() < self.blur_p:
            out = cv2.GaussianBlur(out, (0, 0), random.uniform(*self.blur_sigma))
        return self.normalize(out)

    def colour_matrix(self, view: np.ndarray) -> np.ndarray | None:
        """The random colour jitter + grayscale as one 3x4 affine map on 0..255 RGB, or None for identity."""
        linear, offset = np.eye(3), np.zeros(3)
        touched = False
        if self.jitter_p > 0 and random.random() < self.jitter_p:
            ops = [name for name, strength in self.jitter.items() if strength > 0]
            random.shuffle(ops)
            for name in ops:
                strength = self.jitter[name]
                if name == "hue":
                    step = _hue_matrix(random.uniform(-strength, strength))
                    linear, offset = step @ linear, step @ offset
                    continue
                factor = random.uniform(max(0.0, 1 - strength), 1 + strength)
                if name == "brightness":
                    linear, offset = factor * linear, factor * offset
                elif name == "contrast":
                    mean_rgb = np.array(cv2.mean(view)[:3])
                    grey_mean = _LUMA @ (linear @ mean_rgb + offset)
                    linear, offset = factor * linear, factor * offset + (1 - factor) * grey_mean
                else:
                    step = factor * np.eye(3) + (1 - factor) * np.outer(np.ones(3), _LUMA)
                    linear, offset = step @ linear, step @ offset
            touched = bool(ops)
        if self.grayscale_p > 0 and random.random() < self.grayscale_p:
            step = np.outer(np.ones(3), _LUMA)
            linear, offset = step @ linear, step @ offset
            touched = True
        if not touched:
            return None
        return np.concatenate([linear, offset[:, None]], axis=1).astype(np.float32)


def _hue_matrix(turns: float) -> np.ndarray:
    """RGB -> RGB rotation of the YIQ chroma plane by `turns` of a full circle."""
    c, s = math.cos(2 * math.pi * turns), math.sin(2 * math.pi * turns)
    rotation = np.array([[1.0, 0.0, 0.0], [0.0, c, -s], [0.0, s, c]])
    return _YIQ_TO_RGB @ rotation @ _RGB_TO_YIQ
