"""Rich progress bars on standard error, so standard output stays machine-readable."""

from __future__ import annotations

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

    level = transformers.logging.get_verbosity()
    transformers.logging.disable_progress_bar()
    transformers.logging.set_verbosity_error()
    try:
        yield
    finally:
        transformers.logging.enable_progress_bar()
        transformers.logging.set_verbosity(level)
