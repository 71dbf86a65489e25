"""When waiting prompts join a batch that is decoding.

Every time new prompts join a decoding batch, the batch runs a prompt pass for them and
merges their KV caches into the batch's (a copy of every layer's cache), while the running
sequences wait. Over HTTP, requests arrive one at a time, a few
milliseconds apart, so admitting each one at the next step pays that cost once per request.
The gate holds arrivals for a few decode steps so that they join in groups, the rule TGI's
router applies with ``--max-waiting-tokens`` and ``--waiting-served-ratio``: waiting
prompts join when they have waited ``max_wait_steps`` decode steps, or when they number at
least ``min_waiting_ratio`` of the running sequences, or when they would fill the batch.
An idle batch takes arrivals at once.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass
class PrefillGate:
    """Decides, each engine turn, whether waiting prompts may join the batch now."""

    max_wait_steps: int       # 0: never hold
    min_waiting_ratio: float  # waiting / running that opens the gate early
    _held_since: int | None = None  # decode step at which the current hold began

    def open(self, *, step: int, running: int, waiting: int, free_slots: int) -> bool:
        """True if the ``waiting`` prompts should join a batch of ``running`` sequences now.

        ``step`` counts the engine's decode steps; ``free_slots`` is what the batch can take.
        """
        if (waiting == 0 or running == 0 or self.max_wait_steps == 0
                or waiting >= free_slots or waiting >= self.min_waiting_ratio * running):
            self._held_since = None
            return True
        if self._held_since is None:
            self._held_since = step
        if step - self._held_since >= self.max_wait_steps:
            self._held_since = None
            return True
        return False
