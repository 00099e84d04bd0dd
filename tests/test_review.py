"""Review decisions: an append-only store beside the catalog, the queue, and the CLI."""

from __future__ import annotations

import hashlib
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest
from analysis_catalog import RUNS, cli, image_id, make_output

from app.review import ReviewError, ReviewStore, decide, pending_review
from app.storage import OutputStore

T0 = datetime(2026, 12, 4, 9, 0, tzinfo=UTC)


def digests(root: Path, sub: str) -> dict[str, str]:
    return {
        str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted((root / sub).rglob("*"))
        if p.is_file()
    }


@pytest.fixture()
def output(tmp_path):
    make_output(str(tmp_path))
    return tmp_path


def test_queue_lists_review_rows_without_a_decision(output):
    assert [r["image_id"] for r in pending_review(str(output))] == [image_id(5), image_id(7)]
    only_b = pending_review(str(output), run=RUNS["b"][0])
    assert [r["image_id"] for r in only_b] == [image_id(7)]
    assert only_b[0]["reasons"] == ["borderline_low_contrast"] and only_b[0]["variants"][0]["preset"] == "thumbnail"


def test_decisions_are_appended_and_the_latest_wins(output):
    catalog_before = digests(output, "catalog")
    decide(str(output), [image_id(5)], "approved", "alice", note="fine for web", now=T0)
    assert [r["image_id"] for r in pending_review(str(output))] == [image_id(7)]
    # A second decision on the same image: a new file, and it wins.
    decide(str(output), [image_id(5), image_id(7)], "rejected", "bob", now=T0 + timedelta(minutes=5))
    files = sorted((output / "reviews" / "decisions").rglob("*.parquet"))
    assert len(files) == 2 and all(f.parent.name == "date=2026-12-04" for f in files)
    store = ReviewStore(OutputStore.at(str(output)))
    assert store.read().num_rows == 3
    latest = store.latest()
    assert {i: (d.decision, d.reviewer) for i, d in latest.items()} == {
        image_id(5): ("rejected", "bob"),
        image_id(7): ("rejected", "bob"),
    }
    assert latest[image_id(5)].decided_at == T0 + timedelta(minutes=5)
    assert pending_review(str(output)) == []
    # The catalog files were never touched.
    assert digests(output, "catalog") == catalog_before


@pytest.mark.parametrize(
    "ids, decision, reviewer, message",
    [
        (["0" * 32], "approved", "alice", "unknown image id(s) " + "0" * 32),
        ([image_id(5), "f" * 32], "approved", "alice", "unknown image id(s) " + "f" * 32),
        ([image_id(6)], "approved", "alice", f"{image_id(6)} is rejected"),
        ([image_id(10)], "rejected", "alice", f"{image_id(10)} is failed"),
        ([image_id(5)], "maybe", "alice", "decision must be one of approved, rejected, not 'maybe'"),
        ([image_id(5)], "approved", "  ", "needs the reviewer's name"),
        ([], "approved", "alice", "no image ids given"),
    ],
)
def test_bad_decisions_fail_before_anything_is_written(output, ids, decision, reviewer, message):
    with pytest.raises(ReviewError, match=message.replace("(", r"\(").replace(")", r"\)")):
        decide(str(output), ids, decision, reviewer)
    assert not (output / "reviews").exists()


def test_an_accepted_image_can_be_taken_down(output):
    decide(str(output), [image_id(1)], "rejected", "legal", note="logo visible", now=T0)
    latest = ReviewStore(OutputStore.at(str(output))).latest()
    assert latest[image_id(1)].note == "logo visible"


def test_cli_list_approve_reject(output, capsys):
    assert cli("review", "list", "--output", str(output)) == 0
    out = capsys.readouterr().out
    assert image_id(5) in out and image_id(7) in out and "(2 rows)" in out

    assert cli("review", "approve", image_id(5), "--by", "alice", "--note", "ok", "--output", str(output)) == 0
    assert f"{image_id(5)}: approved by alice" in capsys.readouterr().out
    assert cli("review", "reject", image_id(7), "--by", "bob", "--output", str(output)) == 0
    capsys.readouterr()
    assert cli("review", "list", "--output", str(output)) == 0
    assert "no images waiting for review" in capsys.readouterr().out

    assert cli("review", "list", "--output", str(output), "--run", "bbbb") == 0  # a unique part of a run_id
    assert "in shop-20261203-100000-bbbb" in capsys.readouterr().out


def test_cli_errors_are_one_line_not_a_traceback(output, tmp_path, capsys):
    assert cli("review", "approve", "0" * 32, "--by", "alice", "--output", str(output)) == 2
    err = capsys.readouterr().err
    assert err.startswith("imagefab: error: unknown image id(s) " + "0" * 32) and "Traceback" not in err
    assert cli("review", "list", "--output", str(output), "--run", "nope") == 2
    assert "no run 'nope' in this catalog; the runs are: " in capsys.readouterr().err
    with pytest.raises(SystemExit):  # argparse: --by is required
        cli("review", "approve", image_id(5), "--output", str(output))
    assert cli("review", "list", "--output", str(tmp_path / "empty")) == 2
    assert f"no catalog under {tmp_path / 'empty'}/catalog" in capsys.readouterr().err


def test_the_queue_is_read_a_page_at_a_time(output, capsys):
    from app.review import pending_page

    assert pending_page(str(output), limit=1) == (2, pending_review(str(output))[:1])
    total, second = pending_page(str(output), limit=1, offset=1)
    assert total == 2 and [r["image_id"] for r in second] == [image_id(7)] and second[0]["prompt"]
    assert pending_page(str(output), limit=5, offset=2) == (2, [])
    with pytest.raises(ReviewError, match="--limit"):
        pending_page(str(output), limit=0)
    assert cli("review", "list", "--limit", "1", "--output", str(output)) == 0
    captured = capsys.readouterr()
    assert image_id(5) in captured.out and image_id(7) not in captured.out
    assert "1-1 of 2 waiting; next: --offset 1" in captured.err
    assert cli("review", "list", "--limit", "1", "--offset", "1", "--output", str(output)) == 0
    assert image_id(7) in capsys.readouterr().out


def test_review_page_pages_and_serves_thumbnails_of_its_rows(output, monkeypatch):
    import threading
    import urllib.request

    import analysis.review_page as review_page

    monkeypatch.setattr(review_page, "PAGE_SIZE", 1)
    server = review_page.make_server(str(output), port=0, quiet=True)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        first = urllib.request.urlopen(server.url).read().decode()
        assert image_id(5) in first and image_id(7) not in first and 'href="/?offset=1">next' in first
        second = urllib.request.urlopen(server.url + "?offset=1").read().decode()
        assert image_id(7) in second and 'href="/?offset=0">previous' in second
        assert set(server.shown) == {image_id(5), image_id(7)}  # thumbnails come from these rows
    finally:
        server.shutdown()
        server.server_close()
