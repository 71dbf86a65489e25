"""The Router's side of a rollout: which variant a request goes to, and its samples.

Each Router replica keeps a copy of the routing table (stable, canary, weight, epoch) that
the RolloutController pushes through a long-poll, and sends per-request samples to the
controller in batches. Without a rollout every request goes to the stable variant.
"""

from __future__ import annotations

import asyncio
import contextvars
import logging
import time
import uuid
from dataclasses import dataclass

from mlx_serving.canary import FlagSet, routes_to_canary

log = logging.getLogger(__name__)

FLUSH_INTERVAL_S = 0.5
MAX_BUFFERED_SAMPLES = 10_000
_POLL_TIMEOUT_S = 5.0  # also bounds staleness if the controller is replaced


@dataclass(frozen=True)
class Route:
    """Where one request goes."""

    variant: str
    arm: str | None      # "stable" / "canary" while a rollout runs, else None
    epoch: int


class TrafficSplit:
    """Routing table copy + sample batching for one Router replica."""

    def __init__(self, controller, default_stable: str):
        self._controller = controller
        self._table = {"version": -1, "rollout_id": None, "stable": default_stable,
                       "canary": None, "weight": 0.0, "epoch": 0}
        self._samples: list[dict] = []
        self._tasks: list[asyncio.Task] = []
        self._flags: tuple[int, FlagSet | None] = (-1, None)
        self._polls = 0                      # long-poll answers received
        self._poll_failures: list[str] = []  # the last few failed polls
        self._last_answer = 0.0              # time.monotonic() of the last answer

    @property
    def table(self) -> dict:
        self._ensure_started()
        return self._table

    def _ensure_started(self) -> None:
        # Lazily: the long-poll needs the replica's running event loop. Every use of the
        # table (re)starts it, so no Router keeps a table that only a refresh() ever set,
        # and a watcher that ended for any reason is replaced on the next request.
        if self._controller is None:
            return
        if not self._tasks or any(t.done() for t in self._tasks):
            for t in self._tasks:
                t.cancel()
            # A fresh context: started inside a request, the tasks would otherwise carry
            # that request's Serve context (its id on every long-poll, forever).
            self._tasks = [asyncio.create_task(self._watch(), context=contextvars.Context()),
                           asyncio.create_task(self._flush(), context=contextvars.Context())]

    async def refresh(self) -> None:
        """Fetch the routing table now (e.g. right after an operator command)."""
        if self._controller is not None:
            self._ensure_started()
            self._apply(await self._controller.routing.remote())

    def _apply(self, table: dict) -> None:
        # The long-poll and a refresh may answer out of order: keep the newest table.
        if table["version"] >= self._table["version"]:
            self._table = table

    def watch_state(self) -> dict:
        """How this Router's copy of the routing table is kept fresh (for operators)."""
        return {"version": self._table["version"],
                "watching": bool(self._tasks) and not self._tasks[0].done(),
                "polls": self._polls,
                "seconds_since_answer": (round(time.monotonic() - self._last_answer, 1)
                                         if self._last_answer else None),
                "recent_failures": list(self._poll_failures)}

    @staticmethod
    def request_key(user: str | None, session: str | None) -> str:
        """The sticky key of a request: the `user` field, else X-Session-Id, else random."""
        return user or session or uuid.uuid4().hex

    def directive(self, variant: str) -> dict | None:
        """The QoS directive for ``variant`` in the current table (None: act normally)."""
        return self._table.get("qos", {}).get(variant)

    def route(self, key: str) -> Route:
        """The variant for a request with sticky ``key``."""
        t = self.table
        canary = t["canary"]
        if canary is None or t["weight"] <= 0:
            return Route(t["stable"], None, t["epoch"])
        if routes_to_canary(t["rollout_id"], key, t["weight"]):
            return Route(canary, "canary", t["epoch"])
        return Route(t["stable"], "stable", t["epoch"])

    def enabled_flags(self, key: str, variant: str) -> list[str]:
        """Names of the feature flags on for this key and variant."""
        version, flags = self._flags
        if version != self._table["version"]:
            raw = self._table.get("flags")
            flags = FlagSet.from_dict(raw) if raw else None
            self._flags = (self._table["version"], flags)
        if flags is None:
            return []
        return [f.name for f in flags.list() if flags.enabled(f.name, key, variant)]

    def record(self, route: Route, *, ttft_s: float | None, itl_s: float | None,
               e2e_s: float | None, error: bool) -> None:
        """Queue one finished request's numbers for the controller (its QoS monitor, and
        the rollout's analysis when the request was part of one)."""
        if self._controller is None or len(self._samples) >= MAX_BUFFERED_SAMPLES:
            return
        self._samples.append({"variant": route.variant, "arm": route.arm, "epoch": route.epoch,
                              "ttft_s": ttft_s, "itl_s": itl_s, "e2e_s": e2e_s, "error": error})

    async def _watch(self) -> None:
        while True:
            try:
                # Bounded here too: a call to a controller that died mid-poll must not hang.
                self._apply(await asyncio.wait_for(
                    self._controller.wait_for_change.remote(self._table["version"],
                                                            _POLL_TIMEOUT_S),
                    _POLL_TIMEOUT_S + 2.0))
                self._polls += 1
                self._last_answer = time.monotonic()
            except asyncio.CancelledError as exc:
                if _stopping():
                    raise
                await self._poll_failed(exc)  # cancelled on the controller's side
            except Exception as exc:  # controller restarting: keep the last table, retry
                await self._poll_failed(exc)

    async def _poll_failed(self, exc: BaseException) -> None:
        log.debug("routing long-poll failed: %r", exc)
        self._poll_failures = [*self._poll_failures[-4:], repr(exc)[:200]]
        await asyncio.sleep(1.0)

    async def _flush(self) -> None:
        while True:
            await asyncio.sleep(FLUSH_INTERVAL_S)
            if not self._samples:
                continue
            batch, self._samples = self._samples, []
            try:
                await self._controller.record.remote(batch)
            except asyncio.CancelledError:
                if _stopping():
                    raise
                log.debug("sending %d samples was cancelled by the controller's side", len(batch))
            except Exception as exc:  # lost samples only delay a decision
                log.debug("sending %d samples failed: %r", len(batch), exc)

    def stop(self) -> None:
        for t in self._tasks:
            t.cancel()


def _stopping() -> bool:
    """Whether the current task itself is being cancelled (``stop``, replica shutdown).

    Awaiting a Serve handle call also raises CancelledError when the callee's side
    cancels it (the controller replica shutting down mid-call, for one). Treating that as
    our own cancellation used to end the long-poll for good, leaving the Router on an old
    routing table.
    """
    task = asyncio.current_task()
    return task is None or task.cancelling() > 0
