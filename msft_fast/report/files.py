"""The files a report writes into an output folder, and writing them so that a reader never sees
half of one."""
from __future__ import annotations

from msft_fast.state.atomic_io import write_file_atomic
from msft_fast.errors import OutputError

HISTORY_FILE = "history.json"
CURVES_FILE = "curves.png"
REPORT_FILE = "report.md"


def write_text_atomic(path: str, text: str) -> None:
    """Text twin of `atomic_io.write_json_atomic`: a reader never sees a half-written file."""
    _write_atomic(path, lambda f: f.write(text.encode("utf-8")))


def _write_atomic(path: str, fill) -> None:
    """`atomic_io.write_file_atomic` (umask permissions), failures as one OutputError sentence."""
    try:
        write_file_atomic(path, fill)
    except OSError as e:
        raise OutputError(f"cannot write {path} ({e.strerror or e})") from None
