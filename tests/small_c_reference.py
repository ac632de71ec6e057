"""CIFAR-10-C (``make_cifar_c.py``) and Tiny-ImageNet-C (``make_tinyimagenet_c.py``) in numpy,
for testing the toolkit's batched torch corruptions at 32 and 64 px.

Those two scripts are ImageNet-C's corruptions with their own severity tables and a fog
fractal of the image's own size. Each function here composes the ``imagecorruptions``
package's helpers (the reference's ``disk`` and ``plasma_fractal``) with
skimage, OpenCV and Pillow as the scripts do, on one uint8 HxWx3 image, and takes the
severity's table entry ``c``.
"""

from __future__ import annotations

import io
from typing import Any

import numpy as np


def reference_functions(ref: Any) -> dict[str, Any]:
    import cv2
    import skimage.color
    from PIL import Image

    def defocus_blur(x: np.ndarray, c: Any, size: int) -> np.ndarray:
        kernel = ref.disk(radius=c[0], alias_blur=c[1])
        x = x / 255.0
        channels = np.stack([cv2.filter2D(x[:, :, d], -1, kernel) for d in range(3)], axis=2)
        return np.clip(channels, 0, 1) * 255

    def clipped_zoom(img: np.ndarray, zoom_factor: float) -> np.ndarray:
        # the scripts' square version: zoom the centre crop, then trim back to the centre
        from scipy.ndimage import zoom

        h = img.shape[0]
        ch = int(np.ceil(h / zoom_factor))
        top = (h - ch) // 2
        img = zoom(img[top:top + ch, top:top + ch], (zoom_factor, zoom_factor, 1), order=1)
        trim = (img.shape[0] - h) // 2
        return img[trim:trim + h, trim:trim + h]

    def zoom_blur(x: np.ndarray, c: Any, size: int) -> np.ndarray:
        x = (x / 255.0).astype(np.float32)
        factors = np.arange(*c)
        out = np.zeros_like(x)
        for factor in factors:
            out += clipped_zoom(x, factor)
        return np.clip((x + out) / (len(factors) + 1), 0, 1) * 255

    def fog(x: np.ndarray, c: Any, size: int) -> np.ndarray:
        x = x / 255.0
        max_val = x.max()
        x = x + c[0] * ref.plasma_fractal(mapsize=size, wibbledecay=c[1])[:size, :size][..., np.newaxis]
        return np.clip(x * max_val / (max_val + c[0]), 0, 1) * 255

    def contrast(x: np.ndarray, c: Any, size: int) -> np.ndarray:
        x = x / 255.0
        means = np.mean(x, axis=(0, 1), keepdims=True)
        return np.clip((x - means) * c + means, 0, 1) * 255

    def brightness(x: np.ndarray, c: Any, size: int) -> np.ndarray:
        hsv = skimage.color.rgb2hsv(x / 255.0)
        hsv[:, :, 2] = np.clip(hsv[:, :, 2] + c, 0, 1)
        return np.clip(skimage.color.hsv2rgb(hsv), 0, 1) * 255

    def pixelate(x: np.ndarray, c: Any, size: int) -> np.ndarray:
        image = Image.fromarray(x).resize((int(size * c), int(size * c)), Image.BOX)
        return np.asarray(image.resize((size, size), Image.BOX), dtype=np.float64)

    def jpeg_compression(x: np.ndarray, c: Any, size: int) -> np.ndarray:
        buffer = io.BytesIO()
        Image.fromarray(x).save(buffer, "JPEG", quality=c)
        return np.asarray(Image.open(buffer), dtype=np.float64)

    return {"defocus_blur": defocus_blur, "zoom_blur": zoom_blur, "fog": fog, "contrast": contrast,
            "brightness": brightness, "pixelate": pixelate, "jpeg_compression": jpeg_compression}
