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

Two kinds of clean image that an e-commerce catalog is full of are labelled too:
- packshots (`benchmarks/packshots.py`): products cut out of the photographs and placed on pure
  white with a soft shadow, two sizes in the frame. Clean ones are negatives for every check; a
  blurred one is a blur positive, one tinted as a whole a colour-cast positive.
- dominant-colour scenes (`SCENES`): crops of the photographs where one natural hue fills most of
  the frame (a red motorcycle, an orange suit, a dusk sky), and hue-rotated copies of them (green,
  blue) in which the neutral parts stay neutral. Negatives; tinted copies are colour-cast positives.
The photographs also get an overexposed copy (x2.5 gain, 1.3 stops: highlights in the subject clip).
The "any defect" row is the status: positives are every variant made to show a defect, negatives
every clean image; flagged = not accepted, rejected = rejected.
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
from benchmarks import packshots

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
    "overexposed": ("overexposed",),
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
    # a gain stretches the tones apart (gaps between levels) and washes the contrast out
    "overexposed": ("banding", "low_contrast"),
    "black_block": ("underexposed",),  # 30% of the frame is black
    "jpeg_q10": ("banding",),  # q10 quantises each block's mean tone coarsely: stepped flat tones
}
CHECKS = (
    "blur",
    "low_contrast",
    "overexposed",
    "color_cast",
    "black_block",
    "green_block",
    "blockiness",
    "banding",
)
# One natural hue dominates: (photo, rows, columns, hue rotation in degrees). Rotating the hue in
# HSV keeps grey, white and black pixels as they are: a green or blue object among neutral
# surroundings, which is what a green bike or a blue cat would photograph as.
SCENES = {
    "red_motorcycle": ("motorcycle", (130, 330), (250, 560), 0),
    "orange_suit": ("astronaut", (280, 512), (60, 420), 0),
    "red_cup": ("coffee", (0, 400), (60, 500), 0),
    "dusk_sky": ("rocket", (0, 300), (0, 640), 0),
    "orange_cat": ("chelsea", (0, 300), (0, 451), 0),
    "green_motorcycle": ("motorcycle", (130, 330), (250, 560), 110),
    "green_suit": ("astronaut", (280, 512), (60, 420), 90),
    "blue_cat": ("chelsea", (0, 300), (0, 451), 190),
}
SCENE_CASTS = ("tint_orange", "tint_blue")
PACKSHOT_FILLS = (0.45, 0.75)
# variants of the extra sets -> the reasons they are made to raise
EXTRA_TARGETS = {
    "packshot": (),
    "packshot_blur": ("blur",),
    "packshot_cast": ("color_cast",),
    "scene": (),
    **{f"scene_{name}": ("color_cast",) for name in SCENE_CASTS},
}
EXTRA_TOLERATED = {
    "packshot_blur": ("low_contrast",),
    "packshot_cast": ("blur", "low_contrast"),
    **{f"scene_{name}": ("blur", "low_contrast") for name in SCENE_CASTS},
}
GROUPS = ("photo", "packshot", "scene")
STATUSES = ("accepted", "review", "rejected")
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
    """Map 0..255 onto (0.5 +- half_range) of the range: a washed-out, flat render."""
    return (127.5 + (pixels.astype(np.float32) - 127.5) * (2 * half_range)).round().astype(np.uint8)


def overexpose(pixels: np.ndarray, gain: float = 2.5) -> np.ndarray:
    """Too much light: every value times `gain`, the highlights clipped to 255."""
    return np.clip(pixels.astype(np.float32) * gain, 0, 255).round().astype(np.uint8)


def hue_rotated(pixels: np.ndarray, degrees: float) -> np.ndarray:
    if degrees == 0:
        return pixels
    hsv = np.asarray(Image.fromarray(pixels).convert("HSV")).copy()
    hsv[..., 0] = (hsv[..., 0].astype(np.int32) + round(degrees / 360 * 256)) % 256
    return np.asarray(Image.fromarray(hsv, "HSV").convert("RGB"))


def scene(name: str, longer_side: int) -> np.ndarray:
    photo, (top, bottom), (left, right), degrees = SCENES[name]
    crop = np.ascontiguousarray(load_photo(photo)[top:bottom, left:right])
    return resized(hue_rotated(crop, degrees), longer_side)


