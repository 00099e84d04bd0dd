"""Versions and rollback in MLflow: register, resolve, promote / rollback, track runs, the server.

Every test gets its own sqlite store: a copy of one store migrated once per session (creating
MLflow's tables takes ~10 s here; copying the file takes milliseconds).
"""

from __future__ import annotations

import argparse
import io
import json
import shutil
import socket
from datetime import UTC, datetime
from pathlib import Path

import pytest
import yaml
from hypothesis import given, settings
from hypothesis import strategies as st
from PIL import Image

from app.catalog.schema import to_table
from app.models.catalog import ModelCatalog, ModelEntry
from app.models.digest import ModelFileError
from app.plan import check_input, resolve_models
from app.qc import QcSettings
from app.registry import (
    RegistryError,
    ResolvedVersions,
    UnresolvedReference,
    VersionMismatch,
    add_registry_cli,
    from_mlflow_template,
    make_client,
    parse_reference,
    promote,
    register_builtins,
    register_model,
    register_prompt,
    register_qc,
    resolve_spec_references,
    rollback,
    to_mlflow_template,
    track_run,
)
from app.spec import JobSpec, SpecError, load_spec, template_fields
from app.storage import OutputStore

REPO = Path(__file__).resolve().parents[1]
ECOMMERCE = REPO / "specs" / "ecommerce.yaml"


@pytest.fixture(scope="session")
def migrated_store(tmp_path_factory) -> Path:
    from mlflow import MlflowClient

    db = tmp_path_factory.mktemp("mlflow-template") / "mlflow.db"
    uri = f"sqlite:///{db}"
    c = MlflowClient(tracking_uri=uri, registry_uri=uri)
    c.search_experiments()
    c.search_registered_models()
    return db


@pytest.fixture
def store_uri(migrated_store, tmp_path, monkeypatch) -> str:
    db = tmp_path / "mlflow.db"
    shutil.copy(migrated_store, db)
    uri = f"sqlite:///{db}"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
    monkeypatch.setenv("MLFLOW_REGISTRY_URI", uri)
    monkeypatch.setenv("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")
    return uri


@pytest.fixture
def client(store_uri):
    return make_client(store_uri)


def lora_entry(name: str, path: str) -> ModelEntry:
    return ModelEntry(name=name, kind="lora", source=str(path), base="tiny-sdxl")


def spec_with_lora(reference: str, **overrides) -> JobSpec:
    return load_spec(ECOMMERCE, {"model.loras": [{"name": reference, "weight": 0.8}], **overrides})


# --- references and templates -------------------------------------------------------------------------


def test_references_parse_and_bad_ones_say_what_is_valid():
    ref = parse_reference("models:/brand-style@production")
    assert (ref.scheme, ref.name, ref.alias, ref.version) == ("models", "brand-style", "production", None)
    assert parse_reference("prompts:/ecommerce_studio/2").version == "2"
    qc = parse_reference("qc:/default@candidate")
    assert qc.registered_name == "qc-default" and str(qc) == "qc:/default@candidate"
    with pytest.raises(ValueError, match="names no version: add @ALIAS"):
        parse_reference("models:/brand-style")
    with pytest.raises(ValueError, match="neither a number nor 'latest'"):
        parse_reference("models:/brand-style/two")


def test_templates_convert_both_ways():
    ours = "studio photo of a {product_name}, {color}, json {{literal}} here"
    theirs = to_mlflow_template(ours)
    assert theirs == "studio photo of a {{product_name}}, {{color}}, json {literal} here"
    assert from_mlflow_template(theirs) == ours
    assert from_mlflow_template("a {{ mood }} photo of {{product}}") == "a {mood} photo of {product}"
    # Literal text that would read as an MLflow variable cannot be stored unchanged: refused.
    with pytest.raises(ValueError, match="cannot be stored"):
        to_mlflow_template("literal {{{{x}}}}")


