"""Precision and recall of each QC check on real photographs (scikit-image's samples).

    python -m benchmarks.qc_eval            # the table, default settings, 512 and 1024 px
    python -m benchmarks.qc_eval --sizes 512 --details

Each photo is resized to 512 and 1024 px on the longer side and degraded in the ways a check is
meant to catch; every variant goes through `evaluate_batch` with the default `QcSettings` (no
CLIP: with the offline random weights its cosines mean nothing). For a check, the positives are
the variants made for it, the negatives every other variant and the originals, except the
co-flags listed in `TOLERATED` (a flattened photo also reads as blurry: sharpness scales with
contrast squared). "Flagged" means the reject reason or its `borderline_` review reason.

Near-duplicates are measured on pHashes alone: every original is indexed, and each copy (JPEG
q70, 0.5x resize, a 2% crop per side) is queried against that index (positive: it finds its
own original within the review distance); every original is queried against the others
(negative). Hard cases (scikit-image images that are not ordinary photographs: a fundus image,
a colour wheel, a JPEG-damaged moon, ...) are listed apart, originals only: whatever they raise
is a false alarm on an unusual image.
"""

from __future__ import annotations

import argparse
import io
import time
from collections import defaultdict
from dataclasses import dataclass

import numpy as np
from PIL import Image
from scipy import ndimage
from skimage import data as skdata

from app.qc import PhashIndex, QcSettings, evaluate_batch, perceptual_hash

PHOTOS = (
    "astronaut",
    "coffee",
    "chelsea",
    "rocket",
    "camera",
    "coins",
    "hubble_deep_field",
    "immunohistochemistry",
    "motorcycle",
)
HARD_CASES = ("moon", "retina", "clock", "cell", "colorwheel", "grass", "gravel", "brick", "page", "text")

CASTS = {  # channel gains (a white balance gone wrong) or a 40% blend towards a colour (a tint)
    "cast_red": ("gain", (1.0, 0.7, 0.7)),
    "cast_green": ("gain", (0.7, 1.0, 0.7)),
    "cast_blue": ("gain", (0.7, 0.7, 1.0)),
    "cast_yellow": ("gain", (1.0, 1.0, 0.6)),
    "cast_magenta": ("gain", (1.0, 0.65, 1.0)),
    "cast_cyan": ("gain", (0.65, 1.0, 1.0)),
    "tint_orange": ("tint", (255, 140, 0)),
    "tint_blue": ("tint", (0, 80, 255)),
    "tint_green": ("tint", (0, 200, 60)),
}
# variant kind -> the reasons it is made to raise
TARGETS = {
    "blur": ("blur",),
    "low_contrast": ("low_contrast",),
    **{name: ("color_cast",) for name in CASTS},
    "black_block": ("black_block",),
    "green_block": ("green_block",),
    "jpeg_q10": ("blockiness",),
    "posterize_4bit": ("banding",),
}
# reasons a variant may raise besides its target without counting as a false alarm
TOLERATED = {
    "blur": ("low_contrast",),  # smoothing lowers the luma's spread too
    "low_contrast": ("blur",),  # sharpness scales with contrast squared
    # a cast scales or blends the channels, which lowers the luma's contrast as well
    **{name: ("blur", "low_contrast") for name in CASTS},
    "black_block": ("underexposed",),  # 30% of the frame is black
    "jpeg_q10": ("banding",),  # q10 quantises each block's mean tone coarsely: stepped flat tones
}
CHECKS = ("blur", "low_contrast", "color_cast", "black_block", "green_block", "blockiness", "banding")
DUPLICATE_COPIES = ("jpeg_q70", "resize_0.5x", "crop_2pct")


def load_photo(name: str) -> np.ndarray:
    """A scikit-image sample as RGB uint8 [H, W, 3]."""
    pixels = skdata.stereo_motorcycle()[0] if name == "motorcycle" else getattr(skdata, name)()
    if pixels.dtype == bool:
        pixels = pixels.astype(np.uint8) * 255
    if pixels.ndim == 2:
        pixels = np.stack([pixels] * 3, axis=-1)
    return np.ascontiguousarray(pixels[:, :, :3])


def resized(pixels: np.ndarray, longer_side: int) -> np.ndarray:
    image = Image.fromarray(pixels)
    scale = longer_side / max(image.size)
    size = (round(image.width * scale), round(image.height * scale))
    return np.asarray(image.resize(size, Image.Resampling.LANCZOS))


def gaussian_blur(pixels: np.ndarray, sigma: float = 3.0) -> np.ndarray:
    blurred = ndimage.gaussian_filter(pixels.astype(np.float32), sigma=(sigma, sigma, 0))
    return np.clip(blurred, 0, 255).round().astype(np.uint8)


