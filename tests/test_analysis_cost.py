"""The cost model: repriced compute, storage, per accepted image, against a hosted API."""

from __future__ import annotations

import json

import pytest
import yaml
from analysis_catalog import RUNS, cli, make_output

import analysis
from analysis.cost import cost_report
from app.cost import PriceTable

PRICES = {
    "gpu_hourly": {"H100": 3.6},
    "cpu_core_hourly": 0.036,
    "storage_gb_month": 0.02,
    "hosted_api_gbp_per_image": [0.01, 0.00001, 0.000001],
    "usd_per_gbp": 1.25,
    "gpu_node": "H100",
    "gpu_node_monthly_usd": 1000.0,
}


@pytest.fixture(scope="module")
def output(tmp_path_factory):
    root = tmp_path_factory.mktemp("cost")
    make_output(str(root))
    return root


@pytest.fixture(scope="module")
def prices_file(tmp_path_factory):
    path = tmp_path_factory.mktemp("prices") / "prices.yaml"
    path.write_text(yaml.safe_dump(PRICES))
    return path


def test_cost_model_by_hand(output, prices_file):
    prices = PriceTable.from_yaml(str(prices_file))
    report = cost_report(analysis.connect(str(output), file_sizes=True), prices)
    # Latest rows: H100 20 device-s (P-9's failed first try cost nothing), CPU generator 20 s,
    # 6.5 CPU-s of QC and post-processing; 11 rendered, 7 accepted.
    assert (report.images, report.rendered, report.accepted) == (12, 11, 7)
    assert report.gpu_seconds == pytest.approx(40.0) and report.cpu_seconds == pytest.approx(6.5)
    gpu_usd = 20 * 3.6 / 3600 + 20 * 0.036 / 3600
    cpu_usd = 6.5 * 0.036 / 3600
    assert report.gpu_usd == pytest.approx(gpu_usd) and report.cpu_usd == pytest.approx(cpu_usd)
    assert report.usd_per_accepted == pytest.approx((gpu_usd + cpu_usd) / 7)
    assert report.usd_per_image == pytest.approx((gpu_usd + cpu_usd) / 11)
    stored = sum(p.stat().st_size for p in (output / "images").rglob("*") if p.is_file())
    assert report.master_bytes + report.variant_bytes == stored
    assert report.storage_usd_month == pytest.approx(stored / 2**30 * 0.02)
    assert {a["accelerator"]: a["hourly_usd"] for a in report.by_accelerator} == {
        "cuda:NVIDIA H100 80GB HBM3": 3.6,
        "cpu:threads=1": 0.036,
    }

    # Against the API: the node's capacity from H100 seconds only (5 accepted in 20 s).
    assert report.gpu_seconds_per_accepted == pytest.approx(4.0)
    marginal = cpu_usd / 7 + report.storage_usd_month / 7
    cheap, cheaper, cheapest = report.api
    assert cheap.api_usd == pytest.approx(0.0125) and cheap.ratio == pytest.approx(report.usd_per_accepted / 0.0125)
    assert cheap.break_even_images_per_month == pytest.approx(1000 / (0.0125 - marginal))
    assert cheap.node_capacity_per_month == pytest.approx(730 * 3600 / 4) and cheap.node_reaches_break_even
    assert cheaper.break_even_images_per_month == pytest.approx(1000 / (0.0000125 - marginal))
    assert cheaper.node_reaches_break_even is False
    assert cheapest.break_even_images_per_month is None  # the API costs less than QC alone

    text = report.render()
    assert "7 accepted" in text and "breaks even at" in text and "so it cannot" in text and "never breaks even" in text