@settings(max_examples=200, deadline=None)
@given(
    st.lists(
        st.one_of(
            st.text(alphabet="ab {}", max_size=4),
            st.from_regex(r"[a-z][a-z0-9_]{0,6}", fullmatch=True).map(lambda n: "\0" + n),
        ),
        max_size=6,
    )
)
def test_template_conversion_round_trips_or_refuses(parts):
    # Literal pieces are escaped imagefab text, "\0name" pieces are placeholders.
    template = "".join(
        "{" + p[1:] + "}" if p.startswith("\0") else p.replace("{", "{{").replace("}", "}}") for p in parts
    )
    try:
        stored = to_mlflow_template(template)
    except ValueError:
        return  # refused: its literal braces would read as a variable in MLflow
    assert from_mlflow_template(stored) == template
    assert template_fields(from_mlflow_template(stored)) == template_fields(template)


# --- registering -----------------------------------------------------------------------------------


def test_registering_the_same_files_twice_makes_one_version_with_reference_and_tags(client, model_catalog, tiny_loras):
    style = tiny_loras["tiny-style"]
    first = register_model(client, lora_entry("brand-style", style.path), catalog=model_catalog)
    again = register_model(client, lora_entry("brand-style", style.path), catalog=model_catalog)
    assert (first.version, first.created) == ("1", True)
    assert (again.version, again.created) == ("1", False)
    other = register_model(client, lora_entry("brand-style", tiny_loras["tiny-detail"].path), catalog=model_catalog)
    assert (other.version, other.created) == ("2", True)

    mv = client.get_model_version("brand-style", "1")
    assert mv.tags["sha256"] == style.sha256 and mv.tags["kind"] == "lora"
    assert mv.tags["arch"] == style.arch and mv.tags["catalog_version"] == "1"
    reference = json.loads(Path(client.download_artifacts(mv.run_id, "reference/reference.json")).read_text())
    assert reference["sha256"] == style.sha256 and reference["path"] == style.path
    assert reference["source"] == style.path and reference["base"] == "tiny-sdxl"
    assert client.get_registered_model("brand-style").tags["imagefab.kind"] == "lora"


def test_register_builtins_is_idempotent_and_sets_production_once(client, model_catalog, tmp_path):
    from dataclasses import replace

    built = {n: model_catalog.entries[n] for n in ("tiny-sdxl", "tiny-style", "tiny-detail")}
    catalog = replace(model_catalog, entries=built)  # the models the test home has built already
    lines: list[str] = []
    first = register_builtins(client, catalog=catalog, specs_dir=REPO / "specs", report=lines.append)
    names = {r.name for r in first}
    assert {"tiny-sdxl", "tiny-style", "tiny-detail", "ecommerce_studio", "social_lifestyle", "qc-default"} <= names
    assert all(r.created for r in first) and all("(@production)" in line for line in lines)
    second = register_builtins(client, catalog=catalog, specs_dir=REPO / "specs")
    assert not any(r.created for r in second)
    assert [(r.name, r.version) for r in second] == [(r.name, r.version) for r in first]
    prompt = client.get_prompt_version_by_alias("ecommerce_studio", "production")
    assert prompt.template == to_mlflow_template(load_spec(ECOMMERCE).input.prompt_template)


# --- resolving, promoting, rolling back -------------------------------------------------------------


