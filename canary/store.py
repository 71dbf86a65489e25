"""Durable persistence: the rollout state (atomic JSON) and the audit log (JSON lines).

``StateStore.save`` never leaves a torn file behind: it writes a temporary file in the same
directory, fsyncs it, ``os.replace``-s it over the old one (atomic on POSIX and Windows) and
fsyncs the directory so the rename itself survives a power cut. A reader sees either the old
state or the new one.

``AuditLog.append`` writes one JSON object per line and fsyncs before returning, so a Decision
that was acted on is on disk. A crash in the middle of a line leaves at most one partial last
line, which readers skip.
"""

from __future__ import annotations

import json
import os
import tempfile
from collections import deque
from pathlib import Path

from mlx_serving.canary.state import Decision, RolloutState


def _fsync_dir(directory: Path) -> None:
    """fsync a directory (makes a rename durable); a no-op where unsupported (Windows)."""
    try:
        fd = os.open(directory, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def atomic_write_text(path: str | os.PathLike, text: str) -> None:
    """Replace ``path`` with ``text`` atomically and durably (temp file, fsync, rename,
    fsync of the directory)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            f.write(text)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        try:
            os.unlink(tmp)
        except FileNotFoundError:
            pass
        raise
    _fsync_dir(path.parent)


class StateStore:
    """One rollout state as a JSON file at ``path``."""

    def __init__(self, path: str | os.PathLike) -> None:
        self.path = Path(path)

    def save(self, state: RolloutState) -> None:
        """Write ``state`` atomically (see the module docstring)."""
        atomic_write_text(self.path, json.dumps(state.to_dict(), indent=1, sort_keys=True,
                                                allow_nan=False) + "\n")

    def load(self) -> RolloutState | None:
        """The saved state, or None when nothing was saved yet."""
        try:
            text = self.path.read_text(encoding="utf-8")
        except FileNotFoundError:
            return None
        return RolloutState.from_dict(json.loads(text))

    def delete(self) -> None:
        """Remove the saved state (no error if absent)."""
        try:
            self.path.unlink()
        except FileNotFoundError:
            return
        _fsync_dir(self.path.parent)


class AuditLog:
    """Append-only JSON-lines log of Decisions at ``path``."""

    def __init__(self, path: str | os.PathLike) -> None:
        self.path = Path(path)

    def append(self, decision: Decision | dict) -> None:
        """Append one Decision (or a dict) as a line; flushed and fsynced on return."""
        record = decision.to_dict() if isinstance(decision, Decision) else dict(decision)
        line = json.dumps(record, sort_keys=True, allow_nan=False, ensure_ascii=False)
        new_file = not self.path.exists()
        self.path.parent.mkdir(parents=True, exist_ok=True)
        with open(self.path, "a+b") as f:
            if not new_file and f.tell() > 0:
                f.seek(-1, os.SEEK_END)
                if f.read(1) != b"\n":  # a torn line from a crash: end it, keep ours whole
                    line = "\n" + line
            f.write((line + "\n").encode("utf-8"))
            f.flush()
            os.fsync(f.fileno())
        if new_file:
            _fsync_dir(self.path.parent)

    def extend(self, decisions) -> None:
        """Append several Decisions (one fsync each; audit records are rare)."""
        for d in decisions:
            self.append(d)

    def last(self, n: int) -> list[Decision]:
        """The last ``n`` complete records, oldest first (a torn last line is skipped)."""
        if n <= 0:
            return []
        tail: deque[Decision] = deque(maxlen=n)
        try:
            with open(self.path, encoding="utf-8") as f:
                for line in f:
                    if not line.endswith("\n"):
                        break  # torn write at the end
                    try:
                        tail.append(Decision.from_dict(json.loads(line)))
                    except (ValueError, KeyError):
                        continue
        except FileNotFoundError:
            return []
        return list(tail)