def test_per_combination_and_template(output):
    report = cost_report(analysis.connect(str(output), file_sizes=True), PriceTable())
    per_image = (2 * 2.99 + 0.5 * 0.048) / 3600
    studio = {r["template"]: r for r in report.by_template}["studio"]
    assert studio["accepted"] == 5 and studio["usd_per_accepted"] == pytest.approx(7 * per_image / 5)
    lifestyle = {r["template"]: r for r in report.by_template}["lifestyle"]
    assert lifestyle["usd_per_accepted"] is None and lifestyle["rendered"] == 2
    stacks = {r["model_stack"]: r for r in report.by_combination}
    assert stacks["tiny-sdxl:1 + style:1@0.8"]["usd_per_accepted"] == pytest.approx(7 * per_image / 5)


def test_cost_cli_for_one_run_as_json(output, prices_file, capsys):
    assert cli("cost", "cccc", "--prices", str(prices_file), "--output", str(output), "--format", "json") == 0
    data = json.loads(capsys.readouterr().out)
    assert data["scope"] == RUNS["c"][0] and data["accepted"] == 2
    assert data["compute_usd"] == pytest.approx(20 * 0.036 / 3600 + 2 * 0.036 / 3600)
    # no H100 images in this run: the capacity comes from the CPU generator, and the text says so
    assert cli("cost", "cccc", "--output", str(output)) == 0
    assert "measured on cpu:threads=1, not on the H100 node" in capsys.readouterr().out


def test_price_files_old_and_bad(tmp_path, output, capsys):
    old = tmp_path / "old.yaml"
    old.write_text("gpu_hourly: {L4: 0.7}\ncpu_core_hourly: 0.05\n")
    p = PriceTable.from_yaml(str(old))
    assert p.device_hourly("cuda:NVIDIA L4") == 0.7 and p.hosted_api_gbp_per_image == (0.01, 0.02, 0.03)
    one = tmp_path / "one.yaml"
    one.write_text("hosted_api_gbp_per_image: 0.02\n")
    assert PriceTable.from_yaml(str(one)).hosted_api_gbp_per_image == (0.02,)
    bad = tmp_path / "bad.yaml"
    bad.write_text("gpu_price: 3\n")
    with pytest.raises(ValueError, match=r"unknown price keys \['gpu_price'\] \(known: "):
        PriceTable.from_yaml(str(bad))
    negative = tmp_path / "neg.yaml"
    negative.write_text("hosted_api_gbp_per_image: [0.01, -1]\n")
    assert cli("cost", "--prices", str(negative), "--output", str(output)) == 2
    assert "hosted_api_gbp_per_image must be one or more prices above 0" in capsys.readouterr().err
    assert cli("cost", "--prices", str(tmp_path / "missing.yaml"), "--output", str(output)) == 2
    assert "imagefab: error: prices: " in capsys.readouterr().err


def test_cost_month_shows_spend_against_each_monthly_budget(tmp_path, output, capsys):
    prices = tmp_path / "budgets.yaml"
    prices.write_text(yaml.safe_dump({"monthly_budgets": {"campaign=autumn": 0.001, "team=none": 5}}))
    assert cli("cost", "--month", "2026-12", "--prices", str(prices), "--output", str(output), "--format", "json") == 0
    data = json.loads(capsys.readouterr().out)
    autumn, none = data["budgets"]
    con = analysis.connect(str(output))
    (expected, images) = con.execute(
        "SELECT sum(cost_usd), count(*) FROM catalog "
        "WHERE tags['campaign'] = 'autumn' AND strftime(created_at, '%Y-%m') = '2026-12'"
    ).fetchone()
    assert images and autumn["images"] == images and autumn["spent_usd"] == pytest.approx(expected)
    assert autumn["runs"] == 1 and autumn["left_usd"] == pytest.approx(0.001 - expected)
    assert none["images"] == 0 and none["spent_usd"] == 0.0
    assert cli("cost", "--month", "2026-11", "--prices", str(prices), "--output", str(output)) == 0
    text = capsys.readouterr().out
    assert "monthly budgets in 2026-11" in text and "campaign=autumn" in text
    assert cli("cost", "--month", "2026-13", "--prices", str(prices), "--output", str(output)) == 2
    assert "month '2026-13' is not YYYY-MM" in capsys.readouterr().err
