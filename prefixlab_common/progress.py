"""The progress callback every long computation accepts: `progress(done, total, info)`, called as
work advances; `info` is a dict of what the caller may show (loss, step, a label under "what").
`cli.py`'s progress bar and `engine.progress.StudyProgress` are callables of this type."""

from __future__ import annotations

from typing import Callable

Progress = Callable[[int, int, dict], None]  # (done, total, info) -> None
