"""`imagefab review serve`: a small local page for the review queue.

Lists the images waiting for a person (app/review.py `pending_review`) with thumbnails and
approve / reject buttons; each click appends a decision through `app/review.decide`, and the item
leaves the queue. Standard library only (http.server), bound to 127.0.0.1:

  GET  /                 the page
  GET  /thumb/<id>       a thumbnail (WebP)
  GET  /api/pending      the queue as JSON
  POST /api/decide       {"image_ids": [...], "decision": "approved"|"rejected", "reviewer": "...", "note": "..."}

Writes need the per-server token the page carries (header X-Review-Token) and a loopback Host
header, so another web site open in the same browser cannot post decisions.
"""

from __future__ import annotations

import json
import re
import secrets
import threading
from html import escape
from http import HTTPStatus
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

from analysis.thumbs import thumbnail
from analysis.views import AnalysisError
from app.catalog.store import CatalogStore
from app.review import ReviewError, decide, pending_page
from app.storage import OutputStore, StorageError

IMAGE_ID = re.compile(r"^[0-9a-f]{8,64}$")
PAGE_SIZE = 60  # cards per page: the queue of a large catalog is read a page at a time
LOOPBACK = "127.0.0.1"
MAX_BODY = 64 * 1024

PAGE = """<!doctype html>
<html lang="en"><head><meta charset="utf-8"><title>imagefab review ({count})</title>
<link rel="icon" href="data:,">
<style>
body{{font:14px/1.45 system-ui,sans-serif;margin:24px auto;max-width:1100px;padding:0 16px;color:#1d1d1f}}
header{{display:flex;gap:16px;align-items:center;flex-wrap:wrap}} h1{{font-size:22px;margin:0}}
.grid{{display:grid;grid-template-columns:repeat(auto-fill,minmax(220px,1fr));gap:12px;margin-top:16px}}
.card{{border:1px solid #ddd;border-radius:8px;padding:8px;font-size:12px}}
.card img{{width:100%;height:auto;border-radius:4px;background:#f3f3f3;display:block}}
.why{{color:#b71c1c}} .buttons{{display:flex;gap:6px;margin-top:6px}}
button{{flex:1;padding:6px;border-radius:6px;border:1px solid #999;cursor:pointer;font-size:13px}}
button.approve{{background:#e8f5e9}} button.reject{{background:#ffebee}}
input{{padding:5px;border:1px solid #bbb;border-radius:4px}} .note{{width:100%;box-sizing:border-box;margin-top:6px}}
#status{{color:#555}} #status.error{{color:#b71c1c}}
</style></head>
<body>
<header><h1>Review queue: <span id="count">{count}</span> waiting</h1>
<label>Reviewer <input id="reviewer" value="{reviewer}" placeholder="your name" autocomplete="name"></label>
<span id="status" role="status"></span></header>
<p>Output {output}</p>
<div class="grid" id="queue">{cards}</div>
<p>{nav}</p>
<p id="empty" {empty_hidden}>Nothing is waiting for review.</p>
<script>
const TOKEN = {token};
async function decide(id, decision) {{
  const status = document.getElementById("status");
  const reviewer = document.getElementById("reviewer").value.trim();
  const card = document.getElementById("card-" + id);
  const note = card.querySelector(".note").value;
  status.className = ""; status.textContent = "saving…";
  const r = await fetch("/api/decide", {{method: "POST",
    headers: {{"Content-Type": "application/json", "X-Review-Token": TOKEN}},
    body: JSON.stringify({{image_ids: [id], decision, reviewer, note}})}});
  const body = await r.json();
  if (!r.ok) {{ status.className = "error"; status.textContent = body.error; return; }}
  card.remove();
  const left = document.querySelectorAll(".card").length;
  document.getElementById("count").textContent = left;
  document.getElementById("empty").hidden = left > 0;
  status.textContent = id.slice(0, 12) + " " + decision + " by " + reviewer;
}}
const who = document.getElementById("reviewer");
if (!who.value) who.value = localStorage.getItem("imagefab-reviewer") || "";
who.addEventListener("change", () => localStorage.setItem("imagefab-reviewer", who.value.trim()));
document.getElementById("queue").addEventListener("click", (e) => {{
  const b = e.target.closest("button[data-decision]");
  if (b) decide(b.closest(".card").dataset.imageId, b.dataset.decision);
}});
</script>
</body></html>
"""

