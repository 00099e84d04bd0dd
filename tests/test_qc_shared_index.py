"""One duplicate index shared by several QC workers: a `PhashIndex` inside a Ray actor.

This is the wiring `jobs/` does (stages import no Ray): the actor holds the index, loaded from the
catalog; each QC worker passes `evaluate_batch` an adapter that sends one `query_and_add_many`
per batch. The actor runs one call at a time, so of two near-identical images rendered by
different workers exactly one is kept.
"""

from __future__ import annotations

import pyarrow as pa
import pytest
from skimage import data as skdata

from app.qc import DuplicateMatch, PhashIndex, QcSettings, evaluate_batch, perceptual_hash
from benchmarks.qc_eval import jpeg

pytestmark = pytest.mark.ray


def test_workers_share_one_index(ray_local) -> None:
    ray = ray_local
    astronaut, coffee, camera = skdata.astronaut(), skdata.coffee(), skdata.camera()
    catalog = pa.table({"image_id": ["old-camera"], "phash": [perceptual_hash(camera)], "status": ["accepted"]})

    actor = ray.remote(num_cpus=0)(PhashIndex).remote(bands=4)
    ray.get(actor.add_catalog.remote(catalog))

    from jobs.generate import RemotePhashIndex  # the adapter the bulk job gives its QC workers

    @ray.remote(num_cpus=0.5)
    def qc_worker(images, ids, handle):
        verdicts = evaluate_batch(
            images, [None] * len(images), QcSettings(), duplicates=RemotePhashIndex(handle), image_ids=ids
        )
        return [(v.status, v.reasons, v.nearest_duplicate) for v in verdicts]

    # both workers render the astronaut (one as a JPEG copy); one also re-renders the catalog's camera
    first = qc_worker.remote([astronaut, coffee], ["w1-astronaut", "w1-coffee"], actor)
    second = qc_worker.remote([jpeg(astronaut, 70), camera], ["w2-astronaut", "w2-camera"], actor)
    results = dict(zip(["w1-astronaut", "w1-coffee"], ray.get(first)))
    results.update(zip(["w2-astronaut", "w2-camera"], ray.get(second)))

    astronauts = [results["w1-astronaut"], results["w2-astronaut"]]
    assert sorted(status for status, _, _ in astronauts) == ["accepted", "rejected"]
    kept = "w1-astronaut" if results["w1-astronaut"][0] == "accepted" else "w2-astronaut"
    rejected = next(r for r in astronauts if r[0] == "rejected")
    assert rejected[1] == (f"duplicate_of:{kept}",)
    assert results["w1-coffee"][0] == "accepted"
    assert results["w2-camera"] == ("rejected", ("duplicate_of:old-camera",), "old-camera")

    assert ray.get(actor.__len__.remote()) == 3  # old-camera, the kept astronaut, coffee
    assert ray.get(actor.nearest.remote(perceptual_hash(coffee), 0)) == DuplicateMatch("w1-coffee", 0)
