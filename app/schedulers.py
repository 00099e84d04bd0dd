"""Scheduler names: imagefab's, the diffusers class behind each, and AUTOMATIC1111's (for infotext).

Kept free of torch so that metadata writers and the HTTP layer can name samplers cheaply.
"""

from __future__ import annotations

SCHEDULERS: dict[str, tuple[str, dict, str]] = {
    # name: (diffusers class, extra config, A1111 sampler name)
    "euler": ("EulerDiscreteScheduler", {}, "Euler"),
    "euler_a": ("EulerAncestralDiscreteScheduler", {}, "Euler a"),
    # Trailing timesteps start denoising from pure noise: what few-step (Lightning/Turbo-style)
    # settings need, with guidance near 1.
    "euler_trailing": ("EulerDiscreteScheduler", {"timestep_spacing": "trailing"}, "Euler"),
    "euler_a_trailing": ("EulerAncestralDiscreteScheduler", {"timestep_spacing": "trailing"}, "Euler a"),
    "ddim": ("DDIMScheduler", {}, "DDIM"),
    "dpmpp_2m": ("DPMSolverMultistepScheduler", {"algorithm_type": "dpmsolver++"}, "DPM++ 2M"),
    "dpmpp_2m_karras": (
        "DPMSolverMultistepScheduler",
        {"algorithm_type": "dpmsolver++", "use_karras_sigmas": True},
        "DPM++ 2M Karras",
    ),
    "unipc": ("UniPCMultistepScheduler", {}, "UniPC"),
    "lcm": ("LCMScheduler", {}, "LCM"),
}


def sampler_name(scheduler: str) -> str:
    """The AUTOMATIC1111 name of an imagefab scheduler."""
    return SCHEDULERS[scheduler][2]
