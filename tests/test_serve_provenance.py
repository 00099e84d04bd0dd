"""Served images carry the same provenance as bulk ones: a signed C2PA manifest and the invisible
watermark in the master, a signed transcoding for the OpenAI dialect's JPEG/WebP answers, and
prompts screened before rendering (the OpenAI dialect's `moderation_blocked`). On the Serve app's
own parts called directly, with the tiny generator."""

from __future__ import annotations

import pytest

from app.expand import ResolvedModels
from app.provenance import watermark
from app.provenance.devca import ensure_dev_credentials
from app.provenance.verify import verify_bytes
from app.qc import QcSettings
from app.serve.config import ServeConfig
from app.serve.core import ImageJob, RequestError, ServeCore, rendered_rows
from app.spec import ComputeSpec


@pytest.fixture(scope="module")
def served(tiny_base, tmp_path_factory):
    from app.generator import Generator
    from app.models.catalog import default_home

    generator = Generator(tiny_base, {}, ComputeSpec(device="cpu", cpu_threads=1, batch_size=1))
    config = ServeConfig(
        qc=QcSettings(enabled=("blank",)),
        steps=2,
        default_size="256x256",
        output_uri=str(tmp_path_factory.mktemp("served")),
        rights={"licence": "CC-BY-4.0", "owner": "Acme Ltd"},
    )
    core = ServeCore(config, ResolvedModels.single(tiny_base))
    reqs = core.plan(ImageJob(prompt="a red leather boot", seed=3, n=1))
    [image] = core.finish(reqs, rendered_rows(reqs, generator.render(reqs), generator.accelerator_settings))
    return core, image, ensure_dev_credentials(default_home()).root_ca.read_bytes()


def test_a_served_master_is_signed_and_watermarked(served):
    _, image, root = served
    report = verify_bytes(image.png, "master.png", trust_anchors=root)
    assert report["c2pa"]["valid"] and report["c2pa"]["claims"]["rights"]["licence"] == "CC-BY-4.0"
    assert report["watermark"]["payload"] == watermark.payload_for(image.image_id)


def test_a_transcoded_answer_is_signed_with_its_master_as_parent(served):
    core, image, root = served
    jpeg = core.encoded(image.png, "jpeg", 90)
    report = verify_bytes(jpeg, "answer.jpg", trust_anchors=root)
    assert report["c2pa"]["valid"]
    assert report["c2pa"]["claims"]["ingredients"][0]["relationship"] == "parentOf"


def test_a_blocked_prompt_is_refused_before_rendering(served):
    core, _, _ = served
    with pytest.raises(RequestError) as e:
        core.plan(ImageJob(prompt="explicit sex scene on a beach", n=1))
    assert e.value.status == 400 and e.value.field == "prompt" and e.value.code == "moderation_blocked"
    assert "prompt_blocked" in e.value.message
