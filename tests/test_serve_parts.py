"""The Serve app's Ray-free parts, called directly: URL signing, the A1111 scheduler mapping and
progress report."""

from __future__ import annotations

import asyncio

import pytest

from app.serve.core import (
    A1111_SCHEDULES,
    A1111Task,
    RequestError,
    a1111_progress_report,
    a1111_schedule_label,
    a1111_scheduler,
)
from app.serve.urls import SECRET_PATH, UrlSignatureError, UrlSigner, url_secret
from app.storage import OutputStore

NAME = "0123456789abcdef0123456789abcdef.webp"


def test_a_signed_url_checks_only_for_its_own_name_quality_and_time():
    signer = UrlSigner(b"s" * 32, ttl_s=60)
    params = dict(p.split("=", 1) for p in signer.query(NAME, now=1000, quality=80).split("&"))
    assert params["expires"] == "1060" and params["quality"] == "80"
    signer.check(NAME, params["expires"], params["sig"], 80, now=1059)
    for name, expires, sig, quality, now, problem in [
        (NAME, params["expires"], params["sig"], 80, 1061, "expired"),
        (NAME.replace(".webp", ".png"), params["expires"], params["sig"], 80, 1000, "does not match"),
        (NAME, params["expires"], params["sig"], 81, 1000, "does not match"),
        (NAME, "99999", params["sig"], 80, 1000, "does not match"),
        (NAME, params["expires"], None, 80, 1000, "needs both"),
        (NAME, "soon", params["sig"], 80, 1000, "not a Unix time"),
    ]:
        with pytest.raises(UrlSignatureError, match=problem):
            signer.check(name, expires, sig, quality, now)
    with pytest.raises(UrlSignatureError, match="does not match"):  # another server's secret
        UrlSigner(b"t" * 32, ttl_s=60).check(NAME, params["expires"], params["sig"], 80, now=1000)


def test_the_url_secret_is_made_once_and_kept_in_the_output(tmp_path, monkeypatch):
    monkeypatch.delenv("IMAGEFAB_URL_SECRET", raising=False)
    store = OutputStore.at(str(tmp_path))
    first = url_secret(store)
    assert len(first) == 64 and url_secret(OutputStore.at(str(tmp_path))) == first  # another replica agrees
    assert (tmp_path / SECRET_PATH).stat().st_mode & 0o077 == 0
    assert url_secret(store, "configured-secret-0123456789") == b"configured-secret-0123456789"
    monkeypatch.setenv("IMAGEFAB_URL_SECRET", "from-the-environment-0123")
    assert url_secret(store) == b"from-the-environment-0123"


@pytest.mark.parametrize(
    "sampler, schedule, combination, expected",
    [
        (None, None, "euler", None),  # the combination's own
        ("Euler a", None, "euler", "euler_a"),
        ("Euler a", "Automatic", "euler", "euler_a"),
        ("DPM++ 2M", "Karras", "euler", "dpmpp_2m_karras"),
        ("DPM++ 2M", "karras", "euler", "dpmpp_2m_karras"),
        ("DPM++ 2M Karras", "Karras", "euler", "dpmpp_2m_karras"),
        (None, "Karras", "dpmpp_2m", "dpmpp_2m_karras"),  # applied to the combination's scheduler
        ("Euler", "SGM Uniform", "ddim", "euler_trailing"),
        ("Euler a", "SGMUniform", "ddim", "euler_a_trailing"),
        ("euler", None, "ddim", "euler"),  # imagefab's own names are accepted too
    ],
)
def test_a1111_sampler_and_scheduler_map_to_imagefab_schedulers(sampler, schedule, combination, expected):
    chosen = a1111_scheduler(sampler, schedule, combination)
    assert chosen == expected
    if chosen and schedule and schedule.casefold() != "automatic":
        assert a1111_schedule_label(chosen) == next(s.label for s in A1111_SCHEDULES if s.matches(schedule))


@pytest.mark.parametrize(
    "sampler, schedule, field",
    [
        ("Warp Drive", None, "sampler_name"),
        ("Euler", "Exponential", "scheduler"),
        ("Euler", "Karras", "scheduler"),  # no Karras variant of Euler here
        ("DDIM", "SGM Uniform", "scheduler"),
    ],
)
def test_a1111_schedules_that_cannot_be_rendered_name_the_field(sampler, schedule, field):
    with pytest.raises(RequestError) as err:
        a1111_scheduler(sampler, schedule, "euler")
    assert err.value.status == 422 and err.value.field == field


def test_a1111_progress_counts_the_callers_images_back_and_estimates_as_a1111_does():
    idle = a1111_progress_report([], now=100.0)
    assert idle["progress"] == 0.0 and idle["state"]["job_count"] == 0 and idle["state"]["job"] == ""
    first = A1111Task(asyncio.Event(), started=100.0, images=4, steps=30, done=1)
    second = A1111Task(asyncio.Event(), started=104.0, images=2, steps=20)
    p = a1111_progress_report([second, first], now=110.0)
    # 1 of 6 images back, 10 s after the oldest request began: 10 / (1/6) - 10 = 50 s left.
    assert p["progress"] == round(1 / 6, 4) and p["eta_relative"] == 50.0 and p["textinfo"] == "1/6 images"
    state = p["state"]
    assert state["job"] == "txt2img" and state["job_count"] == 2 and state["sampling_steps"] == 30
    assert state["job_timestamp"] == "19700101000140" and not state["interrupted"]
    first.done, second.done = 4, 2
    assert a1111_progress_report([first, second], now=130.0)["progress"] == 1.0
    second.interrupt.set()
    assert a1111_progress_report([first, second], now=130.0)["state"]["interrupted"]
    planning = A1111Task(asyncio.Event(), started=100.0)  # not planned yet: no images known
    assert a1111_progress_report([planning], now=101.0)["progress"] == 0.0
