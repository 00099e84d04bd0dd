"""Prices and the cost of one image: device seconds and CPU seconds at list prices.

The defaults are on-demand list prices per hour (USD, late 2026, rounded); a team sets its own in
a YAML file with the same keys (`imagefab cost --prices prices.yaml`, or the spec later on):

    gpu_hourly: {H100: 2.49, L4: 0.70}     # USD per hour, matched against the catalog's accelerator
    cpu_core_hourly: 0.04
    storage_gb_month: 0.023                # USD per GiB-month of stored masters and variants
    hosted_api_gbp_per_image: [0.01, 0.03] # a hosted image API's price per image, GBP (one or several)
    usd_per_gbp: 1.27                      # exchange rate: USD for one GBP
    gpu_node: H100                         # the always-on node self-hosting is compared as
    gpu_node_monthly_usd: 1800             # its fixed monthly cost (unset: gpu_hourly × hours_per_month)
    monthly_budgets:                       # USD a calendar month (UTC) per team/campaign tag (app/budget.py)
      campaign=spring: 500.0               #   images whose tags say campaign=spring
      team=studio: 1200
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import yaml


def parse_monthly_budgets(data: object) -> list[tuple[str, str, float]]:
    """`monthly_budgets` as (tag, value, USD): "campaign=spring: 500" -> ("campaign", "spring", 500.0)."""
    if data is None:
        return []
    if not isinstance(data, dict):
        raise ValueError(f"monthly_budgets must map 'TAG=VALUE' to USD, not {data!r}")
    out = []
    for key, usd in data.items():
        tag, sep, value = str(key).partition("=")
        if not sep or not tag.strip() or not value.strip():
            raise ValueError(f"monthly_budgets: {key!r} is not TAG=VALUE (e.g. campaign=spring)")
        try:
            amount = float(usd)
        except (TypeError, ValueError):
            raise ValueError(f"monthly_budgets.{key}: {usd!r} is not an amount in USD") from None
        if not (math.isfinite(amount) and amount >= 0):
            raise ValueError(f"monthly_budgets.{key}: {usd!r} must be a finite amount ≥ 0")
        out.append((tag.strip(), value.strip(), amount))
    return out


DEFAULT_GPU_HOURLY = {
    "H200": 3.80,
    "H100": 2.99,
    "A100": 1.79,
    "L40S": 1.19,
    "L4": 0.80,
    "A10G": 1.01,
    "T4": 0.53,
}


@dataclass(frozen=True)
class PriceTable:
    gpu_hourly: dict[str, float] = field(default_factory=lambda: dict(DEFAULT_GPU_HOURLY))
    unknown_gpu_hourly: float = 2.50  # a GPU whose name matches no key
    cpu_core_hourly: float = 0.048  # one vCPU, on-demand
    storage_gb_month: float = 0.023
    # Self-hosting against a hosted image API (analysis/cost.py: per-image comparison, break-even).
    hosted_api_gbp_per_image: tuple[float, ...] = (0.01, 0.02, 0.03)
    usd_per_gbp: float = 1.27
    gpu_node: str = "H100"
    gpu_node_monthly_usd: float | None = None
    hours_per_month: float = 730.0
    # "TAG=VALUE" -> USD a calendar month: `imagefab cost --month`, and a run refuses to start
    # when its static tags match a budget it would cross (app/budget.py `MonthlyBudgets`).
    monthly_budgets: dict[str, float] = field(default_factory=dict)

    def __post_init__(self):
        parse_monthly_budgets(self.monthly_budgets)  # raises ValueError naming a bad key or amount
        api = self.hosted_api_gbp_per_image
        object.__setattr__(
            self,
            "hosted_api_gbp_per_image",
            tuple(float(p) for p in (api if isinstance(api, (list, tuple)) else [api])),
        )
        if not self.hosted_api_gbp_per_image or min(self.hosted_api_gbp_per_image) <= 0:
            raise ValueError(f"hosted_api_gbp_per_image must be one or more prices above 0, not {api!r}")
        if self.usd_per_gbp <= 0:
            raise ValueError(f"usd_per_gbp must be above 0, not {self.usd_per_gbp!r}")

    @classmethod
    def from_yaml(cls, path: str) -> PriceTable:
        with open(path) as f:
            data = yaml.safe_load(f) or {}
        unknown = set(data) - set(cls.__dataclass_fields__)
        if unknown:
            raise ValueError(
                f"{path}: unknown price keys {sorted(unknown)} (known: {sorted(cls.__dataclass_fields__)})"
            )
        try:
            return cls(**data)
        except (TypeError, ValueError) as e:
            raise ValueError(f"{path}: {e}") from e

    def device_hourly(self, accelerator: str) -> float:
        """Hourly price of the device named in a catalog row's `accelerator` ('cuda:NVIDIA H100 …', 'cpu:threads=1')."""
        if accelerator.startswith("cpu"):
            threads = accelerator.partition("threads=")[2].split("+", 1)[0]
            return self.cpu_core_hourly * (int(threads) if threads.isdigit() else 1)
        name = accelerator.upper()
        # Longest key first, so "H100" does not match an "H1000" and "L40S" wins over "L4".
        for key in sorted(self.gpu_hourly, key=len, reverse=True):
            if key.upper() in name:
                return self.gpu_hourly[key]
        return self.unknown_gpu_hourly

    def image_cost(self, accelerator: str, gpu_seconds: float, cpu_seconds: float) -> float:
        return (gpu_seconds * self.device_hourly(accelerator) + cpu_seconds * self.cpu_core_hourly) / 3600.0

    def node_monthly_usd(self) -> float:
        """The fixed monthly cost of one always-on GPU node of type `gpu_node`."""
        if self.gpu_node_monthly_usd is not None:
            return self.gpu_node_monthly_usd
        return self.device_hourly(f"cuda:{self.gpu_node}") * self.hours_per_month
