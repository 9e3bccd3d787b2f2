"""Official ERNIE-ViL 2.0 test-mode image preprocessing (`decode_image_base64(..., mode='test')`).

Decode with OpenCV (EXIF orientation applied, grayscale -> 3 channels, alpha dropped) -> RGB -> scale the
short side to S with the official "+1" rule -> cv2 INTER_LINEAR -> ceil center crop -> mean/std recipe.
"""

from __future__ import annotations

import io
import math
import warnings
from pathlib import Path

import cv2
import numpy as np
import torch
from PIL import Image, ImageOps

from ernievil2_train.imaging import to_rgb

MEAN = (0.485, 0.456, 0.406)  # the official normalisation, also used by the training views
STD = (0.229, 0.224, 0.225)
DEFAULT_MAX_PIXELS = 89_478_485  # PIL's Image.MAX_IMAGE_PIXELS

ImageInput = bytes | bytearray | memoryview | Image.Image | str | Path


class ImageDecodeError(ValueError):
    """The input is not a decodable image (corrupt, unknown format, or larger than the pixel limit)."""


class ImageTooLarge(ImageDecodeError):
    """The image has, or scaled for the crop would have, more pixels than the limit."""


def quiet_opencv() -> None:
    """Keep OpenCV's own warning and error lines for a corrupt image (`[ERROR:0@...] global grfmt_tiff.cpp`)
    off stderr, for tools that report such images themselves."""
    cv2.utils.logging.setLogLevel(cv2.utils.logging.LOG_LEVEL_SILENT)


def _check_header(data: bytes, max_pixels: int) -> None:
    """Read only the header and refuse images with more than `max_pixels` pixels before decoding them."""
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)  # the check below tells it
            with Image.open(io.BytesIO(data)) as header:
                width, height = header.size
    except Image.DecompressionBombError as err:
        raise ImageTooLarge(f"image is too large to decode: {err}") from None
    except Image.UnidentifiedImageError:
        raise ImageDecodeError(f"not a recognised image ({len(data)} bytes)") from None
    except Exception as err:
        raise ImageDecodeError(f"not a recognised image ({len(data)} bytes): {err}") from None
    if width * height > max_pixels:
        raise ImageTooLarge(f"image of {width}x{height} pixels exceeds the limit of {max_pixels} pixels")


def decode_bytes(data: bytes | bytearray | memoryview, max_pixels: int = DEFAULT_MAX_PIXELS) -> np.ndarray:
    """Encoded image -> HWC uint8 RGB exactly as the official `cv2.imdecode(IMREAD_COLOR)` + BGR2RGB."""
    data = bytes(data)
    if not data:
        raise ImageDecodeError("no image data (0 bytes)")
    _check_header(data, max_pixels)
    bgr = cv2.imdecode(np.frombuffer(data, np.uint8), cv2.IMREAD_COLOR)
    if bgr is None:
        raise ImageDecodeError(f"OpenCV could not decode the image ({len(data)} bytes)")
    return cv2.cvtColor(bgr, cv2.COLOR_BGR2RGB)


def pil_to_rgb(image: Image.Image) -> np.ndarray:
    """PIL image -> HWC uint8 RGB with the decoder's conventions: EXIF orientation applied, alpha dropped."""
    try:
        return np.asarray(to_rgb(ImageOps.exif_transpose(image)))
    except OSError as err:
        raise ImageDecodeError(f"PIL could not decode the image: {err}") from None


def load_rgb(image: ImageInput, max_pixels: int = DEFAULT_MAX_PIXELS) -> np.ndarray:
    """Bytes, a PIL image or a file path -> HWC uint8 RGB."""
    if isinstance(image, Image.Image):
        if image.width * image.height > max_pixels:
            raise ImageTooLarge(f"image of {image.width}x{image.height} pixels exceeds {max_pixels} pixels")
        return pil_to_rgb(image)
    if isinstance(image, (str, Path)):
        image = Path(image).read_bytes()
    return decode_bytes(image, max_pixels)


def scaled_size(width: int, height: int, short: int) -> tuple[int, int]:
    """Official `group_scale`: short side to `short`, long side `int(...) + 1`; kept if already `short`."""
    if (width <= height and width == short) or (height <= width and height == short):
        return width, height
    if width < height:
        return short, int(short / width * height) + 1
    return int(short / height * width) + 1, short


def crop_offsets(width: int, height: int, size: int) -> tuple[int, int]:
    """Official `group_center_crop` top-left corner: odd slack moves the crop right / down (ceil)."""
    return math.ceil((width - size) / 2), math.ceil((height - size) / 2)


