"""Percentage feature flags on the rollout bucketing, with a kill switch.

A flag is on for a key when ``bucket(f"flag:{name}", key) < threshold(percent)`` (the
bucketing rule of :mod:`mlx_serving.canary.bucketing`, with the rollout id ``flag:<name>``),
the variant serving the request is one the flag applies to (none listed = all), and the flag
is not killed. Raising the percentage only adds keys; killing turns it off everywhere at once
without forgetting the percentage.
"""

from __future__ import annotations

import json
from collections.abc import Iterable

from pydantic import BaseModel, ConfigDict, Field

from mlx_serving.canary.bucketing import bucket, weight_threshold


class Flag(BaseModel):
    """One feature flag."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    name: str = Field(min_length=1, max_length=200, description="Flag name (unique).")
    percent: float = Field(
        default=0.0, ge=0.0, le=100.0,
        description="Share of keys (percent, 0.01 resolution) for which the flag is on.")
    variants: tuple[str, ...] = Field(
        default=(), description="Variants the flag applies to; empty means every variant.")
    killed: bool = Field(default=False, description="Kill switch: off for everyone.")

    def enabled(self, key: str, variant: str | None = None) -> bool:
        """Is the flag on for ``key`` served by ``variant``?"""
        if self.killed:
            return False
        if self.variants and variant not in self.variants:
            return False
        return bucket(f"flag:{self.name}", key) < weight_threshold(self.percent)


class FlagSet:
    """The flags by name; JSON round trip with :meth:`to_json` / :meth:`from_json`."""

    def __init__(self, flags: Iterable[Flag] = ()) -> None:
        self._flags: dict[str, Flag] = {}
        for flag in flags:
            self.set(flag)

    def set(self, flag: Flag) -> None:
        """Add or replace a flag."""
        self._flags[flag.name] = flag

    def get(self, name: str) -> Flag | None:
        """The flag called ``name``, or None."""
        return self._flags.get(name)

    def remove(self, name: str) -> bool:
        """Delete a flag; True if it existed."""
        return self._flags.pop(name, None) is not None

    def list(self) -> list[Flag]:
        """All flags, sorted by name."""
        return [self._flags[k] for k in sorted(self._flags)]

    def kill(self, name: str, killed: bool = True) -> Flag:
        """Flip a flag's kill switch; returns the new flag (KeyError if unknown)."""
        flag = self._flags[name].model_copy(update={"killed": killed})
        self._flags[name] = flag
        return flag

    def enabled(self, name: str, key: str, variant: str | None = None) -> bool:
        """Is flag ``name`` on for ``key`` served by ``variant``? Unknown flags are off."""
        flag = self._flags.get(name)
        return flag is not None and flag.enabled(key, variant)

    def __len__(self) -> int:
        return len(self._flags)

    def __contains__(self, name: object) -> bool:
        return name in self._flags

    def to_dict(self) -> dict:
        """``{"flags": [...]}``, sorted by name."""
        return {"flags": [f.model_dump(mode="json") for f in self.list()]}

    @classmethod
    def from_dict(cls, data: dict) -> "FlagSet":
        """Inverse of :meth:`to_dict` (validates every flag)."""
        return cls(Flag.model_validate(f) for f in data.get("flags", []))

    def to_json(self) -> str:
        """JSON text of :meth:`to_dict`."""
        return json.dumps(self.to_dict(), sort_keys=True, ensure_ascii=False)

    @classmethod
    def from_json(cls, text: str) -> "FlagSet":
        """Inverse of :meth:`to_json`."""
        return cls.from_dict(json.loads(text))
