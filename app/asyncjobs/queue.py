"""The queue's order, the limits per key, and the lane that keeps bulk jobs off Serve's GPUs.

Policy (the README states it too):
  * Order: queued jobs start by priority (higher first), then by submission time, then id. The
    order is what `GET /v1/jobs/{id}` reports as `queue_position` (1 = next to start).
  * Bulk lane: `serve_gpus` GPUs are kept for Serve's generator replicas (`jobs.serve_gpus` in the
    server's config; 0, the default, keeps none and leaves bulk specs as they are). With some kept,
    every bulk generator needs one unit of the custom Ray resource `bulk_resource` (default
    `gpu_bulk`) besides its GPU. The cluster declares that resource only for the GPUs bulk work may
    use — `gpu_bulk = cluster GPUs − serve_gpus` (e.g. `ray start --num-gpus=4 --resources='{"gpu_bulk":
    3}'`) — so Ray can never place more bulk generators than that, whatever a spec asks, and Serve's
    replicas (which ask for a GPU only) always find theirs. A job's `compute.generators` is also
    capped at that count, so the job does not wait for actors that can never be placed. When every
    GPU is kept for Serve, a bulk job is refused (429, naming serve_gpus).
  * In flight: a key may have at most `max_in_flight_per_key` jobs queued or running; more is 429.
  * Jobs run `max_running` at a time (default 1: a bulk job uses the whole bulk lane by itself).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from app.asyncjobs.records import JobError, JobRecord


class LimitExceeded(JobError):
    """Over a configured limit; the message names the limit and its value."""

    status = 429


class RequestTooLarge(JobError):
    status = 413


@dataclass(frozen=True)
class QueuePolicy:
    cluster_gpus: int = 0
    serve_gpus: int = 0
    bulk_resource: str = "gpu_bulk"
    max_in_flight_per_key: int = 4
    max_rows_per_job: int = 10_000
    max_running: int = 1
    max_upload_bytes: int = 50 * 1024 * 1024

    def __post_init__(self) -> None:
        if self.serve_gpus < 0 or self.cluster_gpus < 0:
            raise JobError(f"GPU counts cannot be negative (cluster {self.cluster_gpus}, serve {self.serve_gpus})")
        if self.cluster_gpus and self.serve_gpus > self.cluster_gpus:
            raise JobError(f"serve_gpus {self.serve_gpus} is more than the cluster's {self.cluster_gpus} GPUs")

    @property
    def bulk_gpus(self) -> int:
        return max(0, self.cluster_gpus - self.serve_gpus)

    @property
    def lane(self) -> bool:
        """Whether bulk jobs keep to the bulk lane: GPUs are kept for Serve on a cluster with GPUs."""
        return bool(self.cluster_gpus and self.serve_gpus)

    def check_lane(self) -> None:
        """A bulk job has GPUs to run on (LimitExceeded, 429, when Serve keeps them all)."""
        if self.lane and not self.bulk_gpus:
            raise LimitExceeded(
                f"no GPUs for bulk jobs: the cluster's {self.cluster_gpus} GPU(s) are all kept for Serve "
                f"(serve_gpus={self.serve_gpus})"
            )

    def bulk_overrides(self, spec_compute: dict[str, Any]) -> dict[str, Any]:
        """The spec fields a bulk job is submitted with: its generators need the bulk resource and
        are capped at the bulk lane's GPUs. Without a lane (a CPU cluster, or no GPU kept for Serve)
        the spec is left as it is."""
        if not self.lane:
            return {}
        self.check_lane()
        asked = spec_compute.get("generators")
        return {
            "compute.accelerator_resource": self.bulk_resource,
            "compute.generators": min(int(asked), self.bulk_gpus) if asked else self.bulk_gpus,
        }

    def check_rows(self, rows: int) -> None:
        if rows > self.max_rows_per_job:
            raise RequestTooLarge(f"{rows} rows is over the limit of max_rows_per_job={self.max_rows_per_job}")

    def check_upload(self, size: int) -> None:
        if size > self.max_upload_bytes:
            raise RequestTooLarge(f"{size} bytes is over the limit of max_upload_bytes={self.max_upload_bytes}")

    def check_in_flight(self, tenant: str, jobs: list[JobRecord]) -> None:
        n = sum(1 for j in jobs if j.tenant == tenant and j.state in ("queued", "running"))
        if n >= self.max_in_flight_per_key:
            raise LimitExceeded(
                f"this key has {n} jobs queued or running: the limit is max_in_flight_per_key="
                f"{self.max_in_flight_per_key}"
            )


def queue_order(jobs: list[JobRecord]) -> list[JobRecord]:
    """Queued jobs in the order they will start."""
    return sorted((j for j in jobs if j.state == "queued"), key=lambda j: (-j.priority, j.created_at, j.id))


def queue_position(job: JobRecord, jobs: list[JobRecord]) -> int | None:
    """1 for the next job to start; None once it is not queued."""
    for i, j in enumerate(queue_order(jobs), start=1):
        if j.id == job.id:
            return i
    return None


def next_to_start(jobs: list[JobRecord], policy: QueuePolicy) -> list[JobRecord]:
    """The queued jobs that may start now, given how many are running."""
    free = policy.max_running - sum(1 for j in jobs if j.state == "running")
    return queue_order(jobs)[: max(0, free)]