def _normalize_table() -> np.ndarray:
    """[3, 256] float32 output for every (channel, uint8 value), by the official float32 / float64 recipe."""
    x = np.arange(256, dtype=np.uint8).astype(np.float32) / np.float32(255)
    mean, std = np.array(MEAN, dtype=np.float64), np.array(STD, dtype=np.float64)
    x = (x[None, :].astype(np.float64) - mean[:, None]).astype(np.float32)
    return (x.astype(np.float64) / std[:, None]).astype(np.float32)


_TABLE = _normalize_table()


def normalize(rgb: np.ndarray) -> torch.Tensor:
    """HWC uint8 RGB -> CHW float32, bit-identical to the official `(u8 / 255 - mean) / std` rounding."""
    chw = rgb.transpose(2, 0, 1)
    out = np.empty(chw.shape, dtype=np.float32)
    for channel in range(3):
        np.take(_TABLE[channel], chw[channel], out=out[channel])
    return torch.from_numpy(out)


def normalize_crops(crops: torch.Tensor) -> torch.Tensor:
    """uint8 [..., 3, H, W] -> float32 on the tensor's device, the same numbers as `normalize` (a lookup in
    its table, so the floats are bit-identical wherever it runs)."""
    table = torch.from_numpy(_TABLE).to(crops.device, non_blocking=True)
    out = torch.empty(crops.shape, dtype=torch.float32, device=crops.device)
    for channel in range(3):  # one channel's indices at a time: 8 bytes a pixel of it, not 8 of every one
        out[..., channel, :, :] = table[channel][crops[..., channel, :, :].long()]
    return out


class EvalTransform:
    """Image bytes / PIL image / path -> float32 Tensor[3, S, S] (official test-mode preprocessing).

    The short side is scaled to `short_size` (default: S, as the official eval does), then an S x S center
    crop is taken. `keep_aspect=False` is the official `data_augument=False` variant: a plain resize to S x S.
    """

    def __init__(
        self,
        image_size: int = 224,
        keep_aspect: bool = True,
        max_pixels: int = DEFAULT_MAX_PIXELS,
        short_size: int | None = None,
    ) -> None:
        if image_size < 1 or max_pixels < 1:
            raise ValueError(f"image_size and max_pixels must be positive, got {image_size} and {max_pixels}")
        self.image_size = image_size
        self.keep_aspect = keep_aspect
        self.max_pixels = max_pixels
        self.short_size = image_size if short_size is None else short_size
        if self.short_size < image_size:
            raise ValueError(f"short_size {self.short_size} is smaller than the crop size {image_size}")
        if self.short_size**2 > self.max_pixels:
            raise ValueError(f"short_size {self.short_size} scales every image to more than the limit of "
                             f"{self.max_pixels} pixels (at most {math.isqrt(self.max_pixels)})")

    def resize_crop(self, rgb: np.ndarray) -> np.ndarray:
        size = self.image_size
        height, width = rgb.shape[:2]
        if not self.keep_aspect:
            return cv2.resize(rgb, (size, size), interpolation=cv2.INTER_LINEAR)
        new_w, new_h = scaled_size(width, height, self.short_size)
        if new_w * new_h > self.max_pixels:  # a thin strip: its short side scaled up makes a giant
            raise ImageTooLarge(
                f"image of {width}x{height} pixels would be scaled to {new_w}x{new_h}, over the limit of "
                f"{self.max_pixels} pixels"
            )
        if (new_w, new_h) != (width, height):
            rgb = cv2.resize(rgb, (new_w, new_h), interpolation=cv2.INTER_LINEAR)
        x1, y1 = crop_offsets(new_w, new_h, size)
        return rgb[y1 : y1 + size, x1 : x1 + size]

    def __call__(self, image: ImageInput) -> torch.Tensor:
        return normalize(self.resize_crop(load_rgb(image, self.max_pixels)))

    def crop(self, image: ImageInput) -> torch.Tensor:
        """The image before normalisation: uint8 [3, S, S] (`normalize_crops` finishes it)."""
        return torch.from_numpy(np.ascontiguousarray(self.resize_crop(load_rgb(image, self.max_pixels))
                                                     .transpose(2, 0, 1)))

    def __repr__(self) -> str:
        return (
            f"EvalTransform(image_size={self.image_size}, short_size={self.short_size}, "
            f"keep_aspect={self.keep_aspect}, max_pixels={self.max_pixels})"
        )


def eval_transform(
    image_size: int = 224,
    keep_aspect: bool = True,
    max_pixels: int = DEFAULT_MAX_PIXELS,
    short_size: int | None = None,
) -> EvalTransform:
    """The official test-mode transform; see `EvalTransform`."""
    return EvalTransform(image_size, keep_aspect, max_pixels, short_size)
