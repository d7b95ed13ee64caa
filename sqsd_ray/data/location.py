"""Where a record came from, and the error that names it: shared by the readers and the presets."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal


@dataclass(frozen=True)
class Location:
    """Where a record came from: ``file`` as shown in errors, ``name`` as shown in ``Sample.source``."""

    file: str
    name: str
    kind: Literal["line", "record"]
    number: int  # 1-based line number, or 0-based record index

    def __str__(self) -> str:
        if self.kind == "line":
            return f"{self.file} line {self.number}"
        return f"{self.file} record index {self.number} (0-based)"

    @property
    def source(self) -> str:
        """Compact form: ``file.jsonl:12`` (line) or ``file.json[12]`` (0-based record index)."""
        return f"{self.name}:{self.number}" if self.kind == "line" else f"{self.name}[{self.number}]"


class DataError(ValueError):
    """A data file or record is unusable. ``reason`` is the skip-reason key; the message names where and what."""

    def __init__(self, message: str, *, reason: str, location: Location | str | None = None, field: str | None = None):
        self.reason = reason
        self.location = location
        self.field = field
        self.detail = message
        where = [str(location)] if location is not None else []
        if field is not None:
            where.append(f"field {field!r}")
        super().__init__(": ".join([*where, message]) + f" [{reason}]")
