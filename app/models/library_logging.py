"""What the model libraries (diffusers, transformers, peft) print while loading and building models.

Imported by the loader and the tiny builders alike; diffusers and transformers are imported only
when `quiet_libraries` runs.
"""

from __future__ import annotations


def quiet_libraries() -> None:
    """Loading bars and "no text-encoder LoRA keys" notices would flood every actor's log."""
    import warnings

    import diffusers.utils.logging as dlog
    import transformers.utils.logging as tlog

    # peft warns on every second adapter loaded into one model: intended here (a LoRA cache).
    warnings.filterwarnings("ignore", message="Already found a `peft_config` attribute")
    dlog.set_verbosity_error()
    dlog.disable_progress_bar()
    tlog.set_verbosity_error()
    tlog.disable_progress_bar()
