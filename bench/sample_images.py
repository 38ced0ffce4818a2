"""Unlabelled photos for calibrating the ``imagenet`` cascade: crops of scikit-image's samples.

No labelled ImageNet data ships offline, so the demo route is calibrated for agreement with
EfficientNet-Lite2 (``tether calibrate imagenet --data DIR --objective agreement``) on
random crops, flips and rotations of scikit-image's colour photographs, written as JPEGs::

    python bench/sample_images.py /tmp/imagenet-unlabelled   # 600 images, seed 0
"""

from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np
from PIL import Image

#: scikit-image's colour photographs (its other samples are microscopy, text or synthetic).
PHOTOS = ("astronaut", "chelsea", "coffee", "rocket", "stereo_motorcycle", "hubble_deep_field")


def variants(pixels: np.ndarray, count: int, rng: np.random.Generator) -> list[Image.Image]:
    """``count`` random crops (25-100 % of the shorter side), flips and small rotations."""
    image = Image.fromarray(pixels).convert("RGB")
    out = []
    for _ in range(count):
        side = int(min(image.size) * rng.uniform(0.25, 1.0))
        left = int(rng.integers(0, image.width - side + 1))
        top = int(rng.integers(0, image.height - side + 1))
        crop = image.crop((left, top, left + side, top + side))
        if rng.random() < 0.5:
            crop = crop.transpose(Image.Transpose.FLIP_LEFT_RIGHT)
        out.append(crop.rotate(float(rng.uniform(-15, 15)), resample=Image.Resampling.BILINEAR))
    return out


def write(folder: Path, per_photo: int = 100, seed: int = 0) -> int:
    import skimage.data

    rng = np.random.default_rng(seed)
    folder.mkdir(parents=True, exist_ok=True)
    written = 0
    for name in PHOTOS:
        pixels = getattr(skimage.data, name)()
        if isinstance(pixels, tuple):  # stereo_motorcycle: (left, right, disparity)
            pixels = pixels[0]
        for i, image in enumerate(variants(pixels, per_photo, rng)):
            image.save(folder / f"{name}-{i:03d}.jpg", quality=90)
            written += 1
    return written


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("folder", type=Path)
    parser.add_argument("--per-photo", type=int, default=100)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    print(f"wrote {write(args.folder, args.per_photo, args.seed)} images to {args.folder}")


if __name__ == "__main__":
    main()
