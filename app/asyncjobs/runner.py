"""The loop that moves jobs along: starts queued jobs in queue order when the bulk lane has room,
brings running jobs' states in line with Ray's, and hands events to the webhook dispatcher.

One runner per output store (a single process or actor calls `tick` every few seconds); everything
it knows is re-read from the store at each tick, so a restarted runner carries on where the last
one stopped.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass

from app.asyncjobs.queue import QueuePolicy, next_to_start
from app.asyncjobs.records import TERMINAL, JobError, JobRecord, JobStore
from app.asyncjobs.submit import RayJobs, progress
from app.asyncjobs.webhooks import WebhookDispatcher

log = logging.getLogger("imagefab.asyncjobs")


@dataclass
class JobRunner:
    store: JobStore
    ray_jobs: RayJobs
    policy: QueuePolicy
    dispatcher: WebhookDispatcher | None = None

    def tick(self) -> None:
        for rec in self.store.all():
            if rec.state == "running":
                try:
                    self._follow(rec)
                except JobError as e:  # the cluster is unreachable, or another runner moved it first
                    log.warning("job %s: cannot follow (%s)", rec.id, e)
        for rec in next_to_start(self.store.all(), self.policy):
            try:
                started = self.ray_jobs.start(self.store, rec)
            except Exception as e:
                log.warning("job %s: cannot start (%s)", rec.id, e)
                self.store.event(rec.id, "start_failed", error=str(e))
                continue
            log.info("job %s: started as Ray job %s", rec.id, started.submissions[-1])
            self._notify(started, "started", {"state": "running", "submission_id": started.submissions[-1]})

    def _follow(self, rec: JobRecord) -> None:
        now = self.ray_jobs.sync(self.store, rec)
        p = progress(self.store, now)
        if now.state in TERMINAL:
            log.info("job %s: %s", now.id, now.state)
            self._notify(now, now.state, {"state": now.state, "progress": p, "error": now.error})
            return
        hook = now.webhook or {}
        if "progress" not in hook.get("events", ()):
            return
        last = now.metadata.get("progress_sent", {"at": now.started_at or 0.0, "images": 0})
        every_n, every_s = hook.get("progress_every_images"), hook.get("progress_every_s", 60.0)
        due_n = every_n is not None and p["images_done"] - last["images"] >= every_n
        due_t = time.time() - last["at"] >= every_s and p["images_done"] > last["images"]
        if due_n or due_t:
            now.metadata["progress_sent"] = {"at": time.time(), "images": p["images_done"]}
            self.store.update(now)
            self._notify(now, "progress", {"state": "running", "progress": p})

    def _notify(self, rec: JobRecord, event: str, data: dict) -> None:
        if self.dispatcher is not None and rec.webhook:
            self.dispatcher.deliver(rec.id, event, data)
