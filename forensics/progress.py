"""Rich progress bars on standard error, so standard output stays machine-readable."""

from __future__ import annotations

import functools
from contextlib import contextmanager

from rich.console import Console
from rich.progress import BarColumn, DownloadColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, \
    TimeRemainingColumn, TransferSpeedColumn

err = Console(stderr=True)


def byte_progress(show: bool = True) -> Progress:
    return Progress(TextColumn("[bold]{task.description}"), BarColumn(), DownloadColumn(), TransferSpeedColumn(),
                    TimeRemainingColumn(), console=err, disable=not show)


def step_progress() -> Progress:
    return Progress(TextColumn("[bold]{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
                    TimeRemainingColumn(), console=err)


@contextmanager
def quiet_transformers():
    """transformers' tqdm bars and load-time notices (the unused LM head of a causal-LM checkpoint loaded into its
    base model, for one) would interleave with our bars."""
    import transformers
    from transformers import modeling_gguf_pytorch_utils as gguf_loader

    level = transformers.logging.get_verbosity()
    transformers.logging.disable_progress_bar()
    transformers.logging.set_verbosity_error()
    # The GGUF loader calls tqdm itself, outside transformers' switch.
    bar = gguf_loader.tqdm
    gguf_loader.tqdm = functools.partial(bar, disable=True)
    try:
        yield
    finally:
        gguf_loader.tqdm = bar
        transformers.logging.enable_progress_bar()
        transformers.logging.set_verbosity(level)
