"""Upscaling ("hires fix"): Lanczos resize to the target scale, then tiled img2img at low strength.

`plan_tiles` covers the image with tiles of one size (multiples of 8) that overlap their
neighbours by at least `overlap` pixels, spread evenly so the last tile ends on the image's edge.
`blend_tiles` puts the refined tiles back with raised-cosine weights across each overlap (the two
neighbours' weights sum to 1 there; a tile side on the image's edge has weight 1 up to the edge),
so a tile whose colours drift slightly from its neighbour's meets it in a ramp, not an edge.
"""

from __future__ import annotations

import itertools
import math
from dataclasses import dataclass

import numpy as np
from PIL import Image

from app.conditioning.errors import ConditioningError


def upscaled_size(width: int, height: int, scale: float) -> tuple[int, int]:
    """width·scale x height·scale, each rounded to the nearest multiple of 8 (at least 8)."""
    if not 1.0 <= scale <= 8.0:
        raise ConditioningError("upscale_settings", f"scale must be between 1 and 8, got {scale}")
    return max(8, 8 * round(width * scale / 8)), max(8, 8 * round(height * scale / 8))


def upscale(pixels: np.ndarray, scale: float) -> np.ndarray:
    """[h, w, C] uint8 → [H, W, C] uint8 with Lanczos, (W, H) = `upscaled_size`."""
    width, height = upscaled_size(pixels.shape[1], pixels.shape[0], scale)
    return np.asarray(Image.fromarray(np.ascontiguousarray(pixels)).resize((width, height), Image.Resampling.LANCZOS))


@dataclass(frozen=True)
class Tile:
    x: int
    y: int
    width: int
    height: int


@dataclass(frozen=True)
class TilePlan:
    width: int  # of the image
    height: int
    xs: tuple[int, ...]  # tile column starts
    ys: tuple[int, ...]  # tile row starts
    tile_width: int
    tile_height: int

    @property
    def tiles(self) -> tuple[Tile, ...]:  # row by row
        return tuple(Tile(x, y, self.tile_width, self.tile_height) for y in self.ys for x in self.xs)


def _starts(length: int, tile: int, overlap: int) -> tuple[int, ...]:
    """Tile starts along one side: multiples of 8, first 0, last length − tile, neighbours
    overlapping by ≥ overlap."""
    if length <= tile:
        return (0,)
    count = max(2, math.ceil((length - overlap) / (tile - overlap)))
    while True:
        starts = tuple(8 * round(i * (length - tile) / (8 * (count - 1))) for i in range(count))
        if all(b - a <= tile - overlap for a, b in itertools.pairwise(starts)):
            return starts
        count += 1


def plan_tiles(width: int, height: int, tile: int = 1024, overlap: int = 128) -> TilePlan:
    """Tiles of `tile`² (clipped to a side shorter than a tile) covering width x height."""
    if width % 8 or height % 8:
        raise ConditioningError("upscale_settings", f"image size {width}x{height} must be multiples of 8 to tile")
    if tile % 8 or tile < 64:
        raise ConditioningError("upscale_settings", f"tile size must be a multiple of 8 and at least 64, got {tile}")
    if overlap % 8 or not 0 <= overlap <= tile // 2:
        raise ConditioningError(
            "upscale_settings", f"overlap must be a multiple of 8 between 0 and tile/2={tile // 2}, got {overlap}"
        )
    return TilePlan(
        width=width,
        height=height,
        xs=_starts(width, tile, overlap),
        ys=_starts(height, tile, overlap),
        tile_width=min(tile, width),
        tile_height=min(tile, height),
    )


def cut_tiles(pixels: np.ndarray, plan: TilePlan) -> list[np.ndarray]:
    """The tiles of `pixels` [H, W, C] as [tile_h, tile_w, C] views, in `plan.tiles` order."""
    if pixels.shape[:2] != (plan.height, plan.width):
        raise ValueError(f"image is {pixels.shape[1]}x{pixels.shape[0]}, plan is for {plan.width}x{plan.height}")
    return [pixels[t.y : t.y + t.height, t.x : t.x + t.width] for t in plan.tiles]


