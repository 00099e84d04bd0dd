"""Prices and the cost of one image: device seconds and CPU seconds at list prices.

The defaults are on-demand list prices per hour (USD, late 2026, rounded); a team sets its own in
a YAML file with the same keys (`imagefab ... --prices prices.yaml`, or the spec later on).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import yaml

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

    @classmethod
    def from_yaml(cls, path: str) -> PriceTable:
        with open(path) as f:
            data = yaml.safe_load(f) or {}
        unknown = set(data) - set(cls.__dataclass_fields__)
        if unknown:
            raise ValueError(f"{path}: unknown price keys {sorted(unknown)}")
        return cls(**data)

    def device_hourly(self, accelerator: str) -> float:
        """Hourly price of the device named in a catalog row's `accelerator` ('cuda:NVIDIA H100 …', 'cpu:threads=1')."""
        if accelerator.startswith("cpu"):
            threads = accelerator.partition("threads=")[2]
            return self.cpu_core_hourly * (int(threads) if threads.isdigit() else 1)
        name = accelerator.upper()
        # Longest key first, so "H100" does not match an "H1000" and "L40S" wins over "L4".
        for key in sorted(self.gpu_hourly, key=len, reverse=True):
            if key.upper() in name:
                return self.gpu_hourly[key]
        return self.unknown_gpu_hourly

    def image_cost(self, accelerator: str, gpu_seconds: float, cpu_seconds: float) -> float:
        return (gpu_seconds * self.device_hourly(accelerator) + cpu_seconds * self.cpu_core_hourly) / 3600.0
