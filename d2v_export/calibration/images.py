"""Image folders -> `pixel_values` through the checkpoint's own image processor.

Any file Pillow knows by its extension, found recursively. EXIF orientation is applied; every
mode becomes RGB the way transformers' `convert_rgb` does it (16-bit and float grayscale are scaled
to 8 bits first). Labels, as in Hugging Face's imagefolder: a `metadata.csv` / `metadata.jsonl` with
a `file_name` column and a label column (hf.py), else the folder-per-class layout `root/<label>/img.jpg`.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import numpy as np

from ..spec import D2VError, ShapeProfile
from . import hf
from .samples import Candidate, Samples, Unreadable, collect, confined, one_line, rel_name, visible_files

WHAT = "images"
FIX = "pass a folder of JPEG/PNG photos (or .npz feeds named after the model inputs)"


def extensions() -> frozenset[str]:
    from PIL import Image

    return frozenset(ext.lower() for ext in Image.registered_extensions())


def find(root: Path) -> list[Path]:
    exts = extensions()
    return visible_files(root, lambda p: p.suffix.lower() in exts)


def open_rgb(path: Any) -> Any:
    """Decode a file (a path or a binary file object) to an upright RGB PIL image; raises Unreadable for anything Pillow rejects."""
    import warnings

    from PIL import Image, ImageOps

    try:
        with (
            warnings.catch_warnings()
        ):  # over Pillow's bomb warning (89 megapixels): refused before decoding, not decoded
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            im = Image.open(path)
        with im:
            im.seek(0)
            im.load()
            upright = ImageOps.exif_transpose(im)
            return to_rgb(upright if upright is not None else im)
    except Exception as exc:  # noqa: BLE001 - a corrupt file can raise almost anything from a decoder plugin
        raise Unreadable(f"not a readable image ({one_line(exc)})") from None


def to_rgb(im: Any) -> Any:
    from PIL import Image

    if im.mode == "RGB":
        return im
    if im.mode in ("I", "F") or im.mode.startswith("I;16"):
        arr = np.asarray(im, dtype=np.float32)
        if im.mode.startswith("I;16"):
            arr = arr / 257.0
        elif arr.size and float(arr.max()) > 255.0:
            arr = arr * (255.0 / float(arr.max()))
        elif im.mode == "F" and arr.size and float(arr.max()) <= 1.0:
            arr = arr * 255.0
        return Image.fromarray(np.clip(np.rint(arr), 0, 255).astype(np.uint8), "L").convert("RGB")
    if im.mode == "P" and "transparency" in im.info:
        im = im.convert("RGBA")
    return im.convert("RGB")


class ImagePixels:
    """An RGB image -> ``pixel_values`` with the model's processor; forces `image_size` with a size override when the
    processor differs. Shared by the calibration reader and ``d2v-export run`` (predict.py)."""

    def __init__(self, processor: Any, size: int | None) -> None:
        self.processor = processor
        self.size = size
        self.overrides: dict[str, Any] | None = None  # decided on the first image

    def _call(self, img: Any, overrides: dict[str, Any]) -> np.ndarray:
        out = self.processor(images=img, return_tensors="np", **overrides)["pixel_values"]
        if hasattr(out, "numpy"):
            out = out.numpy()
        return np.asarray(out, dtype=np.float32)

    def __call__(self, img: Any) -> np.ndarray:
        try:
            if self.overrides is None:
                out = self._call(img, {})
                if self.size is None or out.shape[-2:] == (self.size, self.size):
                    self.overrides = {}
                    return out
                self.overrides = {"size": {"height": self.size, "width": self.size}}
                if getattr(self.processor, "do_center_crop", False):
                    self.overrides["do_center_crop"] = False
            out = self._call(img, self.overrides)
        except (ValueError, TypeError) as exc:
            raise Unreadable(f"the image processor rejected it ({one_line(exc)})") from None
        if self.size is not None and out.shape[-2:] != (self.size, self.size):
            raise D2VError(
                f"the image processor gives {out.shape[-2]}x{out.shape[-1]} pixels, the shape profile needs "
                f"{self.size}x{self.size}; pass an image size the checkpoint's processor supports"
            )
        return out


def preparer(model: Any, profile: ShapeProfile) -> Callable[[Any], dict[str, np.ndarray]]:
    """RGB PIL image -> {"pixel_values": (1, 3, size, size)} with the model's processor."""
    if model.processor is None:
        raise D2VError(
            "the model has no image processor; pass a checkpoint folder with preprocessor_config.json, or .npz feeds"
        )
    size = profile.static.get("image_size") or getattr(model.config, "image_size", None)
    pixels = ImagePixels(model.processor, int(size) if size else None)

    def prepare(img: Any) -> dict[str, np.ndarray]:
        value = pixels(img)
        return {"pixel_values": value[None] if value.ndim == 3 else value}

    return prepare


def read(
    root: Path,
    files: list[Path],
    model: Any,
    profile: ShapeProfile,
    *,
    count: int | None,
    seed: int,
    columns: Mapping[str, str] | None = None,
) -> Samples:
    prepare = preparer(model, profile)
    meta = hf.metadata(root)
    base = root.parent if root.is_file() else root

    def reader(path: Path) -> Any:
        def run() -> tuple[dict[str, np.ndarray], object]:
            feed = prepare(open_rgb(confined(path, root)))
            label = hf.metadata_label(meta.get(path.relative_to(base).as_posix()), model, columns or {})
            if label is None:
                parts = path.relative_to(root).parts if root.is_dir() else ()
                label = parts[0] if len(parts) >= 2 else None
            return feed, label

        return run

    candidates = [Candidate(rel_name(p, root), reader(p)) for p in files]
    return collect(candidates, count=count, seed=seed, source=str(root), what=WHAT, fix=FIX)