def _ramp(starts: tuple[int, ...], index: int, tile: int) -> np.ndarray:
    """[tile] weights of tile `index` along one side: raised-cosine rise over the overlap with the
    previous tile, fall over the overlap with the next one, 1 elsewhere."""
    weight = np.ones(tile)
    if index > 0:
        rise = starts[index - 1] + tile - starts[index]  # overlap with the previous tile
        t = (np.arange(rise) + 0.5) / rise
        weight[:rise] = 0.5 - 0.5 * np.cos(np.pi * t)
    if index < len(starts) - 1:
        fall = starts[index] + tile - starts[index + 1]
        t = (np.arange(fall) + 0.5) / fall
        weight[tile - fall :] *= 0.5 + 0.5 * np.cos(np.pi * t)
    return weight


def blend_tiles(tiles: list[np.ndarray], plan: TilePlan) -> np.ndarray:
    """[H, W, C] uint8 from `tiles` ([tile_h, tile_w, C] each, `plan.tiles` order), feathered."""
    if len(tiles) != len(plan.tiles):
        raise ValueError(f"plan has {len(plan.tiles)} tiles, got {len(tiles)}")
    channels = tiles[0].shape[2]
    total = np.zeros((plan.height, plan.width, channels))  # Σ weight·tile
    weights = np.zeros((plan.height, plan.width, 1))  # Σ weight
    wxs = [_ramp(plan.xs, i, plan.tile_width) for i in range(len(plan.xs))]
    wys = [_ramp(plan.ys, j, plan.tile_height) for j in range(len(plan.ys))]
    for k, (tile, place) in enumerate(zip(tiles, plan.tiles)):
        if tile.shape != (place.height, place.width, channels):
            raise ValueError(f"tile {k} is {tile.shape}, expected {(place.height, place.width, channels)}")
        weight = np.outer(wys[k // len(plan.xs)], wxs[k % len(plan.xs)])[:, :, None]  # [tile_h, tile_w, 1]
        total[place.y : place.y + place.height, place.x : place.x + place.width] += weight * tile
        weights[place.y : place.y + place.height, place.x : place.x + place.width] += weight
    return np.clip(np.rint(total / weights), 0, 255).astype(np.uint8)


def tile_seam_score(pixels: np.ndarray, plan: TilePlan) -> float:
    """How much more the image steps across tile edges than across any other line: for every
    line between two pixel columns (rows), within each tile row (column), the mean signed
    luminance step across it; the mean of its magnitude on lines at tile edges over the mean on
    all other lines. Content steps average out along a line, a seam's constant step does not.
    A tiling's own lines score about 1 on an untiled photo (0.7–1.4 on the test photographs,
    the content decides): compare with the image before tiling, not with a fixed number."""
    if pixels.shape[:2] != (plan.height, plan.width):
        raise ValueError(f"image is {pixels.shape[1]}x{pixels.shape[0]}, plan is for {plan.width}x{plan.height}")
    if len(plan.tiles) == 1:
        raise ValueError("a plan of one tile has no tile edges")
    luminance = pixels[:, :, :3].astype(np.float64) @ np.array([0.299, 0.587, 0.114])  # [H, W]
    # [tile rows, W-1]: mean step from column x to x+1 within each tile row; likewise for rows
    across_columns = np.stack([np.diff(luminance[y : y + plan.tile_height], axis=1).mean(axis=0) for y in plan.ys])
    across_rows = np.stack([np.diff(luminance[:, x : x + plan.tile_width], axis=0).mean(axis=1) for x in plan.xs])
    at_column_edge = _edge_lines(plan.xs, plan.tile_width, plan.width)
    at_row_edge = _edge_lines(plan.ys, plan.tile_height, plan.height)
    edges = np.concatenate([across_columns[:, at_column_edge].ravel(), across_rows[:, at_row_edge].ravel()])
    others = np.concatenate([across_columns[:, ~at_column_edge].ravel(), across_rows[:, ~at_row_edge].ravel()])
    return float(np.abs(edges).mean() / max(np.abs(others).mean(), 1e-6))


def _edge_lines(starts: tuple[int, ...], tile: int, length: int) -> np.ndarray:
    """[length-1] bool: the lines (between pixel i and i+1) where a tile begins or ends inside the image."""
    lines = np.zeros(length - 1, dtype=bool)
    for start in starts:
        for edge in (start, start + tile):
            if 0 < edge < length:
                lines[edge - 1] = True
    return lines
