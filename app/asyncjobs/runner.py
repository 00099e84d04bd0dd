"""The loop that moves jobs along: starts queued jobs in queue order when the bulk lane has room,
brings running jobs' states in line with Ray's, and hands events to the webhook dispatcher.

One runner per output store: `imagefab serve` runs `run_forever` in a single-replica deployment
(app/serve/jobrunner.py); anything else may call `tick` every few seconds. Everything it knows is
re-read from the store at each tick, so a restarted runner carries on where the last one stopped.
Two runners at once (a replica being replaced) start nothing twice: a start's submission id is
fixed per job and attempt, and a state moves only along legal transitions; a webhook may then be
sent twice (deliveries are at least once, as Standard Webhooks expects receivers to handle).

Webhooks of state changes go through the job's outbox (app/asyncjobs/records.py): each change a
webhook asked for is recorded with the change itself, and every tick hands the outbox entries not
yet settled (delivered, or given up after the retries) to the delivery worker, in order. So a
runner that dies between a change and its webhook, a change made elsewhere (a cancel through the
ingress), or a tick that fails after the change, still ends with the webhook sent; a resent
entry keeps its `webhook-id`. Progress webhooks are periodic and go out directly.
"""

from __future__ import annotations

import logging
import threading
import time
from concurrent.futures import Executor
from dataclasses import dataclass, field

from app.asyncjobs.queue import QueuePolicy, next_to_start
from app.asyncjobs.records import TERMINAL, JobRecord, JobStore
from app.asyncjobs.submit import RayJobs, progress
from app.asyncjobs.webhooks import WebhookDispatcher

log = logging.getLogger("imagefab.asyncjobs")
OUTBOX_WINDOW_S = 24 * 3600.0


