"""Image classification: Fashion-MNIST, scikit-learn's 8x8 digits and the user's image folders.

Every source ends as one ``[N, C, H, W]`` array of raw pixel values plus integer labels;
`image_bundle` splits it and normalises with the per-channel mean/std of the train split. The
statistics are in raw pixel units (0-255 for image files), stored in ``preprocessing`` with the
colour mode and size, so inference converts, resizes and normalises a new image the same way.
Fashion-MNIST's IDX files are a 16-byte header and raw bytes, read with numpy rather than a
dataset library so loading stays well under a second.
"""

from __future__ import annotations

import gzip
import os
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import numpy as np
from PIL import Image

from fullchain.config import DataConfig
from fullchain.data.bundle import DataBundle
from fullchain.data.samples import normalised_pairs
from fullchain.data.splits import Split, array_keys, plan_official_splits, plan_splits
from fullchain.data.tokenizer import TextEncoder
from fullchain.errors import MissingDatasetError, UserError
from fullchain.tasks.classification import PIXELS, ImageClassification

FASHION_MNIST_DIR = Path("/usr/share/datasets/fashion-mnist")
FASHION_MNIST_ENV = "FULLCHAIN_FASHION_MNIST_DIR"
FASHION_MNIST_INSTALL = "sudo apt-get install dataset-fashion-mnist"
FASHION_MNIST_LABELS = [
    "T-shirt/top", "Trouser", "Pullover", "Dress", "Coat", "Sandal", "Shirt", "Sneaker", "Bag", "Ankle boot",
]  # fmt: skip
IMAGE_SUFFIXES = {".png", ".jpg", ".jpeg", ".bmp", ".gif", ".webp", ".tif", ".tiff"}
GREY_MODES = {"1", "L", "LA", "I", "I;16", "F"}


def image_bundle(
    images: np.ndarray,
    labels: np.ndarray,
    label_names: list[str],
    split: Split,
    color_mode: str | None = None,
) -> DataBundle:
    """Normalised train/val/test image splits of ``images`` ``[N, C, H, W]``."""
    (train, val, test), stats = normalised_pairs(images, labels, split, PIXELS)
    _, channels, height, width = images.shape
    shape = {"channels": channels, "height": height, "width": width}
    return DataBundle(
        train=train,
        val=val,
        test=test,
        kind="image",
        label_names=label_names,
        task=ImageClassification(label_names, channels, height, width),
        input_spec={**shape, "num_classes": len(label_names)},
        preprocessing={"kind": "image", **shape, **stats, "color_mode": color_mode},
    )


def read_idx(path: Path) -> np.ndarray:
    """An IDX file of unsigned bytes (gzip-compressed) as an array of its declared shape."""
    try:
        raw = gzip.decompress(path.read_bytes())
        if raw[:3] != b"\x00\x00\x08":
            raise ValueError("not an IDX file of unsigned bytes")
        dims = np.frombuffer(raw, dtype=">u4", count=raw[3], offset=4)
        return np.frombuffer(raw, dtype=np.uint8, offset=4 + 4 * raw[3]).reshape(dims)
    except (OSError, EOFError, ValueError) as exc:
        raise UserError(f"{path}: unreadable ({exc}); reinstall with: {FASHION_MNIST_INSTALL}") from None


def fashion_mnist(cfg: DataConfig, seed: int, encoding: TextEncoder | None) -> DataBundle:
    """60k training and the official 10k test images; val is carved from training."""
    root = Path(os.environ.get(FASHION_MNIST_ENV) or FASHION_MNIST_DIR)
    names = ["train-images-idx3", "train-labels-idx1", "t10k-images-idx3", "t10k-labels-idx1"]
    paths = [root / f"{name}-ubyte.gz" for name in names]
    missing = [p for p in paths if not p.is_file()]
    if missing:
        raise MissingDatasetError(
            f"fashion_mnist: {missing[0]} not found; install it with: {FASHION_MNIST_INSTALL}"
        )
    train_x, train_y, test_x, test_y = (read_idx(p) for p in paths)
    images = np.concatenate([train_x, test_x])[:, None]
    labels = np.concatenate([train_y, test_y]).astype(np.int64)
    official_test = np.arange(len(labels)) >= len(train_y)
    split = plan_official_splits(array_keys(images), labels, official_test, cfg, seed)
    return image_bundle(images, labels, FASHION_MNIST_LABELS, split, color_mode="L")


def digits(cfg: DataConfig, seed: int, encoding: TextEncoder | None) -> DataBundle:
    """scikit-learn's 1,797 8x8 digit images (pixel values 0-16, shipped with the library)."""
    from sklearn.datasets import load_digits  # imported when used: scikit-learn takes most of a second

    data = load_digits()
    images = data.images[:, None].astype(np.float32)
    labels = data.target.astype(np.int64)
    split = plan_splits(array_keys(images), labels, cfg, seed)
    return image_bundle(images, labels, [str(i) for i in range(10)], split)


@contextmanager
def _image(path: Path) -> Iterator[Image.Image]:
    try:
        with Image.open(path) as image:
            yield image
    except OSError as exc:  # includes UnidentifiedImageError and truncated files
        raise UserError(f"{path}: not a readable image ({exc})") from None


def read_image_folder(root: Path, image_size: int | None) -> tuple[np.ndarray, np.ndarray, list[str], str]:
    """``root/<class>/<image>`` files as ``([N, C, H, W] uint8, labels, class names, colour mode)``.

    All images become RGB if any is in colour, else greyscale. Without ``image_size`` every
    image must have the first one's size.
    """
    if not root.is_dir():
        raise UserError(f"{root}: no such directory (data.path for image_folder)")
    classes, files = [], []
    for folder in sorted(p for p in root.iterdir() if p.is_dir() and not p.name.startswith(".")):
        images = sorted(p for p in folder.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES)
        if images:
            files += [(path, len(classes)) for path in images]
            classes.append(folder.name)
    if not files:
        raise UserError(f"{root}: no images found; expected {root}/<class>/<name>.png (or .jpg, .bmp, ...)")
    headers = []
    for path, _ in files:
        with _image(path) as image:
            headers.append((image.mode, image.size))
    mode = "L" if all(m in GREY_MODES for m, _ in headers) else "RGB"
    if image_size is None:
        first = headers[0][1]
        for (path, _), (_, size) in zip(files, headers, strict=True):
            if size != first:
                raise UserError(
                    f"{path}: image is {size[0]}x{size[1]} but {files[0][0]} is {first[0]}x{first[1]}; "
                    "set data.image_size to resize every image to one square size"
                )
    arrays = []
    for path, _ in files:
        with _image(path) as image:
            pixels = image.convert(mode)
            if image_size is not None:
                pixels = pixels.resize((image_size, image_size), Image.Resampling.BILINEAR)
            arrays.append(np.asarray(pixels))
    stacked = np.stack(arrays)
    images = stacked[:, None] if mode == "L" else stacked.transpose(0, 3, 1, 2)
    labels = np.array([label for _, label in files], dtype=np.int64)
    return np.ascontiguousarray(images), labels, classes, mode


def image_folder(cfg: DataConfig, seed: int, encoding: TextEncoder | None) -> DataBundle:
    images, labels, classes, mode = read_image_folder(Path(cfg.path), cfg.image_size)
    split = plan_splits(array_keys(images), labels, cfg, seed)
    return image_bundle(images, labels, classes, split, color_mode=mode)
