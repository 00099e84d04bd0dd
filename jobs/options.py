"""The bulk job's command-line options, one list for `python -m jobs.generate` and `imagefab run`.

Kept apart from jobs/generate.py so that building the `imagefab` parser imports nothing heavy."""

from __future__ import annotations

import argparse


def add_run_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("spec", help="job spec YAML")
    p.add_argument("--output", help="output URI (overrides output.uri)")
    p.add_argument(
        "--set",
        action="append",
        default=[],
        metavar="FIELD=VALUE",
        help="override a spec field by dotted path, e.g. --set steps=8 (YAML value)",
    )
    p.add_argument("--limit", type=int, help="only the first N input rows (smoke test)")
    p.add_argument("--run-id", help="run id (default: run_name-UTCSTAMP-random)")
    p.add_argument("--quiet", action="store_true", help="no progress, only the summary")
    p.add_argument(
        "--verbose",
        action="store_true",
        help="Ray Data's progress bars and operator logs on the console (default: its log file)",
    )
    p.add_argument("--json", action="store_true", help="the summary as one JSON object on stdout")
    p.add_argument("--no-mlflow", action="store_true", help="do not log the run to MLflow")
    p.add_argument(
        "--strict", action="store_true", help="exit 1 when any image failed (default: only when every one did)"
    )
    p.add_argument(
        "--prices",
        help="a prices YAML (app/cost.py): a run whose static tags match one of its monthly_budgets "
        "refuses to start when that budget is spent or the run would cross it",
    )
    p.add_argument("--force", action="store_true", help="start even when a monthly budget is spent")