def squeeze_contrast(pixels: np.ndarray, half_range: float = 0.06) -> np.ndarray:
    return (127.5 + (pixels.astype(np.float32) - 127.5) * (2 * half_range)).round().astype(np.uint8)


def color_cast(pixels: np.ndarray, kind: str, value: tuple) -> np.ndarray:
    if kind == "gain":
        return np.clip(pixels * np.asarray(value, np.float32), 0, 255).round().astype(np.uint8)
    return (0.6 * pixels + 0.4 * np.asarray(value, np.float32)).round().astype(np.uint8)


def paste_block(pixels: np.ndarray, color: tuple[int, int, int], share: float = 0.3, seed: int = 0) -> np.ndarray:
    """A solid rectangle covering `share` of the frame, at a seeded random place."""
    out = pixels.copy()
    height, width = out.shape[:2]
    block_h, block_w = round(height * share**0.5), round(width * share**0.5)
    rng = np.random.default_rng(seed)
    top, left = rng.integers(0, height - block_h + 1), rng.integers(0, width - block_w + 1)
    out[top : top + block_h, left : left + block_w] = color
    return out


def jpeg(pixels: np.ndarray, quality: int) -> np.ndarray:
    buffer = io.BytesIO()
    Image.fromarray(pixels).save(buffer, format="JPEG", quality=quality)
    return np.asarray(Image.open(buffer).convert("RGB"))


