"""``npz``: the user's own arrays, ``x`` (samples) and ``y`` (labels), optional ``label_names``.

``x`` of shape ``[N, D]`` is a feature table, ``[N, H, W]`` greyscale images and
``[N, C, H, W]`` images. Features are standardised per column with the train split's mean/std
(stored in ``preprocessing``), images per channel as in `fullchain.data.images`. Labels are
class ids into ``label_names`` when it is given, otherwise any strings or ints.
The file is read with ``allow_pickle=False``: an npz is data, never code.
"""

from __future__ import annotations

import zipfile
from pathlib import Path

import numpy as np

from fullchain.config import DataConfig
from fullchain.data.bundle import DataBundle
from fullchain.data.images import image_bundle
from fullchain.data.samples import encode_labels, normalised_pairs
from fullchain.data.splits import array_keys, plan_splits
from fullchain.data.tokenizer import TextEncoder
from fullchain.errors import UserError
from fullchain.tasks.classification import FEATURES, FeatureClassification

REQUIRED_KEYS = ("x", "y")


def read_npz(path: Path) -> tuple[np.ndarray, np.ndarray, np.ndarray | None]:
    """``(x, y, label_names or None)`` from ``path``, with every shape problem named."""
    try:
        archive = np.load(path, allow_pickle=False)
        if not isinstance(archive, np.lib.npyio.NpzFile):
            raise UserError(
                f"{path}: a single array, not an .npz archive; save with np.savez(path, x=..., y=...)"
            )
        with archive:
            missing = [key for key in REQUIRED_KEYS if key not in archive.files]
            if missing:
                found = ", ".join(archive.files) or "none"
                raise UserError(
                    f"{path}: no array {', '.join(map(repr, missing))} (found: {found}); "
                    "save with np.savez(path, x=samples, y=labels)"
                )
            x, y = archive["x"], archive["y"]
            names = archive["label_names"] if "label_names" in archive.files else None
    except FileNotFoundError:
        raise UserError(f"{path}: no such file (data.path)") from None
    except (OSError, ValueError, zipfile.BadZipFile) as exc:
        raise UserError(f"{path}: not a readable .npz file ({exc})") from None
    if x.ndim not in (2, 3, 4) or not (np.issubdtype(x.dtype, np.number) or x.dtype == bool):
        raise UserError(f"{path}: 'x' must be numeric with 2, 3 or 4 dimensions, got {x.dtype} {x.shape}")
    if y.ndim != 1 or len(y) != len(x):
        raise UserError(f"{path}: 'y' must be one label per sample ({len(x)}), got shape {y.shape}")
    if names is not None and not (
        np.issubdtype(y.dtype, np.integer) and y.min() >= 0 and y.max() < len(names)
    ):
        raise UserError(
            f"{path}: with 'label_names' ({len(names)}), 'y' must hold class ids 0..{len(names) - 1}"
        )
    return x, y, names


def npz(cfg: DataConfig, seed: int, encoding: TextEncoder | None) -> DataBundle:
    path = Path(cfg.path)
    x, y, names = read_npz(path)
    if names is None:
        labels, label_names = encode_labels(y.tolist())
    else:
        labels, label_names = y.astype(np.int64), [str(n) for n in names]
    split = plan_splits(array_keys(x), labels, cfg, seed)
    if x.ndim > 2:
        return image_bundle(x[:, None] if x.ndim == 3 else x, labels, label_names, split)
    (train, val, test), stats = normalised_pairs(x, labels, split, FEATURES)
    return DataBundle(
        train=train,
        val=val,
        test=test,
        kind="features",
        label_names=label_names,
        task=FeatureClassification(label_names, x.shape[1]),
        input_spec={"num_features": x.shape[1], "num_classes": len(label_names)},
        preprocessing={"kind": "features", **stats},
    )