def packshot_variants(cut: packshots.Cutout, size: int, fill: float) -> dict[str, np.ndarray]:
    """A clean packshot, and the same one blurred and tinted orange.

    No overexposed packshot: a product blown out to white merges with its white backdrop, and
    no measure of the pixels alone can tell the two apart.
    """
    aspect = 0.6 if cut.rgb.shape[0] > 2 * cut.rgb.shape[1] else 1.0  # a tall product: a portrait frame
    clean = packshots.packshot(cut, size, fill, aspect=aspect)
    return {
        "packshot": clean,
        "packshot_blur": gaussian_blur(clean),
        "packshot_cast": color_cast(clean, *CASTS["tint_orange"]),
    }


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
        "overexposed": overexpose(original),
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
    originals: dict[str, list[str]]  # "group:status" -> ["name@size [reasons]"] of the clean images
    hard_cases: list[str]
    misses: list[str]
    seconds: float


def labelled_sets(size: int) -> list[tuple[str, str, dict[str, np.ndarray]]]:
    """(set, subject, {variant kind: pixels}) at one size: the photographs' variants, packshots, scenes."""
    sets = [("photo", name, variants(resized(load_photo(name), size))) for name in PHOTOS]
    for name, make in packshots.CUTOUTS.items():
        cut = make()
        for fill in PACKSHOT_FILLS:
            sets.append(("packshot", f"{name}/{fill}", packshot_variants(cut, size, fill)))
    for name in SCENES:
        clean = scene(name, size)
        made = {"scene": clean, **{f"scene_{cast}": color_cast(clean, *CASTS[cast]) for cast in SCENE_CASTS}}
        sets.append(("scene", name, made))
    return sets


def measure(sizes: tuple[int, ...], settings: QcSettings | None = None) -> Report:
    settings = settings or QcSettings()
    tallies = {check: Tally() for check in CHECKS}
    overall = Tally()
    misses: list[str] = []
    originals: dict[str, list[str]] = defaultdict(list)
    start = time.perf_counter()
    targets_of = {**TARGETS, **EXTRA_TARGETS}
    tolerated_of = {**TOLERATED, **EXTRA_TOLERATED}
    for size in sizes:
        for group, name, made in labelled_sets(size):
            verdicts = evaluate_batch(list(made.values()), [None] * len(made), settings)
            for (kind, _), verdict in zip(made.items(), verdicts):
                where = f"{name}@{size} {kind}"
                targets = targets_of.get(kind, ())
                if not targets:
                    originals[f"{group}:{verdict.status}"].append(f"{name}@{size} {list(verdict.reasons)}")
                # any defect: the status, whatever the reason
                if targets:
                    overall.positives += 1
                    overall.tp_reject += verdict.status == "rejected"
                    overall.tp_review += verdict.status == "review"
                else:
                    overall.negatives += 1
                    overall.fp_reject += verdict.status == "rejected"
                    overall.fp_review += verdict.status == "review"
                for check in CHECKS:
                    rejected, review = flagged(verdict.reasons, check)
                    tally = tallies[check]
                    if check in targets:
                        tally.positives += 1
                        tally.tp_reject += rejected
                        tally.tp_review += review
                        if not (rejected or review):
                            misses.append(f"missed   {check:<13} {where}: {verdict.scores.get(check, '')}")
                    elif check not in tolerated_of.get(kind, ()):
                        tally.negatives += 1
                        tally.fp_reject += rejected
                        tally.fp_review += review
                        if rejected or review:
                            misses.append(f"false    {check:<13} {where}: {verdict.reasons}")
    tallies["any defect"] = overall

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
        f"{report.settings.qc_version}; per size {len(PHOTOS)} photos x {len(TARGETS) + 1} variants, "
        f"{len(packshots.CUTOUTS) * len(PACKSHOT_FILLS)} packshots x 3, {len(SCENES)} scenes x "
        f"{len(SCENE_CASTS) + 1}.",
        "TP/FP -r: rejected for the check, -v: review (borderline_) only; prec/rec -r: rejects only, -f: flagged.",
        "",
        HEADER,
        *(tally.row(check) for check, tally in report.tallies.items()),
        "",
        *(
            f"Clean {group}s ({sum(len(originals[f'{group}:{s}']) for s in STATUSES)}): "
            + ", ".join(f"{len(originals[f'{group}:{status}'])} {status}" for status in STATUSES)
            for group in GROUPS
        ),
        *(
            f"  {group} {status}: {entry}"
            for group in GROUPS
            for status in ("review", "rejected")
            for entry in originals[f"{group}:{status}"]
        ),
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
