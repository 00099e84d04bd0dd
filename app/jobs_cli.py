"""`imagefab jobs submit|list|show|cancel|resume|watch`: the asynchronous jobs API from a shell.

Talks HTTP to a server that mounts the jobs routes (`--server`, or $IMAGEFAB_SERVER; the key from
`--key` or $IMAGEFAB_API_KEY). Imports nothing heavy."""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path
from typing import Any, TextIO

EXIT_FAILED = 1


class JobsCliError(RuntimeError):
    pass


def add_jobs_cli(sub) -> None:
    j = sub.add_parser("jobs", help="asynchronous jobs on a server: submit, list, show, cancel, resume, watch")
    j.add_argument("--server", default=os.environ.get("IMAGEFAB_SERVER", "http://127.0.0.1:8000"))
    j.add_argument("--key", default=os.environ.get("IMAGEFAB_API_KEY"), help="API key (default $IMAGEFAB_API_KEY)")
    js = j.add_subparsers(dest="jobs_command", required=True)
    s = js.add_parser("submit", help="submit a spec (YAML) with optional rows (JSON list or CSV-free JSONL)")
    s.add_argument("spec", help="job spec YAML")
    s.add_argument("--rows", help="a JSON file with a list of row objects (replaces the spec's input)")
    s.add_argument("--priority", type=int, default=0)
    s.add_argument("--idempotency-key")
    s.add_argument("--webhook", help="webhook URL")
    s.add_argument("--events", default="succeeded,failed,cancelled", help="webhook events, comma-separated")
    ls = js.add_parser("list", help="your jobs, newest first")
    ls.add_argument("--state")
    ls.add_argument("--limit", type=int, default=20)
    for name in ("show", "cancel", "resume", "watch"):
        c = js.add_parser(name, help=f"{name} a job")
        c.add_argument("job_id")
        if name == "watch":
            c.add_argument("--every", type=float, default=2.0, help="seconds between polls")
    j.set_defaults(func=cmd_jobs)


def _client(args):
    import httpx

    headers = {"authorization": f"Bearer {args.key}"} if args.key else {}
    return httpx.Client(base_url=args.server, headers=headers, timeout=30)


def _call(client, method: str, path: str, **kw) -> dict:
    r = client.request(method, path, **kw)
    try:
        body = r.json()
    except ValueError:
        body = {"error": {"message": r.text[:500]}}
    if r.status_code >= 400:
        raise JobsCliError(f"{method} {path}: {r.status_code} {body.get('error', {}).get('message', body)}")
    return body


def bar(p: dict, width: int = 24) -> str:
    done, total = p["images_done"], p.get("images_total")
    frac = done / total if total else 0.0
    filled = round(frac * width)
    eta = f"ETA {p['eta_seconds']:.0f}s" if p.get("eta_seconds") is not None else "ETA ?"
    of = f"/{total}" if total else ""
    return f"[{'#' * filled}{'.' * (width - filled)}] {done}{of} {p['images_per_second']:.2f} img/s {eta}"


def run_jobs_command(args, client, out: TextIO = sys.stdout, sleep=time.sleep) -> int:
    cmd = args.jobs_command
    if cmd == "submit":
        import yaml

        body: dict[str, Any] = {"spec_yaml": Path(args.spec).read_text(), "priority": args.priority}
        if args.rows:
            body["rows"] = json.loads(Path(args.rows).read_text())
        if args.webhook:
            body["webhook"] = {"url": args.webhook, "events": [e.strip() for e in args.events.split(",") if e.strip()]}
        yaml.safe_load(body["spec_yaml"])  # a local YAML error is named before any request
        headers = {"idempotency-key": args.idempotency_key} if args.idempotency_key else {}
        job = _call(client, "POST", "/v1/jobs", json=body, headers=headers)
        print(json.dumps(job, indent=1), file=out)
        return 0
    if cmd == "list":
        params = {"limit": args.limit, **({"state": args.state} if args.state else {})}
        for j in _call(client, "GET", "/v1/jobs", params=params)["data"]:
            pos = f" (position {j['queue_position']})" if j.get("queue_position") else ""
            print(
                f"{j['id']}  {j['state']}{pos}  prio {j['priority']}  {j['progress']['images_done']} images", file=out
            )
        return 0
    if cmd == "show":
        print(json.dumps(_call(client, "GET", f"/v1/jobs/{args.job_id}"), indent=1), file=out)
        return 0
    if cmd in ("cancel", "resume"):
        j = _call(client, "POST", f"/v1/jobs/{args.job_id}/{cmd}")
        print(f"{j['id']}  {j['state']}", file=out)
        return 0
    # watch: a progress bar until the job is over
    while True:
        j = _call(client, "GET", f"/v1/jobs/{args.job_id}")
        print(f"{j['state']:<9} {bar(j['progress'])}", file=out, flush=True)
        if j["state"] in ("succeeded", "failed", "cancelled"):
            return 0 if j["state"] == "succeeded" else EXIT_FAILED
        sleep(args.every)


def cmd_jobs(args: argparse.Namespace) -> int:
    try:
        with _client(args) as client:
            return run_jobs_command(args, client)
    except (JobsCliError, OSError, ValueError) as e:
        print(f"imagefab jobs: error: {e}", file=sys.stderr)
        return 2