def test_rollback_changes_what_the_next_run_resolves(client, model_catalog, tiny_loras, tmp_path):
    style, detail = tiny_loras["tiny-style"], tiny_loras["tiny-detail"]
    register_model(client, lora_entry("brand-style", style.path), catalog=model_catalog, aliases=["production"])
    register_model(client, lora_entry("brand-style", detail.path), catalog=model_catalog)
    promote(client, "brand-style", "2")
    spec = spec_with_lora("models:/brand-style@production")

    resolved, versions = resolve_spec_references(spec, client, catalog=model_catalog)
    assert resolved.model.loras[0].name == "brand-style" and resolved.model.loras[0].weight == 0.8
    [ref] = versions.refs
    assert (ref.version, ref.digest, ref.field) == ("2", detail.sha256, "model.loras[0].name")
    models = resolve_models(resolved, versions.merge_into(model_catalog))
    assert models.loras["brand-style"].sha256 == detail.sha256 and models.loras["brand-style"].version == "2"
    versions.check_models(models)
    # The same versions as a user catalog file (for `regenerate --catalog`), without the registry.
    overlay = tmp_path / "models.yaml"
    overlay.write_text(yaml.safe_dump(versions.catalog_overlay()))
    assert ModelCatalog.load(overlay).resolve_lora("brand-style").sha256 == detail.sha256

    move = rollback(client, "brand-style")
    assert (move.previous, move.version) == ("2", "1")
    _, after = resolve_spec_references(spec, client, catalog=model_catalog)
    assert (after.refs[0].version, after.refs[0].digest) == ("1", style.sha256)
    # What the first run recorded does not follow the alias.
    assert ResolvedVersions.from_dict(json.loads(json.dumps(versions.to_dict()))).refs[0].digest == detail.sha256


def test_rollback_returns_to_the_previous_target_not_the_previous_number(client, model_catalog, tiny_loras, tmp_path):
    copy = tmp_path / "style-copy"
    shutil.copytree(tiny_loras["tiny-style"].path, copy)
    for path in (tiny_loras["tiny-style"].path, tiny_loras["tiny-detail"].path, copy):
        register_model(client, lora_entry("brand-style", path), catalog=model_catalog)
    promote(client, "brand-style", "3")
    promote(client, "brand-style", "1")
    assert rollback(client, "brand-style").version == "3"
    # A move made outside imagefab (the MLflow UI) is remembered before rolling back from it.
    client.set_registered_model_alias("brand-style", "production", "2")
    assert rollback(client, "brand-style").version == "3"
    with pytest.raises(RegistryError, match="no earlier version to roll back to"):
        rollback(client, "brand-style")  # 3 was the first target
    with pytest.raises(RegistryError, match=r"has no version 9 \(versions: 1, 2, 3\)"):
        promote(client, "brand-style", "9")
    actions = [
        (e["action"], e["from"], e["to"])
        for e in json.loads(client.get_registered_model("brand-style").tags["imagefab.alias_log"])
    ]
    assert actions == [("promote", None, "3"), ("promote", "3", "1"), ("rollback", "1", "3"), ("rollback", "2", "3")]


def test_unknown_alias_or_version_names_the_reference_and_what_exists(client, model_catalog, tiny_loras):
    register_model(
        client,
        lora_entry("brand-style", tiny_loras["tiny-style"].path),
        catalog=model_catalog,
        aliases=["production", "candidate"],
    )
    with pytest.raises(UnresolvedReference) as e:
        resolve_spec_references(spec_with_lora("models:/brand-style@staging"), client)
    assert str(e.value) == (
        "model.loras[0].name: models:/brand-style@staging: 'brand-style' has no alias "
        "'staging'; its aliases: candidate (version 1), production (version 1)"
    )
    assert isinstance(e.value, SpecError)  # the job and CLI report it as bad input
    with pytest.raises(UnresolvedReference, match=r"has no version 4; its versions: 1"):
        resolve_spec_references(spec_with_lora("models:/brand-style/4"), client)
    with pytest.raises(UnresolvedReference, match="there is no registered model 'nothing'"):
        resolve_spec_references(spec_with_lora("models:/nothing@production"), client)
    with pytest.raises(UnresolvedReference, match="is a LoRA, but model.base needs a base model"):
        resolve_spec_references(load_spec(ECOMMERCE, {"model.base": "models:/brand-style@production"}), client)


