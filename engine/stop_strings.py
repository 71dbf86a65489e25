"""OpenAI-style ``stop`` strings matched over streamed text deltas."""

from __future__ import annotations

import re
from collections.abc import Sequence


class StopStringMatcher:
    """Finds the first stop string in a stream of text deltas.

    Stop strings may straddle delta boundaries: a tail of the stream that could be the
    beginning of a stop string is held back until it is known not to be. The matched
    stop string and everything after it are never emitted.

    Which stop wins: the stream ends at the first feed that completes any stop string;
    if that feed completes several, the one that starts earliest in the text wins, so
    the emitted text is everything before the earliest complete stop string.
    """

    def __init__(self, stops: Sequence[str]) -> None:
        """Build a matcher for ``stops`` (a bare string counts as one stop string).

        Raises:
            ValueError: if any stop string is empty.
        """
        self._stops = tuple(dict.fromkeys([stops] if isinstance(stops, str) else stops))
        if "" in self._stops:
            raise ValueError("stop strings must be non-empty")
        self._held = ""
        self._matched = False
        if not self._stops:
            return  # feed() passes text straight through
        # Regex search finds the leftmost match, i.e. the earliest-starting stop string.
        self._any_stop = re.compile("|".join(map(re.escape, self._stops)))
        self._first_char = re.compile("[" + "".join({re.escape(s[0]) for s in self._stops}) + "]")
        self._max_held = max(map(len, self._stops)) - 1

    def feed(self, text: str) -> tuple[str, bool]:
        """Add a delta; return (text safe to emit now, whether a stop string matched).

        After a match the stream is over: calling ``feed`` again raises RuntimeError.
        """
        if not self._stops:
            return text, False
        if self._matched:
            raise RuntimeError("feed() called after a stop string matched")
        buf = self._held + text
        match = self._any_stop.search(buf)
        if match:
            self._matched = True
            self._held = ""
            return buf[: match.start()], True
        hold = self._hold_start(buf)
        self._held = buf[hold:]
        return buf[:hold], False

    def flush(self) -> str:
        """Return the held-back text; call when generation ends without a match."""
        held, self._held = self._held, ""
        return held

    def _hold_start(self, buf: str) -> int:
        """Start of the longest tail of ``buf`` that is a proper prefix of a stop string.

        Returns ``len(buf)`` when no tail is. ``buf`` must contain no whole stop string.
        """
        candidate = self._first_char.search(buf, max(0, len(buf) - self._max_held))
        while candidate:
            i = candidate.start()
            if any(stop.startswith(buf[i:]) for stop in self._stops):
                return i
            candidate = self._first_char.search(buf, i + 1)
        return len(buf)
