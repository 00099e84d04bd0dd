"""Driver-side checks and planning that happen before any GPU work (no Ray here).

1. `input_columns` reads only the input's schema; `check_input` compares it with the spec.
2. `resolve_models` turns the spec's (and the rows') model names into checked local files.
3. `split_plan` takes the expanded requests and decides what to render: duplicates dropped,
   ids already in the catalog skipped (resume), failed rows set aside, the rest ordered by model
   combination so generators switch LoRA stacks rarely.
"""

from __future__ import annotations

import contextlib
from collections.abc import Set as AbstractSet
from dataclasses import dataclass

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.csv as pacsv
import pyarrow.dataset as pads

from app.expand import ResolvedModels
from app.models.catalog import ModelCatalog, ResolvedModel, UnknownModelError
from app.models.digest import ModelFileError
from app.spec import JobSpec, SpecError, template_fields


def _input_dataset(spec: JobSpec, columns: list[str] | None = None) -> pads.Dataset:
    inp = spec.input
    try:
        if inp.resolved_format == "csv":
            fmt = pads.CsvFileFormat(
                parse_options=pacsv.ParseOptions(delimiter=inp.delimiter),
                convert_options=csv_string_types(columns) if columns else None,
            )
            return pads.dataset(inp.path, format=fmt)
        return pads.dataset(inp.path, format="parquet")
    except (OSError, pa.ArrowInvalid, ValueError) as e:
        raise SpecError(f"input.path: cannot read {inp.path!r} as {inp.resolved_format} ({e})") from None


def input_columns(spec: JobSpec) -> list[str]:
    return list(_input_dataset(spec).schema.names)


def row_lora_names(spec: JobSpec, columns: list[str]) -> set[str]:
    """LoRA names that rows ask for in a `loras` column (reads only that column)."""
    from app.expand import RowError, parse_lora_list

    if "loras" not in columns:
        return set()
    values = _input_dataset(spec, columns).to_table(columns=["loras"]).column("loras")
    names: set[str] = set()
    for value in pc.unique(values).to_pylist():
        with contextlib.suppress(RowError):  # that row fails with the reason during expansion
            names.update(name for name, _ in parse_lora_list(str(value or "")))
    return names


def csv_string_types(columns: list[str]) -> pacsv.ConvertOptions:
    """CSV cells stay text (product ids like 00123 keep their zeros); expansion parses numbers."""
    return pacsv.ConvertOptions(column_types={c: pa.string() for c in columns}, strings_can_be_null=True)


def check_input(spec: JobSpec, columns: list[str]) -> None:
    inp, have = spec.input, set(columns)
    shown = ", ".join(columns)
    for name in inp.matrix:
        if name in have:  # refused rather than one silently hiding the other
            raise SpecError(
                f"input.matrix.{name}: {inp.path} has a column '{name}' too; rename the matrix name or the column"
            )
    have |= set(inp.matrix)  # matrix values join every row like columns
    if inp.prompt_template is not None:
        for name in template_fields(inp.prompt_template):
            if name not in have:
                raise SpecError(f"input.prompt_template: column '{name}' is not in {inp.path} (columns: {shown})")
    elif inp.prompt_column not in have:
        raise SpecError(f"input.prompt_column: column '{inp.prompt_column}' is not in {inp.path} (columns: {shown})")
    for i, tag in enumerate(spec.tags):
        if tag not in have:
            raise SpecError(f"tags[{i}]: column '{tag}' is not in {inp.path} (columns: {shown})")
    if inp.key_column and inp.key_column not in have:
        raise SpecError(f"input.key_column: column '{inp.key_column}' is not in {inp.path} (columns: {shown})")
    if inp.negative_column and inp.negative_column not in have:
        raise SpecError(
            f"input.negative_column: column '{inp.negative_column}' is not in {inp.path} (columns: {shown})"
        )


def resolve_models(
    spec: JobSpec, catalog: ModelCatalog, row_lora_names: AbstractSet[str] = frozenset()
) -> ResolvedModels:
    """Resolve and sha256-check every base and LoRA the run may use.

    A bad base or LoRA named by the spec stops the job (SpecError / ModelFileError naming the
    field). A bad LoRA named only by some rows is recorded in `lora_problems`: those rows fail,
    the others run.
    """
    bases: dict[str, ResolvedModel] = {}
    loras: dict[str, ResolvedModel] = {}
    problems: dict[str, str] = {}
    where = "combinations.{name}" if spec.combinations else "model"
    for name, combo in spec.effective_combinations().items():
        at = where.format(name=name)
        try:
            base = bases.get(combo.base) or catalog.resolve_base(combo.base)
        except UnknownModelError as e:
            raise SpecError(f"{at}.base: {e}") from None
        except ModelFileError as e:
            raise ModelFileError(f"{at}.base: {e}") from None
        if base.pipeline != "txt2img":
            raise SpecError(
                f"{at}.base: '{combo.base}' is an inpainting checkpoint (pipeline {base.pipeline!r}); "
                f"text-to-image renders need a txt2img base model"
            )
        bases[combo.base] = base
        for i, ref in enumerate(combo.loras):
            try:
                lora = catalog.resolve_lora(ref.name, base)
            except UnknownModelError as e:
                raise SpecError(f"{at}.loras[{i}].name: {e}") from None
            except ModelFileError as e:
                raise ModelFileError(f"{at}.loras[{i}]: {e}") from None
            loras[ref.name] = lora
    for name in sorted(row_lora_names - set(loras)):
        try:
            loras[name] = catalog.resolve_lora(name)
        except UnknownModelError:
            pass  # expansion reports it per row, with the known names
        except ModelFileError as e:
            problems[name] = str(e)
    return ResolvedModels(bases=bases, loras=loras, known_loras=tuple(catalog.names("lora")), lora_problems=problems)


@dataclass
class Plan:
    pending: pa.Table  # requests to render, ordered by combination
    failed: pa.Table  # rows that could not become requests (written to the catalog as failed)
    skipped: int  # already in the catalog
    duplicates: int  # the same image asked for twice in this input
    total: int


def split_plan(requests: pa.Table, done_ids: set[str]) -> Plan:
    total = requests.num_rows
    ids = requests.column("image_id").to_pylist()
    seen: set[str] = set()
    keep, skipped, duplicates = [], 0, 0
    for i, image_id in enumerate(ids):
        if image_id in seen:
            duplicates += 1
        elif image_id in done_ids:
            skipped += 1
            seen.add(image_id)
        else:
            keep.append(i)
            seen.add(image_id)
    todo = requests.take(pa.array(keep, type=pa.int64()))
    is_failed = pc.equal(todo.column("status"), "failed")
    failed = todo.filter(is_failed)
    pending = todo.filter(pc.invert(is_failed))
    if pending.num_rows:
        # Stable sort: within a combination, input order is kept.
        pending = pending.take(pc.sort_indices(pending, sort_keys=[("combination", "ascending")]))
    return Plan(pending=pending, failed=failed, skipped=skipped, duplicates=duplicates, total=total)
