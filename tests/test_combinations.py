"""Several base models and weighted LoRA stacks in one run: routing, A/B, fusing, few-step tier."""

from __future__ import annotations

import dataclasses

import numpy as np
import pyarrow as pa
import pytest

from app.expand import ExpandRows, ResolvedModels
from app.request import RenderRequest
from app.spec import ComputeSpec, SpecError, parse_spec


@pytest.fixture(scope="module")
def models(model_catalog, tiny_base, tiny_loras):
    base_b = model_catalog.resolve_base("tiny-sdxl-b")
    loras = {**tiny_loras, "tiny-style-b": model_catalog.resolve_lora("tiny-style-b", base_b)}
    return ResolvedModels(
        bases={"tiny-sdxl": tiny_base, "tiny-sdxl-b": base_b},
        loras=loras,
        known_loras=tuple(model_catalog.names("lora")),
    )


COMBOS = {
    "hero": {
        "base": "tiny-sdxl",
        "loras": [{"name": "tiny-style", "weight": 0.8}, {"name": "tiny-detail", "weight": 0.6}],
        "steps": 30,
    },
    "variation": {"base": "tiny-sdxl-b", "loras": [{"name": "tiny-style-b", "weight": 1.0}], "steps": 8},
    "fast": {"base": "tiny-sdxl", "scheduler": "euler_trailing", "steps": 4, "guidance": 1.0},
}


def spec_with(**over):
    data = {
        "run_name": "t",
        "input": {"path": "/x.parquet"},
        "size": "tiny-square",
        "guidance": 5.0,
        "combinations": COMBOS,
        "tiers": {"column": "tier", "default": "bulk", "routes": {"bulk": "variation", "thumbnail": "fast"}},
    }
    data.update(over)
    return parse_spec(data)


def expand(spec, models, rows):
    out = ExpandRows(spec, models)(pa.Table.from_pylist(rows)).to_pydict()
    return out, [
        RenderRequest.from_arrow_value(r) if s == "pending" else None for r, s in zip(out["request"], out["status"])
    ]


def test_tiers_route_rows_to_combinations_with_their_own_settings(models):
    out, reqs = expand(
        spec_with(),
        models,
        [
            {"prompt": "a", "tier": "hero"},
            {"prompt": "b", "tier": None},
            {"prompt": "c", "tier": "thumbnail"},
            {"prompt": "d", "tier": "poster"},
        ],
    )
    assert out["status"] == ["pending", "pending", "pending", "failed"]
    hero, bulk, thumb = reqs[:3]
    assert (hero.combination, hero.tier, hero.steps, hero.guidance) == ("hero", "hero", 30, 5.0)
    assert [lo.name for lo in hero.loras] == ["tiny-style", "tiny-detail"]
    assert (bulk.combination, bulk.tier, bulk.base_model["name"], bulk.steps) == ("variation", "bulk", "tiny-sdxl-b", 8)
    assert (thumb.combination, thumb.scheduler, thumb.steps, thumb.guidance) == ("fast", "euler_trailing", 4, 1.0)
    assert "tier 'poster' names no combination" in out["error"][3] and "thumbnail" in out["error"][3]


def test_ab_test_renders_each_row_through_every_combination_with_one_seed(models):
    out, reqs = expand(
        spec_with(ab_test={"combinations": ["hero", "variation"]}, tiers={}),
        models,
        [{"prompt": "a red shoe"}, {"prompt": "a hat"}],
    )
    assert len(reqs) == 4 and all(out["status"][i] == "pending" for i in range(4))
    by_group = {}
    for r in reqs:
        by_group.setdefault(r.tags["ab_group"], []).append(r)
    assert len(by_group) == 2
    for group in by_group.values():
        assert {r.combination for r in group} == {"hero", "variation"}
        assert len({r.seed for r in group}) == 1 and len({r.prompt for r in group}) == 1
        assert len({r.image_id for r in group}) == 2


def test_spec_errors_name_the_combination(model_catalog):
    from app.plan import resolve_models

    with pytest.raises(SpecError, match=r"tiers.routes.bulk: no combination 'nope'"):
        spec_with(tiers={"routes": {"bulk": "nope"}})
    with pytest.raises(SpecError, match=r"ab_test.combinations: no combination 'x'"):
        spec_with(ab_test={"combinations": ["hero", "x"]})
    with pytest.raises(SpecError, match="not both"):
        spec_with(model={"base": "tiny-sdxl"})
    bad = spec_with(combinations={**COMBOS, "hero": {**COMBOS["hero"], "loras": [{"name": "tiny-ghost"}]}})
    with pytest.raises(SpecError, match=r"combinations.hero.loras\[0\].name: unknown LoRA 'tiny-ghost'"):
        resolve_models(bad, model_catalog)
    with pytest.raises(SpecError, match=r"combinations.hero.loras\[1\].weight"):
        spec_with(combinations={"hero": {"loras": [{"name": "a"}, {"name": "b", "weight": 9}]}})


def test_row_lora_for_another_architecture_fails_that_row(models):
    alien = dataclasses.replace(models.loras["tiny-style"], name="alien", arch="unet-0123456789")
    with_alien = dataclasses.replace(models, loras={**models.loras, "alien": alien})
    out, _ = expand(
        spec_with(),
        with_alien,
        [{"prompt": "a", "tier": "hero", "loras": "alien:0.5"}, {"prompt": "b", "tier": "hero"}],
    )
    assert out["status"] == ["failed", "pending"]
    assert "LoRA 'alien' was made for architecture unet-0123456789, but base 'tiny-sdxl' is" in out["error"][0]