def posterize(pixels: np.ndarray, bits: int) -> np.ndarray:
    step = 2 ** (8 - bits)
    return (pixels // step * step + step // 2).astype(np.uint8)


def half_size(pixels: np.ndarray) -> np.ndarray:
    height, width = pixels.shape[:2]
    return np.asarray(Image.fromarray(pixels).resize((width // 2, height // 2), Image.Resampling.LANCZOS))


def crop(pixels: np.ndarray, per_side: float) -> np.ndarray:
    """`per_side` of the width and height cut from every edge, scaled back to the original size."""
    height, width = pixels.shape[:2]
    dy, dx = round(height * per_side), round(width * per_side)
    cut = Image.fromarray(pixels[dy : height - dy, dx : width - dx])
    return np.asarray(cut.resize((width, height), Image.Resampling.LANCZOS))


def variants(original: np.ndarray) -> dict[str, np.ndarray]:
    out = {
        "original": original,
        "blur": gaussian_blur(original),
        "low_contrast": squeeze_contrast(original),
        **{name: color_cast(original, *spec) for name, spec in CASTS.items()},
        "black_block": paste_block(original, (0, 0, 0)),
        "green_block": paste_block(original, (0, 135, 0)),  # an all-zero YUV frame decoded to RGB
        "jpeg_q10": jpeg(original, 10),
        "posterize_4bit": posterize(original, 4),
    }
    return out


def duplicate_copies(original: np.ndarray) -> dict[str, np.ndarray]:
    return {"jpeg_q70": jpeg(original, 70), "resize_0.5x": half_size(original), "crop_2pct": crop(original, 0.02)}


def flagged(reasons: tuple[str, ...], check: str) -> tuple[bool, bool]:
    """(rejected for `check`, flagged for review for it)."""
    return check in reasons, f"borderline_{check}" in reasons


@dataclass
class Tally:
    positives: int = 0
    negatives: int = 0
    tp_reject: int = 0
    tp_review: int = 0
    fp_reject: int = 0
    fp_review: int = 0

    @property
    def precision_rejected(self) -> float:
        return self.tp_reject / max(1, self.tp_reject + self.fp_reject)

    @property
    def recall_flagged(self) -> float:
        return (self.tp_reject + self.tp_review) / max(1, self.positives)

    def row(self, name: str) -> str:
        tp = self.tp_reject + self.tp_review
        fp = self.fp_reject + self.fp_review

        def ratio(a: int, b: int) -> str:
            return f"{a / b:.2f}" if b else "  - "

        precision_r, precision_f = ratio(self.tp_reject, self.tp_reject + self.fp_reject), ratio(tp, tp + fp)
        recall_r, recall_f = ratio(self.tp_reject, self.positives), ratio(tp, self.positives)
        return (
            f"| {name:<15} | {self.positives:>4} | {self.negatives:>4} | {self.tp_reject:>4} | {self.tp_review:>4} "
            f"| {self.fp_reject:>4} | {self.fp_review:>4} | {precision_r:>6} | {precision_f:>6} "
            f"| {recall_r:>5} | {recall_f:>5} |"
        )


HEADER = (
    "| check           |  pos |  neg | TP-r | TP-v | FP-r | FP-v | prec-r | prec-f | rec-r | rec-f |\n"
    "|-----------------|------|------|------|------|------|------|--------|--------|-------|-------|"
)


@dataclass
class Report:
    sizes: tuple[int, ...]
    settings: QcSettings
    tallies: dict[str, Tally]  # check -> counts; "duplicate" included
    originals: dict[str, list[str]]  # status -> ["name@size [reasons]"]
    hard_cases: list[str]
    misses: list[str]
    seconds: float


def measure(sizes: tuple[int, ...], settings: QcSettings | None = None) -> Report:
    settings = settings or QcSettings()
    tallies = {check: Tally() for check in CHECKS}
    misses: list[str] = []
    originals: dict[str, list[str]] = defaultdict(list)
    start = time.perf_counter()
    for size in sizes:
        for name in PHOTOS:
            made = variants(resized(load_photo(name), size))
            verdicts = evaluate_batch(list(made.values()), [None] * len(made), settings)
            for (kind, _), verdict in zip(made.items(), verdicts):
                if kind == "original":
                    originals[verdict.status].append(f"{name}@{size} {list(verdict.reasons)}")
                targets = TARGETS.get(kind, ())
                for check in CHECKS:
                    rejected, review = flagged(verdict.reasons, check)
                    tally = tallies[check]
                    if check in targets:
                        tally.positives += 1
                        tally.tp_reject += rejected
                        tally.tp_review += review
                        if not (rejected or review):
                            misses.append(f"missed   {check:<13} {name}@{size} {kind}: {verdict.scores.get(check, '')}")
                    elif check not in TOLERATED.get(kind, ()):
                        tally.negatives += 1
                        tally.fp_reject += rejected
                        tally.fp_review += review
                        if rejected or review:
                            misses.append(f"false    {check:<13} {name}@{size} {kind}: {verdict.reasons}")

    # Near-duplicates: pHash distance to the indexed originals
    duplicates = Tally()
    for size in sizes:
        index = PhashIndex()
        sources = {name: resized(load_photo(name), size) for name in PHOTOS + HARD_CASES}
        index.add_many([f"{n}@{size}" for n in sources], [perceptual_hash(p) for p in sources.values()])
        for name, original in sources.items():
            own = f"{name}@{size}"
            # negative: an original against every other original
            match = index.nearest(perceptual_hash(original), settings.review_duplicate_distance, exclude_id=own)
            duplicates.negatives += 1
            if match is not None:
                if match.distance <= settings.max_duplicate_distance:
                    duplicates.fp_reject += 1
                else:
                    duplicates.fp_review += 1
                misses.append(f"false    duplicate     {own} matched {match}")
            if name not in PHOTOS:
                continue
            for kind, copy in duplicate_copies(original).items():
                match = index.nearest(perceptual_hash(copy), settings.review_duplicate_distance)
                duplicates.positives += 1
                if match is not None and match.image_id == own:
                    if match.distance <= settings.max_duplicate_distance:
                        duplicates.tp_reject += 1
                    else:
                        duplicates.tp_review += 1
                else:
                    misses.append(f"missed   duplicate     {own} {kind}: {match}")

    # Hard cases: originals only
    hard_lines = []
    for size in sizes:
        images = [resized(load_photo(name), size) for name in HARD_CASES]
        for name, verdict in zip(HARD_CASES, evaluate_batch(images, [None] * len(images), settings)):
            if verdict.reasons:
                hard_lines.append(f"  {name}@{size}: {verdict.status} {list(verdict.reasons)}")
    tallies["duplicate"] = duplicates
    return Report(sizes, settings, tallies, originals, hard_lines, misses, time.perf_counter() - start)


def format_report(report: Report, details: bool = False) -> str:
    originals = report.originals
    lines = [
        f"QC on scikit-image photographs at {', '.join(map(str, report.sizes))} px, QcSettings "
        f"{report.settings.qc_version}; {len(PHOTOS)} photos x {len(TARGETS) + 1} variants per size.",
        "TP/FP -r: rejected for the check, -v: review (borderline_) only; prec/rec -r: rejects only, -f: flagged.",
        "",
        HEADER,
        *(tally.row(check) for check, tally in report.tallies.items()),
        "",
        f"Originals ({sum(map(len, originals.values()))}): "
        + ", ".join(f"{len(originals[status])} {status}" for status in ("accepted", "review", "rejected")),
        *(f"  {status}: {entry}" for status in ("review", "rejected") for entry in originals[status]),
        "",
        f"Hard cases (originals of unusual images, {len(HARD_CASES)} x {len(report.sizes)}), what they raise:",
        *(report.hard_cases or ["  nothing"]),
        f"({report.seconds:.1f} s)",
    ]
    if details:
        lines += ["", "Misses and false alarms:", *report.misses]
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--sizes", type=int, nargs="+", default=[512, 1024], help="longer sides to test at")
    parser.add_argument("--details", action="store_true", help="list every miss and false alarm")
    args = parser.parse_args()
    print(format_report(measure(tuple(args.sizes)), args.details))


if __name__ == "__main__":
    main()