def test_changed_files_of_a_registered_version_are_refused_naming_both_digests(
    client, model_catalog, tiny_loras, tmp_path
):
    folder = tmp_path / "brand"
    shutil.copytree(tiny_loras["tiny-style"].path, folder)
    registered = register_model(
        client, lora_entry("brand-local", folder), catalog=model_catalog, aliases=["production"]
    )
    weights = next(folder.glob("*.safetensors"))
    weights.write_bytes(weights.read_bytes() + b"\0")
    spec = spec_with_lora("models:/brand-local@production")
    with pytest.raises(VersionMismatch) as e:
        resolve_spec_references(spec, client, catalog=model_catalog)
    msg = str(e.value)
    assert "models:/brand-local@production is brand-local version 1" in msg
    assert tiny_loras["tiny-style"].sha256 in msg and "now have sha256" in msg
    assert isinstance(e.value, ModelFileError) and registered.version == "1"
    # Without hashing up front, the job's own model check refuses the files as well.
    resolved, versions = resolve_spec_references(spec, client, catalog=model_catalog, verify=False)
    with pytest.raises(ModelFileError, match="sha256 mismatch"):
        resolve_models(resolved, versions.merge_into(model_catalog))


def test_prompt_references_resolve_to_imagefab_templates_and_roll_back(client):
    spec = load_spec(ECOMMERCE)
    text = spec.input.prompt_template
    v1 = register_prompt(client, "ecommerce_studio", text, aliases=["production"])
    assert register_prompt(client, "ecommerce_studio", text).created is False
    v2 = register_prompt(client, "ecommerce_studio", "catalogue shot of a {product_name} in {colour}")
    assert (v1.version, v2.version) == ("1", "2")
    ref_spec = load_spec(
        ECOMMERCE, {"input.prompt_template": "prompts:/ecommerce_studio@production", "input.template_name": None}
    )

    resolved, versions = resolve_spec_references(ref_spec, client)
    assert resolved.input.prompt_template == text and resolved.input.template_name == "ecommerce_studio"
    assert versions.refs[0].version == "1"
    check_input(resolved, ["product_id", "sku", "product_name", "color", "category", "material"])

    promote(client, "ecommerce_studio", "2")
    resolved, versions = resolve_spec_references(ref_spec, client)  # no cache: the move shows at once
    assert versions.refs[0].version == "2"
    # The resolved template reaches the input check, which names the missing column.
    with pytest.raises(SpecError, match="column 'colour' is not in"):
        check_input(resolved, ["product_id", "sku", "product_name", "color", "category", "material"])
    rollback(client, "ecommerce_studio")
    assert resolve_spec_references(ref_spec, client)[1].refs[0].version == "1"
    with pytest.raises(UnresolvedReference, match=r"has no alias 'staging'; its aliases: production \(version 1\)"):
        resolve_spec_references(
            load_spec(ECOMMERCE, {"input.prompt_template": "prompts:/ecommerce_studio@staging"}), client
        )


def test_a_deprecated_template_version_warns_the_specs_that_use_it(client, store_uri, capsys):
    from app.registry.cli import add_registry_cli

    spec = load_spec(ECOMMERCE)
    register_prompt(client, "ecommerce_studio", spec.input.prompt_template, aliases=["production"])
    register_prompt(client, "ecommerce_studio", "catalogue shot of a {product_name}, {color}")
    ref_spec = load_spec(
        ECOMMERCE, {"input.prompt_template": "prompts:/ecommerce_studio@production", "input.template_name": None}
    )
    assert resolve_spec_references(ref_spec, client)[1].warnings() == []

    parser = argparse.ArgumentParser()
    add_registry_cli(parser.add_subparsers())
    args = parser.parse_args(
        ["registry", "--tracking-uri", store_uri, "deprecate", "ecommerce_studio", "1", "--reason", "use version 2"]
    )
    assert args.func(args) == 0 and "deprecated (use version 2)" in capsys.readouterr().out
    (warning,) = resolve_spec_references(ref_spec, client)[1].warnings()
    assert warning == (
        "input.prompt_template: prompts:/ecommerce_studio@production resolves to ecommerce_studio version 1, "
        "which is deprecated (use version 2)"
    )
    bad = parser.parse_args(["registry", "--tracking-uri", store_uri, "deprecate", "ecommerce_studio", "9"])
    assert bad.func(bad) == 2 and "has no version 9 (versions: 1, 2)" in capsys.readouterr().err
    undo = parser.parse_args(["registry", "--tracking-uri", store_uri, "deprecate", "ecommerce_studio", "1", "--undo"])
    assert undo.func(undo) == 0
    assert resolve_spec_references(ref_spec, client)[1].warnings() == []