def test_fused_stack_matches_unfused_and_leaves_the_base_exact(models):
    from app.generator import Generator

    spec = spec_with(
        combinations={
            "plain": {},
            "stack": {"loras": [{"name": "tiny-style", "weight": 0.8}, {"name": "tiny-detail", "weight": 0.5}]},
            "fused": {
                "loras": [{"name": "tiny-style", "weight": 0.8}, {"name": "tiny-detail", "weight": 0.5}],
                "fuse_loras": True,
            },
        },
        tiers={},
        ab_test={"combinations": ["plain", "stack", "fused"]},
        steps=3,
    )
    _, reqs = expand(spec, models, [{"prompt": "a red shoe"}])
    plain, stack, fused = reqs
    assert fused.fuse_loras and fused.image_id != stack.image_id  # fusing decides the last bits
    gen = Generator(models.bases["tiny-sdxl"], models.loras, ComputeSpec(device="cpu"))
    px = {r.combination: gen.render([r])[0].pixels.astype(int) for r in (plain, stack, fused)}
    assert np.abs(px["stack"] - px["fused"]).max() <= 2
    assert np.abs(px["plain"] - px["stack"]).max() > 10
    # After the fused stack: the other stacks render exactly as before (weights restored bit for bit).
    assert np.array_equal(gen.render([plain])[0].pixels, px["plain"])
    assert np.array_equal(gen.render([stack])[0].pixels, px["stack"])
    assert gen.stats()["lora_switches"] == 4  # stack, fused, plain, stack (plain first needs none)


def test_few_step_tier_costs_a_fraction_of_the_hero_tier(models):
    from app.generator import Generator

    spec = spec_with(ab_test={"combinations": ["hero", "fast"]}, tiers={})
    _, (hero, fast) = expand(spec, models, [{"prompt": "a red shoe"}])
    gen = Generator(models.bases["tiny-sdxl"], models.loras, ComputeSpec(device="cpu"))
    gen.render([hero]), gen.render([fast])  # warm both paths
    t_hero = min(gen.render([hero])[0].gpu_seconds for _ in range(2))
    t_fast = min(gen.render([fast])[0].gpu_seconds for _ in range(2))
    # 30 steps x 2 (guidance) UNet passes against 4 x 1; text encoding and VAE decode are shared costs.
    assert t_hero / t_fast > 4, (t_hero, t_fast)


@pytest.mark.ray
def test_game_assets_runs_two_bases_and_three_stacks_in_one_job(ray_local, tmp_path):
    from pathlib import Path

    from app.catalog.store import CatalogStore
    from app.spec import load_spec
    from app.storage import OutputStore
    from jobs.generate import run

    spec = load_spec(
        Path(__file__).parents[1] / "specs" / "game_assets.yaml",
        {"output.uri": str(tmp_path), "variations.seeds_per_row": 2, "steps": 2},
    )
    summary = run(spec, quiet=True)
    assert summary.rendered == 6 and summary.counts["failed"] == 0
    assert set(summary.by_combination) == {"painted", "detailed", "alt-base"}
    gens = summary.by_generator.values()
    assert sorted(g["base"] for g in gens) == ["tiny-sdxl", "tiny-sdxl-b"]
    assert {g["base"]: g["images"] for g in gens} == {"tiny-sdxl": 4, "tiny-sdxl-b": 2}
    # Rows arrive grouped by combination: the tiny-sdxl actor switches once per stack, not per row.
    assert {g["base"]: g["lora_switches"] for g in gens} == {"tiny-sdxl": 2, "tiny-sdxl-b": 1}
    assert "LoRA switches" in summary.render()

    rows = CatalogStore(OutputStore.at(str(tmp_path))).read().to_pylist()
    lineage = {
        r["combination"]: (
            r["base_model"]["name"],
            [(lo["name"], lo["weight"], len(lo["sha256"])) for lo in r["loras"]],
            r["lora_fused"],
        )
        for r in rows
    }
    assert lineage == {
        "painted": ("tiny-sdxl", [("tiny-style", 0.8, 64)], False),
        "detailed": ("tiny-sdxl", [("tiny-detail", 0.7, 64), ("tiny-style", 0.3, 64)], True),
        "alt-base": ("tiny-sdxl-b", [("tiny-style-b", 0.9, 64)], False),
    }
    assert len({dict(r["tags"])["ab_group"] for r in rows}) == 2


def test_fused_qkv_gives_the_same_images_with_and_without_lora_stacks(models):
    """Fused QKV projections skip unfused LoRA adapters; the switcher must split them for those."""
    from app.generator import Generator

    spec = spec_with(
        combinations={
            "plain": {},
            "stack": {"loras": [{"name": "tiny-style", "weight": 0.8}]},
            "fused": {"loras": [{"name": "tiny-style", "weight": 0.8}], "fuse_loras": True},
        },
        tiers={},
        ab_test={"combinations": ["plain", "stack", "fused", "plain"][:3]},
        steps=2,
    )
    _, reqs = expand(spec, models, [{"prompt": "a red shoe"}])
    reference = Generator(models.bases["tiny-sdxl"], models.loras, ComputeSpec(device="cpu", fuse_qkv=False))
    fast = Generator(
        models.bases["tiny-sdxl"], models.loras, ComputeSpec(device="cpu", fuse_qkv=True, channels_last=True)
    )
    assert fast.accelerator == "cpu:threads=1+fused_qkv+channels_last"
    for r in reqs + reqs[:1]:  # back to plain at the end
        want = reference.render([r])[0].pixels.astype(int)
        got = fast.render([r])[0].pixels.astype(int)
        assert np.abs(want - got).max() <= 1, r.combination
