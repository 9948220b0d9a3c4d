"""The small file helpers every job uses: JSON read (a damaged file is one line naming it), atomic JSON write, CSV
write (cells a spreadsheet would run as formulas neutralised), a quick file digest."""

from __future__ import annotations

import csv
import hashlib
import json
import os
from pathlib import Path

FORMULA_START = ("=", "+", "-", "@", "\t", "\r")  # what Excel / LibreOffice / Sheets read as a formula


def read_json(path: str | Path):
    """A JSON file the project wrote; a damaged one is a ValueError naming it."""
    try:
        return json.loads(Path(path).read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ValueError(f"{path} is damaged (not valid JSON: {e})") from None


def write_json_atomic(path: str | Path, obj) -> None:
    """Written under PATH.tmp and renamed: an interrupted write leaves the previous file (or none), never half of one."""
    path = Path(path)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(obj, indent=1))
    os.replace(tmp, path)


def file_digest(path: str | Path, chunk: int = 1 << 20) -> str:
    """SHA-256 of a file's size, first and last MiB: tells two weight files apart in milliseconds whatever their size
    (retrained weights differ everywhere), not a checksum of every byte."""
    path = Path(path)
    size = path.stat().st_size
    h = hashlib.sha256(str(size).encode())
    with open(path, "rb") as f:
        h.update(f.read(chunk))
        f.seek(max(size - chunk, 0))
        h.update(f.read(chunk))
    return h.hexdigest()[:16]


def spreadsheet_safe(value):
    """A text cell that starts like a formula gets a leading apostrophe (OWASP's CSV-injection advice)."""
    return "'" + value if isinstance(value, str) and value.startswith(FORMULA_START) else value


def write_csv(rows: list[dict], path: str | Path) -> None:
    """Rows as CSV with the union of their keys as the header (first-seen order)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    keys = list(dict.fromkeys(k for r in rows for k in r))
    with open(path, "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=keys)
        writer.writeheader()
        writer.writerows([{k: spreadsheet_safe(v) for k, v in r.items()} for r in rows])
