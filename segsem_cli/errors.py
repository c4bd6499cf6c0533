"""One exception type for bad input: its message is the one line the CLI prints."""
from __future__ import annotations


class SegsemError(Exception):
    """Bad input or an unusable configuration.

    The message is a single line that names the file, row and field at fault,
    for example ``manifest.csv row 3 field 'x_nm': 'abc' is not a number``.
    The CLI prints it and exits with status 2.
    """


def where(path, row: int | None = None, field: str | None = None) -> str:
    """Format the location prefix of an error message: ``file row N field 'f'``."""
    s = str(path)
    if row is not None:
        s += f" row {row}"
    if field is not None:
        s += f" field '{field}'"
    return s