@pytest.mark.filterwarnings("ignore:Pydantic serializer warnings")  # a str in `qc` until the spec takes one
def test_qc_settings_are_versioned_and_resolve_to_qc_settings(client):
    strict = QcSettings(min_sharpness=50, review_sharpness=150)
    first = register_qc(client, "default", QcSettings(), aliases=["production"])
    assert register_qc(client, "default", QcSettings()).created is False
    second = register_qc(client, "default", strict)
    assert (first.version, second.version) == ("1", "2")
    assert client.get_model_version("qc-default", "2").tags["qc_version"] == strict.qc_version
    promote(client, "qc-default", "2")
    # The spec takes QC settings; `qc: qc:/default@production` needs the spec to accept a string there.
    spec = load_spec(ECOMMERCE).model_copy(update={"qc": "qc:/default@production"})
    resolved, versions = resolve_spec_references(spec, client)
    assert resolved.qc == strict and versions.refs[0].digest == strict.qc_version
    rollback(client, "qc-default")
    assert resolve_spec_references(spec, client)[0].qc == QcSettings()


def test_qc_settings_registered_by_an_older_imagefab_still_resolve_and_a_changed_file_does_not(client):
    """A newer imagefab knows more QC settings (their defaults fill in), so the qc_version it
    computes differs from the tag an older one wrote: the stored file is what was registered
    (content_sha256), so it resolves. A file changed after registration is refused."""
    from app.registry.resolve import resolve_qc

    version = register_qc(client, "older", QcSettings(), aliases=["production"]).version
    client.set_model_version_tag("qc-older", version, "qc_version", "qc2-000000000000")  # as an older one wrote it
    settings, ref = resolve_qc(client, "qc:/older@production")
    assert settings == QcSettings() and ref.digest == QcSettings().qc_version
    client.set_model_version_tag("qc-older", version, "content_sha256", "0" * 64)  # the file no longer matches
    with pytest.raises(RegistryError, match="does not match its content_sha256 tag"):
        resolve_qc(client, "qc:/older@production")


def test_one_spec_can_compare_two_aliases_of_one_lora(client, model_catalog, tiny_loras):
    if "combinations" not in JobSpec.model_fields:
        pytest.skip("this spec version has no combinations")
    register_model(
        client, lora_entry("brand-style", tiny_loras["tiny-style"].path), catalog=model_catalog, aliases=["production"]
    )
    register_model(
        client, lora_entry("brand-style", tiny_loras["tiny-detail"].path), catalog=model_catalog, aliases=["candidate"]
    )
    spec = load_spec(
        ECOMMERCE,
        {
            "model": {},
            "combinations": {
                "now": {"base": "tiny-sdxl", "loras": [{"name": "models:/brand-style@production", "weight": 0.8}]},
                "next": {"base": "tiny-sdxl", "loras": [{"name": "models:/brand-style@candidate", "weight": 0.8}]},
            },
        },
    )
    resolved, versions = resolve_spec_references(spec, client, catalog=model_catalog)
    assert resolved.combinations["now"].loras[0].name == "brand-style-v1"
    assert resolved.combinations["next"].loras[0].name == "brand-style-v2"
    models = resolve_models(resolved, versions.merge_into(model_catalog))
    assert models.loras["brand-style-v2"].sha256 == tiny_loras["tiny-detail"].sha256