@dataclass
class JobRunner:
    store: JobStore
    ray_jobs: RayJobs
    policy: QueuePolicy
    dispatcher: WebhookDispatcher | None = None
    # Where deliveries run: None, in the tick itself; an executor (one worker keeps each job's events
    # in order), beside it, so a slow or failing receiver's retries never hold up starting jobs.
    deliveries: Executor | None = None
    ticks: int = 0
    last_error: str | None = None
    last_tick_at: float | None = None
    _lock: threading.Lock = field(default_factory=threading.Lock, repr=False)
    _problems: dict[tuple[str, str], str] = field(default_factory=dict, repr=False)  # (what, job id) -> error
    # Outbox keys settled per job, read from its events once per runner; keys handed to the worker.
    _settled: dict[str, set[str]] = field(default_factory=dict, repr=False)
    _handed: set[tuple[str, str]] = field(default_factory=set, repr=False)

    def run_forever(self, stop: threading.Event, every_s: float = 1.0) -> None:
        """`tick` every `every_s` seconds until `stop` is set. A tick that fails (the store or the
        cluster unreachable for a while) is logged and the next one tries again."""
        while not stop.is_set():
            try:
                self.tick()
                self.last_error = None
            except Exception as e:
                error = f"{type(e).__name__}: {e}"
                if error != self.last_error:  # once per distinct failure, not every second
                    log.warning("job runner: tick failed (%s)", error)
                self.last_error = error
            stop.wait(every_s)

    def status(self) -> dict:
        return {"ticks": self.ticks, "last_tick_at": self.last_tick_at, "last_error": self.last_error}

    def tick(self) -> None:
        with self._lock:  # `tick` from the loop and from a caller never interleave
            self._tick()
            self.ticks += 1
            self.last_tick_at = time.time()

    def _tick(self) -> None:
        # One read of the store per tick; a record this tick changes replaces its entry.
        jobs = {rec.id: rec for rec in self.store.all()}
        for rec in list(jobs.values()):
            if rec.state == "running":
                try:
                    jobs[rec.id] = self._follow(rec)
                    self._problems.pop(("follow", rec.id), None)
                except Exception as e:  # the cluster or the store unreachable, another runner first: next tick
                    if self._is_new(("follow", rec.id), str(e)):
                        log.warning("job %s: cannot follow (%s: %s)", rec.id, type(e).__name__, e)
        # A job just created has its spec written a moment later; until then it waits, holding no slot.
        ready = [r for r in jobs.values() if r.state != "queued" or r.spec_uri]
        for rec in next_to_start(ready, self.policy):
            try:
                started = self.ray_jobs.start(self.store, rec)
            except Exception as e:
                # Recorded once per job and reason: a cluster that is down for an hour is one event, not 3600.
                if self._is_new(("start", rec.id), str(e)):
                    log.warning("job %s: cannot start (%s)", rec.id, e)
                    self.store.event(rec.id, "start_failed", error=str(e))
                continue
            jobs[rec.id] = started
            self._problems.pop(("start", rec.id), None)
            log.info("job %s: started as Ray job %s", rec.id, started.submissions[-1])
        self.flush_outbox(list(jobs.values()))

    def _follow(self, rec: JobRecord) -> JobRecord:
        now = self.ray_jobs.sync(self.store, rec)
        if now.state in TERMINAL:
            log.info("job %s: %s", now.id, now.state)
            return now  # its webhook is in the outbox
        hook = now.webhook or {}
        if "progress" not in hook.get("events", ()):
            return now
        p = progress(self.store, now)
        last = now.metadata.get("progress_sent", {"at": now.started_at or 0.0, "images": 0})
        every_n, every_s = hook.get("progress_every_images"), hook.get("progress_every_s", 60.0)
        due_n = every_n is not None and p["images_done"] - last["images"] >= every_n
        due_t = time.time() - last["at"] >= every_s and p["images_done"] > last["images"]
        if due_n or due_t:
            now.metadata["progress_sent"] = {"at": time.time(), "images": p["images_done"]}
            self.store.update(now)
            self.notify(now, "progress", {"state": "running", "progress": p})
        return now

    # --- the outbox ------------------------------------------------------------------------------

    def flush_outbox(self, jobs: list[JobRecord] | None = None, *, now: float | None = None) -> None:
        """Hand every outbox entry not yet settled to the delivery worker, oldest first (of `jobs`,
        else of every job in the store). Entries older than `OUTBOX_WINDOW_S` are left: a
        receiver down for that long has stopped listening (Standard Webhooks' own retry schedule
        ends within about a day)."""
        if self.dispatcher is None:
            return
        now = time.time() if now is None else now
        for rec in self.store.all() if jobs is None else jobs:
            fresh = [e for e in rec.outbox if now - e["at"] < OUTBOX_WINDOW_S]
            if not rec.webhook or not fresh:
                continue
            if rec.id not in self._settled:
                self._settled[rec.id] = {
                    ev["key"]
                    for ev in self.store.events(rec.id)
                    if "key" in ev
                    and (ev["type"] == "webhook_delivered" or (ev["type"] == "webhook_failed" and ev.get("final")))
                }
            for entry in fresh:
                if entry["key"] in self._settled[rec.id] or (rec.id, entry["key"]) in self._handed:
                    continue
                self._handed.add((rec.id, entry["key"]))
                if self.deliveries is None:
                    self._deliver_entry(rec.id, entry)
                else:
                    self.deliveries.submit(self._deliver_entry, rec.id, entry)

    def _deliver_entry(self, job_id: str, entry: dict) -> None:
        assert self.dispatcher is not None
        try:
            rec = self.store.load(job_id)
            data: dict = {"state": "running" if entry["event"] == "started" else entry["event"]}
            if entry["event"] == "started":
                data["submission_id"] = entry.get("submission_id")
            else:
                try:
                    data["progress"] = progress(self.store, rec)
                except Exception as e:  # the catalog unreadable now: the state change is still news
                    log.warning("job %s: %s webhook sent without progress (%s)", job_id, entry["event"], e)
                    data["progress"] = None
                data["error"] = rec.error
            self.dispatcher.deliver(job_id, entry["event"], data, key=entry["key"])
            # Delivered or given up (recorded as final): settled either way.
            self._settled.setdefault(job_id, set()).add(entry["key"])
        except Exception as e:  # the store unwritable: the next tick tries again
            log.warning("job %s: webhook %s not delivered (%s: %s)", job_id, entry["event"], type(e).__name__, e)
        finally:
            self._handed.discard((job_id, entry["key"]))

    def _is_new(self, what: tuple[str, str], error: str) -> bool:
        new = self._problems.get(what) != error
        self._problems[what] = error
        return new

    def notify(self, rec: JobRecord, event: str, data: dict) -> None:
        if self.dispatcher is None or not rec.webhook:
            return
        if self.deliveries is None:
            self.dispatcher.deliver(rec.id, event, data)
        else:
            self.deliveries.submit(self._deliver, self.dispatcher, rec.id, event, data)

    @staticmethod
    def _deliver(dispatcher: WebhookDispatcher, job_id: str, event: str, data: dict) -> None:
        try:
            dispatcher.deliver(job_id, event, data)
        except Exception as e:  # the store unwritable: nothing else would ever report it
            log.warning("job %s: webhook %s not delivered (%s: %s)", job_id, event, type(e).__name__, e)