CARD = """<div class="card" id="card-{id}" data-image-id="{id}">
<img src="/thumb/{id}" alt="image {id}" title="{prompt}" loading="lazy">
<div><code>{short}</code> · {run}</div><div>{row_key} · sharpness {sharpness}</div>
<div class="why">{reasons}</div>
<input class="note" placeholder="note (optional)" aria-label="note for {short}">
<div class="buttons"><button class="approve" data-decision="approved">Approve</button>
<button class="reject" data-decision="rejected">Reject</button></div></div>"""


def _card(r: dict) -> str:
    sharp = f"{r['sharpness']:.0f}" if r.get("sharpness") is not None else "-"
    return CARD.format(
        id=r["image_id"],
        short=r["image_id"][:12],
        run=escape(r.get("run_id") or ""),
        row_key=escape(r.get("row_key") or ""),
        sharpness=sharp,
        reasons=escape(", ".join(r.get("reasons") or [])),
        prompt=escape(r.get("prompt") or ""),
    )


class ReviewHandler(BaseHTTPRequestHandler):
    server: ReviewServer

    def log_message(self, format, *args):  # quiet: decisions are printed by the server
        pass

    def _send(self, status: int, body: bytes, content_type: str) -> None:
        self.send_response(status)
        self.send_header("Content-Type", content_type)
        self.send_header("Content-Length", str(len(body)))
        self.send_header("Cache-Control", "no-store")
        self.end_headers()
        self.wfile.write(body)

    def _json(self, status: int, obj) -> None:
        self._send(status, json.dumps(obj, default=str).encode(), "application/json")

    def _host_ok(self) -> bool:
        host = (self.headers.get("Host") or "").rsplit(":", 1)[0]
        return host in ("127.0.0.1", "localhost")

    def do_GET(self):
        if not self._host_ok():
            return self._json(HTTPStatus.FORBIDDEN, {"error": "loopback only"})
        path, _, query = self.path.partition("?")
        try:
            offset = max(0, int(dict(p.split("=", 1) for p in query.split("&") if "=" in p).get("offset", 0)))
        except ValueError:
            return self._json(HTTPStatus.BAD_REQUEST, {"error": "offset must be a whole number"})
        if path == "/":
            total, rows = pending_page(self.server.output, limit=PAGE_SIZE, offset=offset)
            self.server.remember(rows)
            nav = " ".join(
                f'<a href="/?offset={o}">{label}</a>'
                for o, label in ((offset - PAGE_SIZE, "previous"), (offset + PAGE_SIZE, "next"))
                if 0 <= o < total and o != offset
            )
            shown = f"{offset + 1}-{offset + len(rows)} of {total}" if rows else "none of {total}"
            html = PAGE.format(
                count=total,
                nav=f"Showing {shown}. {nav}",
                reviewer=escape(self.server.reviewer),
                output=escape(self.server.output.uri),
                cards="".join(_card(r) for r in rows),
                empty_hidden="hidden" if rows else "",
                token=json.dumps(self.server.token),
            )
            return self._send(HTTPStatus.OK, html.encode(), "text/html; charset=utf-8")
        if path == "/api/pending":
            return self._json(
                HTTPStatus.OK,
                [
                    {k: r[k] for k in ("image_id", "run_id", "created_at", "reasons", "sharpness", "prompt")}
                    for r in pending_page(self.server.output, limit=PAGE_SIZE, offset=offset)[1]
                ],
            )
        if path.startswith("/thumb/"):
            image_id = path.removeprefix("/thumb/")
            row = self.server.shown.get(image_id)  # the rows of the pages served: no catalog scan
            if row is None and IMAGE_ID.match(image_id):
                row = CatalogStore(self.server.output).find(image_id)
            data = thumbnail(self.server.output, row, size=256) if row else None
            if data is None:
                return self._json(HTTPStatus.NOT_FOUND, {"error": f"no image {image_id}"})
            return self._send(HTTPStatus.OK, data, "image/webp")
        return self._json(HTTPStatus.NOT_FOUND, {"error": f"no page {path}"})

    def do_POST(self):
        if not self._host_ok():
            return self._json(HTTPStatus.FORBIDDEN, {"error": "loopback only"})
        if self.path != "/api/decide":
            return self._json(HTTPStatus.NOT_FOUND, {"error": f"no endpoint {self.path}"})
        if not secrets.compare_digest(self.headers.get("X-Review-Token", ""), self.server.token):
            return self._json(HTTPStatus.FORBIDDEN, {"error": "missing or wrong X-Review-Token (reload the page)"})
        length = int(self.headers.get("Content-Length") or 0)
        if length > MAX_BODY:
            return self._json(HTTPStatus.REQUEST_ENTITY_TOO_LARGE, {"error": "request too large"})
        try:
            body = json.loads(self.rfile.read(length) or b"{}")
            ids = body.get("image_ids")
            if not isinstance(ids, list) or not all(isinstance(i, str) for i in ids):
                raise ReviewError("image_ids must be a list of image ids")
            decisions = decide(
                self.server.output,
                ids,
                str(body.get("decision", "")),
                str(body.get("reviewer", "")),
                note=str(body.get("note") or ""),
            )
        except (ValueError, AttributeError) as e:  # ReviewError is a ValueError, as is bad JSON
            return self._json(HTTPStatus.BAD_REQUEST, {"error": str(e)})
        except StorageError as e:
            return self._json(HTTPStatus.INTERNAL_SERVER_ERROR, {"error": str(e)})
        for d in decisions:
            self.server.announce(f"{d.image_id}: {d.decision} by {d.reviewer}")
        return self._json(HTTPStatus.OK, {"decided": [d.__dict__ for d in decisions]})


