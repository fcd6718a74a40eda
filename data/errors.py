"""Errors for bad input: every one names the file, the line and the field."""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from pathlib import Path

log = logging.getLogger(__name__)


class DataError(ValueError):
    """A malformed input row. ``str()`` reads ``file:line: field 'x': what is wrong``."""

    def __init__(self, path: str | Path, line: int | None, field_name: str | None, message: str) -> None:
        self.path = str(path)
        self.line = line
        self.field = field_name
        where = self.path if line is None else f"{self.path}:{line}"
        what = f"field {field_name!r}: " if field_name else ""
        super().__init__(f"{where}: {what}{message}")


@dataclass
class BadRows:
    """Policy for malformed rows: raise (default) or skip and count them (``--skip-bad-rows``)."""

    skip: bool = False
    count: int = 0
    examples: list[str] = field(default_factory=list)

    def handle(self, error: DataError) -> None:
        if not self.skip:
            raise error
        self.count += 1
        if len(self.examples) < 5:
            self.examples.append(str(error))
        if self.count <= 5:
            log.warning("skipping bad row: %s", error)

    def report(self) -> str:
        if not self.count:
            return "bad rows: 0"
        return f"bad rows skipped: {self.count} (first: {self.examples[0]})"
