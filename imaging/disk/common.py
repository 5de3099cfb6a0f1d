"""What every filesystem module returns: its superblock's facts and a check's verdict."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol


@dataclass(frozen=True)
class FsInfo:
    fs_type: str
    uuid: str
    label: str
    block_size: int
    block_count: int
    used_bytes: int

    @property
    def size_bytes(self) -> int:
        return self.block_size * self.block_count


class Verdict(Protocol):
    @property
    def exit_code(self) -> int: ...

    @property
    def ok(self) -> bool: ...


@dataclass(frozen=True)
class CheckVerdict:
    """A check tool's word on a filesystem (xfs_repair -n, btrfs check --readonly)."""

    tool: str
    exit_code: int
    summary: str

    @property
    def ok(self) -> bool:
        return self.exit_code == 0

    def __str__(self) -> str:
        return (
            f"{'clean' if self.ok else 'errors found'} ({self.tool}, exit {self.exit_code}): {self.summary}"
        )
