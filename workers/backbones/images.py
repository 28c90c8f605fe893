"""Image inputs: decoding with bomb refusal (an explicit list of formats), resizing, raw pixel tensors."""

from __future__ import annotations

import io
import warnings

import numpy as np

from featurebank.workers.backbones.base import InputItem, InvalidInputError

# The only formats decoded, first frame only. Pillow knows ~40 formats, and some plugins decode
# inside Image.open (ICO decodes its embedded PNG there), before any pixel limit is checked: an
# explicit list means no other plugin ever sees a request's bytes.
ACCEPTED_IMAGE_FORMATS: tuple[str, ...] = ("JPEG", "PNG", "WEBP", "GIF", "BMP")
_ACCEPTED_NAMES = "JPEG, PNG, WebP, GIF, BMP"


def _register_accepted_plugins() -> None:
    """Import exactly the accepted formats' plugins, so Image.open never loads (or tries) the others."""
    from PIL import BmpImagePlugin, GifImagePlugin, JpegImagePlugin, PngImagePlugin, WebPImagePlugin  # noqa: F401


def _sniff_format(data: bytes) -> str | None:
    """The format Pillow would take these bytes for, from the plugins' header checks alone (nothing decoded)."""
    from PIL import Image

    Image.init()  # every plugin, once per process, and only to name a refused format
    prefix = data[:16]
    for fmt in Image.ID:
        _, accept = Image.OPEN[fmt]
        try:
            if accept is not None and accept(prefix):
                return fmt
        except Exception:  # a plugin's check choking on a short prefix is "not this format"
            continue
    return None


def decode_image(data: bytes, max_pixels: int) -> np.ndarray:
    """Decode JPEG/PNG/WebP/GIF/BMP bytes (first frame) to an RGB uint8 (H, W, 3) array, refusing bombs.

    Any other format is refused from its header. Pillow's own decompression-bomb check runs at
    ``max_pixels`` (its warning made an error, so the limit is exact rather than twice it), on the
    header, before any pixel is decoded. Grayscale, palette, 16-bit and RGBA inputs become RGB
    (alpha is dropped, not composited).
    """
    from PIL import Image, UnidentifiedImageError

    if not data:
        raise InvalidInputError("empty image: no bytes")
    _register_accepted_plugins()
    Image.MAX_IMAGE_PIXELS = max_pixels  # the worker's one limit; Pillow checks it in open()
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            with Image.open(io.BytesIO(data), formats=ACCEPTED_IMAGE_FORMATS) as img:
                w, h = img.size
                if w * h > max_pixels:  # Pillow checked already; this one names the sizes
                    raise InvalidInputError(
                        f"image is {w}x{h} = {w * h} pixels, over the limit of {max_pixels} (max_image_pixels)"
                    )
                img.draft("RGB", (w, h))
                rgb = img.convert("RGB")  # the current frame only: animations are never seeked
                return np.asarray(rgb, dtype=np.uint8)
    except InvalidInputError:
        raise
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as e:
        raise InvalidInputError(f"image is over the limit of {max_pixels} pixels (max_image_pixels): {e}") from None
    except UnidentifiedImageError:
        fmt = _sniff_format(data)
        if fmt is not None and fmt not in ACCEPTED_IMAGE_FORMATS:
            raise InvalidInputError(
                f"image format {fmt} is not accepted ({len(data)} bytes); send {_ACCEPTED_NAMES}"
            ) from None
        raise InvalidInputError(
            f"cannot decode image ({len(data)} bytes): not a recognised image format ({_ACCEPTED_NAMES})"
        ) from None
    except Exception as e:  # Pillow's plugins raise many types on hostile files: all mean "not decodable"
        raise InvalidInputError(f"cannot decode image ({len(data)} bytes): {e}") from None


def resize_image(pixels: np.ndarray, size: tuple[int, int]) -> np.ndarray:
    """Resize RGB uint8 pixels to (H, W) with Pillow's bilinear filter (antialiased when shrinking).

    Images already at the target size are returned untouched, so a 224x224 input reaches the
    model bit-exact.
    """
    from PIL import Image

    h, w = size
    if pixels.shape[0] == h and pixels.shape[1] == w:
        return pixels
    return np.asarray(Image.fromarray(pixels).resize((w, h), Image.BILINEAR), dtype=np.uint8)


def pixels_from_tensor(a: np.ndarray) -> np.ndarray:
    """Accept a raw pixel tensor (H, W), (H, W, 1|3|4), uint8 or float in [0, 255], as RGB uint8."""
    if a.ndim == 2:
        a = a[:, :, None]
    if a.ndim != 3 or a.shape[2] not in (1, 3, 4):
        raise InvalidInputError(f"an image tensor must be (H, W) or (H, W, 1|3|4) pixels, got shape {a.shape}")
    if a.shape[0] < 1 or a.shape[1] < 1:
        raise InvalidInputError(f"an image tensor must not be empty, got shape {a.shape}")
    if a.dtype != np.uint8:
        if not np.all(np.isfinite(a)):
            raise InvalidInputError("image tensor contains NaN or Inf")
        if a.min() < 0 or a.max() > 255:
            raise InvalidInputError("image tensor pixel values must be in [0, 255] (raw pixels, not normalised)")
        a = np.round(a).astype(np.uint8)
    if a.shape[2] == 1:
        a = np.repeat(a, 3, axis=2)
    elif a.shape[2] == 4:
        a = a[:, :, :3]
    return np.ascontiguousarray(a)


def image_input(item: InputItem, backbone: str, max_pixels: int, size: tuple[int, int]) -> np.ndarray:
    """An encoded image or a raw pixel tensor as RGB uint8 pixels at ``size``."""
    if item.kind == "image":
        pixels = decode_image(item.payload, max_pixels)
    elif item.kind == "tensor":
        pixels = pixels_from_tensor(item.payload)
    else:
        raise InvalidInputError(f"backbone {backbone!r} takes images (or pixel tensors), not {item.kind}")
    return resize_image(pixels, size)