# --- tracking ----------------------------------------------------------------------------------------


def fake_run(output: OutputStore, run_id: str, statuses: list[str], lora_weight: float) -> tuple[dict, dict, object]:
    """Catalog rows, run.json and summary of a finished run, with real image files."""
    spec = load_spec(ECOMMERCE)
    rows = []
    for i, status in enumerate(statuses):
        grey = 40 + 50 * i
        buf = io.BytesIO()
        Image.new("RGB", (64, 64), (grey, 255 - grey, 128)).save(buf, format="PNG")
        uri = output.write_bytes(f"images/{run_id}/{i}.png", buf.getvalue())
        rows.append(
            {
                "image_id": f"{run_id}-{i:04d}",
                "source": "bulk",
                "created_at": datetime.now(UTC),
                "status": status,
                "reasons": ["blur"] if status == "rejected" else [],
                "template": {"name": "ecommerce_studio", "version": "abc123", "text": spec.input.prompt_template},
                "base_model": {"name": "tiny-sdxl", "version": "1", "sha256": "a" * 64, "source": "builtin:tiny-sdxl"},
                "loras": [
                    {"name": "brand-style", "version": "2", "weight": lora_weight, "sha256": "b" * 64, "source": "x"}
                ],
                "sharpness": 20.0 + 40 * i,
                "contrast": 0.05 + 0.02 * i,
                "exposure": 0.01,
                "qc_version": spec.qc.qc_version,
                "uri": uri,
                "gpu_seconds": 0.5,
                "cpu_seconds": 0.1,
                "cost_usd": 0.001,
                "accelerator": "cuda:NVIDIA H100",
            }
        )
    record = {
        "run_id": run_id,
        "spec": spec.model_dump(mode="json"),
        "started_at": datetime.now(UTC).isoformat(),
        "base_models": {"tiny-sdxl": {"name": "tiny-sdxl", "version": "1", "sha256": "a" * 64}},
        "loras": {"brand-style": {"name": "brand-style", "version": "2", "sha256": "b" * 64}},
    }
    summary = {"run_id": run_id, "images_per_second": 4.0, "wall_seconds": 2.5, "rendered": len(statuses)}
    return record, summary, to_table(rows)


def test_two_tracked_runs_can_be_compared(client, tmp_path):
    import mlflow

    output = OutputStore.at(str(tmp_path / "out"))
    spec = load_spec(ECOMMERCE)
    ids = {}
    for run_id, statuses, weight in (
        ("run-a", ["accepted", "accepted", "rejected", "review"], 0.8),
        ("run-b", ["accepted", "rejected", "rejected", "failed"], 0.5),
    ):
        record, summary, rows = fake_run(output, run_id, statuses, weight)
        ids[run_id] = track_run(spec, summary, record, rows, output, client=client)

    runs = mlflow.search_runs(experiment_names=["imagefab-bulk"], order_by=["tags.`imagefab.run_id` ASC"])
    assert list(runs["tags.imagefab.run_id"]) == ["run-a", "run-b"]
    assert list(runs["metrics.acceptance_rate"]) == pytest.approx([0.5, 1 / 3])
    assert list(runs["metrics.cost_per_accepted_image_usd"]) == pytest.approx([0.002, 0.004])
    assert list(runs["metrics.images_per_second"]) == [4.0, 4.0]
    assert runs["metrics.acceptance_rate/combination/tiny-sdxl/brand-style:0.8"].iloc[0] == pytest.approx(0.5)
    assert runs["metrics.acceptance_rate/template/ecommerce_studio:abc123"].iloc[1] == pytest.approx(1 / 3)
    assert list(runs["params.model.loras.0.name"]) == ["tiny-style", "tiny-style"]
    assert runs["tags.imagefab.models.loras"].iloc[0].startswith("brand-style v2")

    run = client.get_run(ids["run-a"])
    [dataset] = run.inputs.dataset_inputs
    assert dataset.dataset.source and "products.csv" in dataset.dataset.source
    input_rows = len((REPO / "specs" / "data" / "products.csv").read_text().strip().splitlines()) - 1
    assert json.loads(dataset.dataset.profile)["num_rows"] == input_rows
    files = {f.path for f in client.list_artifacts(ids["run-a"])}
    assert {"spec.yaml", "run.json", "contact_sheet.png", "qc_histograms.png", "acceptance.json"} <= files
    sheet = Image.open(client.download_artifacts(ids["run-a"], "contact_sheet.png"))
    assert sheet.width > 400 and sheet.height > 3 * 128


