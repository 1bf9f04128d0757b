"""Progress bars that also reach a log file.

On a terminal, a tqdm bar. Elsewhere (a nightly job whose stderr goes to a file) tqdm's own
choice, `disable=None`, shows nothing, so a 40-minute generation cannot be told from a hang; here
the same bar becomes a log line at most once a minute instead.
"""

from __future__ import annotations

import logging
import re
import sys

from tqdm import std
from tqdm.auto import tqdm

logger = logging.getLogger("embedforge.progress")

# Seconds between two log lines of one bar when stderr is not a terminal.
LOG_INTERVAL = 60.0
LOG_FORMAT = "{desc}: {n_fmt}/{total_fmt} {unit} [{elapsed} elapsed, {remaining} left, {rate_fmt}]"
UNSIZED_LOG_FORMAT = "{desc}: {n_fmt} {unit} [{elapsed} elapsed, {rate_fmt}]"  # no total, so no time left to tell
# tqdm moves the cursor between bars shown at once (an encode bar under the generation bar).
CURSOR_MOVES = re.compile(r"\x1b\[[0-9;]*[A-Za-z]")


class _LogLines:
    """A file for tqdm that turns each refresh into one log line (tqdm rewrites a line with '\\r')."""

    def write(self, text: str) -> None:
        text = CURSOR_MOVES.sub("", text).strip("\r\n ")
        if text:
            logger.info(text)

    def flush(self) -> None:
        pass


def progress_bar(iterable=None, *, show: bool = True, **options) -> tqdm:
    """tqdm over `iterable` (or with `total=`), shown on a terminal or logged, hidden when not `show`."""
    if not show:
        return tqdm(iterable, disable=True, **options)
    # Under Jupyter, tqdm.auto is the notebook widget, and stderr is no terminal either.
    notebook = any(base.__module__ == "tqdm.notebook" for base in tqdm.__mro__)
    if notebook or (hasattr(sys.stderr, "isatty") and sys.stderr.isatty()):
        return tqdm(iterable, **options)
    sized = options.get("total") is not None or hasattr(iterable, "__len__")
    # disable=False: the CLI switches other libraries' bars off in a log file (TQDM_DISABLE), not ours.
    return std.tqdm(iterable, file=_LogLines(), mininterval=LOG_INTERVAL, miniters=1, bar_format=LOG_FORMAT if sized else UNSIZED_LOG_FORMAT,
                    disable=False, **options)