class ReviewServer(ThreadingHTTPServer):
    daemon_threads = True

    def __init__(self, output: OutputStore, port: int = 0, reviewer: str = "", quiet: bool = False):
        super().__init__((LOOPBACK, port), ReviewHandler)
        self.output = output
        self.reviewer = reviewer
        self.token = secrets.token_urlsafe(24)
        self.quiet = quiet
        self.shown: dict[str, dict] = {}  # rows of the pages served, for their thumbnails
        self._shown_lock = threading.Lock()

    def remember(self, rows: list[dict]) -> None:
        with self._shown_lock:
            if len(self.shown) > 10 * PAGE_SIZE:
                self.shown.clear()
            self.shown.update((r["image_id"], r) for r in rows)

    @property
    def url(self) -> str:
        return f"http://{LOOPBACK}:{self.server_address[1]}/"

    def announce(self, line: str) -> None:
        if not self.quiet:
            print(line, flush=True)


def make_server(output: OutputStore | str, port: int = 0, reviewer: str = "", quiet: bool = False) -> ReviewServer:
    output = OutputStore.of(output)
    return ReviewServer(output, port, reviewer, quiet)


def serve(output: OutputStore | str, port: int = 8765, reviewer: str = "", timeout_s: float | None = None) -> None:
    """Serve until Ctrl-C (or `timeout_s` seconds)."""
    try:
        server = make_server(output, port, reviewer)
    except OSError as e:
        raise AnalysisError(f"cannot listen on {LOOPBACK}:{port} ({e.strerror or e}); try another --port") from e
    print(f"review page: {server.url}  ({pending_page(server.output, limit=1)[0]} waiting; Ctrl-C to stop)", flush=True)
    timer = threading.Timer(timeout_s, server.shutdown) if timeout_s else None
    if timer:
        timer.daemon = True
        timer.start()
    try:
        server.serve_forever(poll_interval=0.2)
    except KeyboardInterrupt:
        pass
    finally:
        if timer:
            timer.cancel()
        server.server_close()
