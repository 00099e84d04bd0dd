"""The job runner of `imagefab serve`: one replica that moves asynchronous jobs along.

The ingress records jobs (`POST /v1/jobs`) and answers at once; this deployment starts queued jobs
as Ray jobs, follows them and sends their webhooks, by calling `JobRunner.tick()` every
`jobs.tick_s` seconds on a thread of its own. It holds no state of its own: every record is in the
output store, so a replica that Serve restarts, or a whole new server, picks up where the last
one stopped. It asks for no CPU or GPU: it only talks to the store, the Ray dashboard and webhook
receivers.
"""

from __future__ import annotations

import logging
import os
import sys
import threading
from concurrent.futures import ThreadPoolExecutor

from ray import serve

from app.asyncjobs.queue import QueuePolicy
from app.asyncjobs.records import JobError, JobStore
from app.asyncjobs.runner import JobRunner
from app.asyncjobs.submit import RayJobs
from app.asyncjobs.webhooks import WebhookDispatcher, allow_private_from_env
from app.serve.config import JobsSettings
from app.spec import SpecError
from app.storage import OutputStore

log = logging.getLogger("imagefab.serve")
DASHBOARD_ENV = "RAY_DASHBOARD_ADDRESS"


def dashboard_address(settings: JobsSettings) -> str:
    """Where jobs are submitted: the configured dashboard, else $RAY_DASHBOARD_ADDRESS, else the
    dashboard of the cluster this process belongs to. "" when there is none: jobs then wait, and
    each says why, rather than going to whatever answers on Ray's default port (another cluster)."""
    if settings.ray_dashboard:
        return settings.ray_dashboard
    if os.environ.get(DASHBOARD_ENV):
        return os.environ[DASHBOARD_ENV]
    url = None
    try:
        import ray
        from ray._private.services import get_webui_url_from_internal_kv  # no public API says it in a worker

        if ray.is_initialized():
            url = get_webui_url_from_internal_kv()
    except Exception as e:  # an older or newer Ray
        log.warning("cannot read the cluster's dashboard address (%s); set jobs.ray_dashboard", e)
    if not url:
        return ""
    return url if "://" in url else f"http://{url}"


def sized_lane(settings: JobsSettings, cluster_gpus: int, declared: float, serve_gpu_replicas: int) -> JobsSettings:
    """The jobs settings with the cluster's GPUs counted (`cluster_gpus`, unless the config names
    them), checked once when the server starts: Serve keeps no more GPUs than there are, and its
    generator replicas (`serve_gpu_replicas` GPUs at most) fit in what it keeps, so neither side can
    take the other's. `declared`: the cluster's units of `bulk_resource`, which should be the lane's
    GPUs (an autoscaling cluster may not have them up yet: a warning, not an error)."""
    counted = settings.cluster_gpus if settings.cluster_gpus is not None else cluster_gpus
    sized = settings.model_copy(update={"cluster_gpus": counted})
    try:
        policy = queue_policy(sized)
    except JobError as e:
        raise SpecError(f"jobs.serve_gpus: {e}") from None
    if not policy.lane:
        return sized
    if serve_gpu_replicas > policy.serve_gpus:
        raise SpecError(
            f"jobs.serve_gpus: Serve's generators may use {serve_gpu_replicas} GPU(s) (replicas.max_replicas per "
            f"base model) but {policy.serve_gpus} are kept for them: they would take the bulk lane's GPUs"
        )
    if declared != policy.bulk_gpus:
        log.warning(
            "the cluster declares %g unit(s) of %s, the bulk lane has %d GPU(s) (%d − jobs.serve_gpus %d): "
            "declare %s: %d on the GPUs bulk jobs may use",
            declared,
            policy.bulk_resource,
            policy.bulk_gpus,
            policy.cluster_gpus,
            policy.serve_gpus,
            policy.bulk_resource,
            policy.bulk_gpus,
        )
    return sized


def queue_policy(settings: JobsSettings) -> QueuePolicy:
    return QueuePolicy(
        cluster_gpus=settings.cluster_gpus or 0,
        serve_gpus=settings.serve_gpus,
        bulk_resource=settings.bulk_resource,
        max_in_flight_per_key=settings.max_in_flight_per_key,
        max_rows_per_job=settings.max_rows_per_job,
        max_running=settings.max_running,
        max_upload_bytes=settings.max_upload_bytes,
    )


def ray_jobs(settings: JobsSettings) -> RayJobs:
    return RayJobs(
        dashboard_address(settings), runtime_env=settings.runtime_env, python=settings.python or sys.executable
    )


def allow_private_webhooks(settings: JobsSettings) -> bool:
    return settings.allow_private_webhooks or allow_private_from_env()


@serve.deployment(
    num_replicas=1,
    max_ongoing_requests=8,
    ray_actor_options={"num_cpus": 0},
    health_check_period_s=10,
    health_check_timeout_s=30,
)
class JobRunnerServer:
    def __init__(self, output_uri: str, settings: JobsSettings):
        store = JobStore(OutputStore.at(output_uri))
        dispatcher = WebhookDispatcher(store, allow_private=allow_private_webhooks(settings))
        # One delivery worker: a job's webhooks go out in the order they happened.
        self.deliveries = ThreadPoolExecutor(max_workers=1, thread_name_prefix="imagefab-webhooks")
        self.runner = JobRunner(store, ray_jobs(settings), queue_policy(settings), dispatcher, self.deliveries)
        self.stop = threading.Event()
        self.loop = threading.Thread(
            target=self.runner.run_forever, args=(self.stop, settings.tick_s), name="imagefab-job-runner", daemon=True
        )
        self.loop.start()
        log.info("job runner: following %s, submitting through %s", store.output.uri, self.runner.ray_jobs.address)

    def status(self) -> dict:
        return {**self.runner.status(), "running": self.loop.is_alive(), "ray_dashboard": self.runner.ray_jobs.address}

    def check_health(self) -> None:
        if not self.loop.is_alive():
            raise RuntimeError("the job runner's loop has stopped")

    def __del__(self) -> None:
        # Serve calls this when the replica is stopped: no tick starts after it.
        self.stop.set()
        self.deliveries.shutdown(wait=False)