def test_contact_sheet_and_pil_histograms_without_matplotlib(tmp_path):
    from app.registry.tracking import _histograms_pil, contact_sheet, qc_histograms

    output = OutputStore.at(str(tmp_path))
    _, _, rows = fake_run(output, "r", ["accepted", "rejected", "review"], 1.0)
    rows = rows.to_pylist()
    rows[1]["uri"] = output.uri_of("images/gone.png")  # a missing file becomes a grey tile
    assert contact_sheet(rows, output, per_status=2).size[0] == 6 * 132 + 4
    data = {"sharpness": {"accepted": [20.0], "rejected": [60.0], "review": [100.0]}}
    assert _histograms_pil(data, {"sharpness": [30.0, 100.0]}).size == (320, 220)
    assert qc_histograms(rows).mode == "RGB"


def test_record_serving_logs_the_served_versions(client, model_catalog, tiny_loras):
    register_model(
        client, lora_entry("brand-style", tiny_loras["tiny-style"].path), catalog=model_catalog, aliases=["production"]
    )
    _, versions = resolve_spec_references(spec_with_lora("models:/brand-style@production"), client, verify=False)
    from app.registry import record_serving

    run = client.get_run(record_serving(versions, client=client, deployment="sdxl-api"))
    assert run.data.tags["imagefab.deployment"] == "sdxl-api"
    served = run.data.tags["imagefab.ref.model.loras.0.name"]
    assert served.startswith("models:/brand-style@production -> brand-style version 1")


# --- the command line --------------------------------------------------------------------------------


def run_cli(*argv: str) -> int:
    parser = argparse.ArgumentParser(prog="imagefab")
    add_registry_cli(parser.add_subparsers(dest="command", required=True))
    args = parser.parse_args(list(argv))
    return args.func(args)


def test_cli_promote_rollback_list_history(client, store_uri, model_catalog, tiny_loras, capsys):
    for lora in ("tiny-style", "tiny-detail"):
        register_model(client, lora_entry("brand-style", tiny_loras[lora].path), catalog=model_catalog)
    assert run_cli("registry", "--tracking-uri", store_uri, "promote", "brand-style", "1") == 0
    assert run_cli("registry", "promote", "brand-style", "2") == 0  # the store from MLFLOW_TRACKING_URI
    assert run_cli("registry", "rollback", "brand-style") == 0
    assert client.get_model_version_by_alias("brand-style", "production").version == 1
    assert run_cli("registry", "list") == 0
    assert run_cli("registry", "history", "brand-style") == 0
    assert run_cli("registry", "resolve", "models:/brand-style@production") == 0
    out = capsys.readouterr().out
    assert "brand-style@production: version 2 -> version 1 (rollback)" in out
    assert "brand-style                  lora             2  production=1" in out
    assert "<- production" in out and "rollback  by" in out
    assert "models:/brand-style@production -> brand-style version 1" in out
    assert run_cli("registry", "rollback", "brand-style", "--alias", "candidate") == 2
    assert "'brand-style' has no alias 'candidate' to roll back" in capsys.readouterr().err


# --- the server --------------------------------------------------------------------------------------


@pytest.mark.slow  # starts `mlflow server` (uvicorn): ~15-30 s on 2 shared cores
def test_mlflow_server_answers_on_loopback(migrated_store, tmp_path):
    import urllib.request

    from app.registry.server import server_command, start_server, stop_server, wait_healthy

    assert server_command("/srv/x", port=5000)[3:] == [
        "server",
        "--backend-store-uri",
        "sqlite:////srv/x/mlflow.db",
        "--default-artifact-root",
        "/srv/x/mlartifacts",
        "-h",
        "127.0.0.1",
        "--port",
        "5000",
        "--workers",
        "1",
    ]
    shutil.copy(migrated_store, tmp_path / "mlflow.db")
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    url = f"http://127.0.0.1:{port}"
    proc = start_server(tmp_path, port=port, stdout=open(tmp_path / "server.log", "wb"), stderr=-2)
    try:
        wait_healthy(url, proc, timeout_s=90)
        with urllib.request.urlopen(f"{url}/api/2.0/mlflow/experiments/search?max_results=5", timeout=10) as resp:
            assert "experiments" in json.loads(resp.read())
        client = make_client(url)  # the REST API works for the registry too
        client.create_registered_model("via-server")
        assert client.get_registered_model("via-server").name == "via-server"
    finally:
        stop_server(proc, timeout_s=15)
    assert proc.poll() is not None


# --- the bulk job through the registry ---------------------------------------------------------------


@pytest.mark.ray
@pytest.mark.slow
def test_rollback_changes_the_next_jobs_versions_and_images(ray_local, client, model_catalog, tiny_loras, tmp_path):
    import mlflow

    from app.catalog.store import CatalogStore
    from app.regenerate import regenerate
    from jobs.generate import run

    style, detail = tiny_loras["tiny-style"], tiny_loras["tiny-detail"]
    register_model(client, lora_entry("brand-style", style.path), catalog=model_catalog, aliases=["production"])
    register_model(client, lora_entry("brand-style", detail.path), catalog=model_catalog)
    promote(client, "brand-style", "2")
    out = tmp_path / "out"
    spec = spec_with_lora(
        "models:/brand-style@production",
        **{"output.uri": str(out), "input.limit": 1, "steps": 2, "postprocess.presets": ["thumbnail"]},
    )

    first = run(spec, quiet=True, track=True)
    rollback(client, "brand-style")
    second = run(spec, quiet=True, track=True)

    rows = CatalogStore(OutputStore.at(str(out))).read().to_pylist()
    by_run = {r["run_id"]: r for r in rows}
    lora_of = {run_id: [(lo["name"], lo["version"], lo["sha256"]) for lo in r["loras"]] for run_id, r in by_run.items()}
    assert lora_of[first.run_id] == [("brand-style", "2", detail.sha256)]
    assert lora_of[second.run_id] == [("brand-style", "1", style.sha256)]
    ids = {run_id: {r["image_id"] for r in rows if r["run_id"] == run_id} for run_id in by_run}
    assert first.rendered == second.rendered == 2 and not ids[first.run_id] & ids[second.run_id]
    pixels = {run_id: {r["pixel_sha256"] for r in rows if r["run_id"] == run_id} for run_id in by_run}
    assert not pixels[first.run_id] & pixels[second.run_id]

    # The first run's image still regenerates after the alias moved: its run record names v2.
    report = regenerate(by_run[first.run_id]["image_id"], str(out))
    assert report.identical

    runs = mlflow.search_runs(experiment_names=["imagefab-bulk"], output_format="list")
    assert len(runs) == 2
    tracked = {r.data.tags.get("imagefab.run_id"): r for r in runs}
    assert set(tracked) == {first.run_id, second.run_id}, [r.data.tags for r in runs]
    assert all("images_per_second" in r.data.metrics for r in runs)
