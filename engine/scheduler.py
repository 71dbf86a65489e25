"""The engine thread: the only code that calls MLX.

Callers talk to it through an inbox of messages (submit, cancel, call). Each loop turn
drains the inbox, ends requests whose deadline passed, applies backpressure, admits waiting
sequences under the KV budget (interactive first, preempting batch-class work if need be)
and runs one step of every model's batch, then hands token deltas to each request's stream.
"""

from __future__ import annotations

import concurrent.futures
import logging
import os
import queue
import threading
import time
from dataclasses import dataclass
from typing import Any, Callable

import mlx.core as mx

from mlx_serving.engine.admission import AdmissionControl
from mlx_serving.engine.config import EngineConfig
from mlx_serving.engine.detokenizer import IncrementalDetokenizer
from mlx_serving.engine.errors import DeadlineExceededError, EngineClosedError, ReaderStalledError
from mlx_serving.engine.outputs import FinishReason, RequestOutput, Timings, Usage
from mlx_serving.engine.params import Priority
from mlx_serving.engine.prefill_gate import PrefillGate
from mlx_serving.engine.runner import ModelRunner
from mlx_serving.engine.sampling import token_logprob
from mlx_serving.engine.sequence import (DeadlineHeap, PauseReason, Sequence, SequenceStatus,
                                         WaitQueue)
from mlx_serving.engine.stop_strings import StopStringMatcher
from mlx_serving.engine.stream import wake
from mlx_serving.engine.thread_names import name_this_thread

log = logging.getLogger(__name__)

_IDLE_POLL_S = 1.0      # idle wake-up, keeps the heartbeat fresh
_PAUSED_POLL_S = 0.02   # wake-up while only paused sequences wait for their readers
# After waking from idle, keep collecting submissions while they arrive this close together,
# so a burst is prefilled as one batch instead of trickling in one request per step.
_BURST_GAP_S = 0.002


@dataclass
class _Submit:
    seq: Sequence


@dataclass
class _Cancel:
    request_id: str


@dataclass
class _Call:
    fn: Callable[[], Any]
    future: concurrent.futures.Future


class _Stop:
    pass


@dataclass
class SchedulerCounters:
    steps: int = 0
    prefill_steps: int = 0   # steps that also processed prompt tokens
    generated_tokens: int = 0
    finished: int = 0
    paused_total: int = 0   # slow-reader pauses
    preempted: int = 0      # batch-class sequences paused to make room for interactive ones
    expired: int = 0        # requests ended by their deadline
    queued_s: float = 0.0   # sums over the finished requests: submit -> admitted,
    ttft_s: float = 0.0     # and submit -> first token (those that got one),
    request_s: float = 0.0  # and submit -> end
    to_decode_s: float = 0.0   # admitted -> prompt passed and in the decode batch
    to_decode_steps: int = 0   # the same in engine steps,
    to_token_steps: int = 0    # and in the decode batch -> first token
    # the engine thread's time outside mlx-lm's own prompt and decode timers
    tokens_s: float = 0.0   # handing each step's tokens to their requests (detokenize, stop
                            # strings, streams, waking readers)
    idle_s: float = 0.0     # waiting for work with nothing to step
    cpu_s: float = 0.0      # the engine thread's CPU time (time.thread_time), at its last turn


class Scheduler:
    """Owns the engine thread and every sequence after submission."""

    def __init__(self, config: EngineConfig, kv_budget_bytes: int):
        self.config = config
        self.kv_budget_bytes = kv_budget_bytes
        self.kv_reserved_bytes = 0
        self.runners: dict[str, ModelRunner] = {}
        self.admission = AdmissionControl(config, kv_budget_bytes)
        self.prefill_gate = PrefillGate(config.prefill_wait_steps, config.prefill_wait_ratio)
        self.counters = SchedulerCounters()
        self.heartbeat = time.monotonic()
        self.failure: BaseException | None = None
        self._inbox: queue.SimpleQueue = queue.SimpleQueue()
        self._waiting = WaitQueue()
        self._paused: list[Sequence] = []   # slow readers and preempted sequences
        self._deadlines = DeadlineHeap()
        self._live: dict[str, Sequence] = {}
        self._live_batch = 0                # batch-class sequences in _live
        self._to_wake: list = []            # streams given output this turn
        self._lock = threading.Lock()       # guards _ids and _closed (touched by callers)
        self._ids: set[str] = set()
        # Set once the engine thread takes no more work (stopping, or died); from then on the
        # inbox gets nothing, so nothing can land there after _abort_all has emptied it.
        self._closed = False
        self._thread = threading.Thread(target=self._run, name="mlx-engine", daemon=True)

    # -- any thread ----------------------------------------------------------------------------
    def start(self) -> None:
        self._thread.start()

    @property
    def alive(self) -> bool:
        return self._thread.is_alive()

    @property
    def num_waiting(self) -> int:
        return self.admission.queued_requests

    @property
    def num_paused(self) -> int:
        return len(self._paused)

    @property
    def num_running(self) -> int:
        return sum(r.num_running for r in list(self.runners.values()))

    def enqueue(self, seq: Sequence) -> None:
        """Queue a sequence for admission; raises QueueFullError (or its LoadShedError) when
        admission control refuses it."""
        with self._lock:
            if self._closed:
                raise EngineClosedError("the engine thread is not running")
            if seq.request_id in self._ids:
                raise ValueError(f"request id {seq.request_id!r} is already in use")
            runner = self.runners.get(seq.model_name)
            self.admission.reserve(
                len(seq.prompt_ids), seq.kv_bytes, seq.priority,
                free_slots=self._free_slots(runner) if runner else self.config.max_batch_size)
            self._ids.add(seq.request_id)
            self._inbox.put(_Submit(seq))

    def cancel(self, request_id: str) -> None:
        self._inbox.put(_Cancel(request_id))

    def call(self, fn: Callable[[], Any]) -> concurrent.futures.Future:
        """Run ``fn`` on the engine thread between steps; the future holds its result."""
        future: concurrent.futures.Future = concurrent.futures.Future()
        with self._lock:
            if self._closed or not self.alive:
                future.set_exception(EngineClosedError("the engine thread is not running"))
            else:
                self._inbox.put(_Call(fn, future))
        return future

    def stop(self) -> None:
        self._inbox.put(_Stop())

    def join(self, timeout: float = 30.0) -> None:
        """Wait for the engine thread to end, including its native thread-exit work.

        ``Thread.join`` returns before the OS thread runs its thread-local destructors, and
        MLX's per-thread compile cache takes the GIL in one of them: if that overlaps
        interpreter shutdown the process aborts ("terminate called without an active
        exception"). So also wait until the OS thread is gone (Linux: /proc/self/task).
        """
        self._thread.join(timeout)
        task = f"/proc/self/task/{self._thread.native_id}"
        deadline = time.monotonic() + timeout
        while os.path.exists(task) and time.monotonic() < deadline:
            time.sleep(0.001)

    # -- engine thread -----------------------------------------------------------------------------
    def remove_runner(self, name: str) -> None:
        """Drop a model: its sequences end with an error and its memory is freed."""
        runner = self.runners[name]
        for seq in [s for s in self._live.values() if s.model_name == name]:
            self._end(seq, FinishReason.ERROR, f"model {name!r} was unloaded", "model_not_found")
        del self.runners[name]
        runner.close()
        mx.clear_cache()

    def _run(self) -> None:
        name_this_thread(self._thread.name)
        try:
            while self._drain_inbox(self._wait_timeout()):
                if self._deadlines:
                    self._expire(time.monotonic())
                self._apply_backpressure()
                self._admit()
                for runner in list(self.runners.values()):
                    if runner.by_uid:
                        self._step(runner)
                started = time.perf_counter()
                self._wake_readers()
                self.counters.tokens_s += time.perf_counter() - started
                self.counters.cpu_s = time.thread_time()
                self.heartbeat = time.monotonic()
        except BaseException as exc:  # a bug here must not leave callers hanging
            log.exception("engine thread died")
            self.failure = exc
            self._abort_all(f"engine thread died: {exc!r}")
        finally:
            self._wake_readers()
            for runner in self.runners.values():
                runner.close()
            mx.synchronize()  # no async work may outlive the thread that queued it
            self.runners.clear()

    def _wait_timeout(self) -> float | None:
        if any(r.by_uid for r in self.runners.values()):
            return 0.0
        if self._paused or self._waiting:  # readers to catch up, or admission blocked on KV
            timeout = _PAUSED_POLL_S
        else:
            timeout = _IDLE_POLL_S
        nearest = self._deadlines.nearest
        if nearest is not None:
            timeout = min(timeout, max(0.0, nearest - time.monotonic()))
        return timeout

    def _drain_inbox(self, timeout: float | None) -> bool:
        """Handle every queued message; False once a stop message arrives."""
        started = time.perf_counter()
        try:
            msg = self._inbox.get(timeout=timeout) if timeout else self._inbox.get_nowait()
        except queue.Empty:
            self.heartbeat = time.monotonic()
            return True
        finally:
            if timeout:
                self.counters.idle_s += time.perf_counter() - started
        gap = _BURST_GAP_S if timeout else 0.0  # we were idle: gather the rest of a burst
        while True:
            if isinstance(msg, _Stop):
                self._abort_all("the engine is shutting down")
                self._wake_readers()
                return False
            self._handle(msg)
            try:
                msg = self._inbox.get(timeout=gap) if gap else self._inbox.get_nowait()
            except queue.Empty:
                return True

    def _push(self, seq: Sequence, delta: RequestOutput) -> None:
        if seq.stream.push(delta):
            self._to_wake.append(seq.stream)

    def _wake_readers(self) -> None:
        if self._to_wake:
            wake(self._to_wake)
            self._to_wake = []

    def _handle(self, msg) -> None:
        if isinstance(msg, _Submit):
            seq = msg.seq
            self._live[seq.request_id] = seq
            self._waiting.append(seq)
            if seq.priority is Priority.BATCH:
                self._live_batch += 1
            if seq.deadline is not None:
                self._deadlines.push(seq)
        elif isinstance(msg, _Cancel):
            seq = self._live.get(msg.request_id)
            if seq is not None:
                self._end(seq, FinishReason.CANCELLED)
        elif isinstance(msg, _Call):
            if msg.future.set_running_or_notify_cancel():
                try:
                    msg.future.set_result(msg.fn())
                except BaseException as exc:
                    msg.future.set_exception(exc)

    def _admit(self) -> None:
        """Admit waiting sequences in order, interactive ones first.

        An interactive sequence that does not fit may preempt running batch-class ones.
        Preempted sequences resume before any new batch-class sequence is admitted, and
        only while no interactive one waits. Nothing joins a decoding batch until the
        prefill gate opens (see ``PrefillGate``).
        """
        waiting = self._waiting
        if not self._prefill_gate_open():
            return
        if waiting or self._paused:
            for runner in self.runners.values():  # the leaving and the joining in one change
                runner.release_retired()
        while waiting.has_interactive:
            if not self._admit_next(preempt=True):
                return
        if self._paused and not self._resume_preempted():
            return
        while waiting:
            if not self._admit_next(preempt=False):
                return

    def _prefill_gate_open(self) -> bool:
        if not self._waiting:
            return True
        runner = self.runners.get(self._waiting.head().model_name)
        if runner is None:
            return True
        return self.prefill_gate.open(step=self.counters.steps, running=runner.num_running,
                                      waiting=len(self._waiting),
                                      free_slots=self._free_slots(runner))

    def _admit_next(self, *, preempt: bool) -> bool:
        """Admit the head of the queue; False if it has to wait."""
        seq = self._waiting.head()
        runner = self.runners.get(seq.model_name)
        if runner is None:
            self._end(seq, FinishReason.ERROR, f"model {seq.model_name!r} was unloaded",
                      "model_not_found")
            return True
        if not self._fits(runner, seq.kv_bytes):
            if not (preempt and self._preempt_for(runner, seq)):
                return False
        self._waiting.pop_head()
        self._leave_queue(seq, admitted=True)
        self._hold_kv(seq, seq.kv_bytes)
        seq.admitted_at = time.monotonic()
        seq.admitted_step = self.counters.steps
        tokenizer = runner.loaded.tokenizer
        seq.detokenizer = IncrementalDetokenizer(tokenizer, prompt_ids=seq.prompt_ids)
        if seq.params.stop:
            seq.stop_matcher = StopStringMatcher(seq.params.stop)
        runner.start(seq)
        return True

    def _free_slots(self, runner: ModelRunner) -> int:
        """Sequences ``runner``'s batch could take now."""
        return max(0, self.config.max_batch_size - runner.num_running)

    def _fits(self, runner: ModelRunner, extra_kv_bytes: int) -> bool:
        return (self._free_slots(runner) > 0
                and self.kv_reserved_bytes + extra_kv_bytes <= self.kv_budget_bytes)

    def _hold_kv(self, seq: Sequence, nbytes: int) -> None:
        self.kv_reserved_bytes += nbytes - seq.kv_held
        seq.kv_held = nbytes

    def _leave_queue(self, seq: Sequence, *, admitted: bool) -> None:
        self.admission.release(len(seq.prompt_ids), seq.kv_bytes, seq.priority, admitted=admitted)

    def _preempt_for(self, runner: ModelRunner, seq: Sequence) -> bool:
        """Pause running batch-class sequences until ``seq`` fits; False, pausing none, if
        that cannot make room.

        The latest admitted go first. A preempted sequence keeps its KV cache but gives back
        the rest of its reservation, so preempting also makes room under the KV budget.
        """
        if not self._live_batch:
            return False
        candidates = sorted(
            (s for r in self.runners.values() for s in r.by_uid.values()
             if s.priority is Priority.BATCH and s.first_token_at is not None),
            key=lambda s: s.admitted_at, reverse=True)
        victims = []
        if not self._free_slots(runner):   # it needs a slot of this batch
            victim = next((s for s in candidates if s.model_name == seq.model_name), None)
            if victim is None:
                return False
            victims.append(victim)
        short = self.kv_reserved_bytes + seq.kv_bytes - self.kv_budget_bytes
        short -= sum(v.kv_held - v.kv_in_cache for v in victims)
        for candidate in candidates:
            if short <= 0:
                break
            if candidate not in victims:
                victims.append(candidate)
                short -= candidate.kv_held - candidate.kv_in_cache
        if short > 0:
            return False
        for victim in victims:
            self._pause(self.runners[victim.model_name], victim, PauseReason.PREEMPTED)
            self._hold_kv(victim, victim.kv_in_cache)
            self.counters.preempted += 1
        return True

    def _resume_preempted(self) -> bool:
        """Resume preempted sequences that fit, oldest admitted first; True if none is left."""
        preempted = [s for s in self._paused if s.pause_reason is PauseReason.PREEMPTED]
        for seq in sorted(preempted, key=lambda s: s.admitted_at):
            runner = self.runners[seq.model_name]
            if self._fits(runner, seq.kv_bytes - seq.kv_held):
                self._hold_kv(seq, seq.kv_bytes)
                self._resume(runner, seq)
                preempted.remove(seq)
        return not preempted

    def _pause(self, runner: ModelRunner, seq: Sequence, reason: PauseReason) -> None:
        runner.pause(seq)
        seq.pause_reason = reason
        self._paused.append(seq)

    def _resume(self, runner: ModelRunner, seq: Sequence) -> None:
        self._paused.remove(seq)
        seq.pause_reason = None
        runner.resume(seq)

    def _apply_backpressure(self) -> None:
        """Pause sequences whose readers lag, resume them when caught up, end stalled ones."""
        limit = self.config.stream_buffer_tokens
        for runner in self.runners.values():
            for seq in list(runner.by_uid.values()):
                if seq.stream.closed:
                    self._end(seq, FinishReason.CANCELLED)
                elif seq.stream.buffered_tokens >= limit:
                    self._pause(runner, seq, PauseReason.SLOW_READER)
                    self.counters.paused_total += 1
        if not self._paused:
            return
        now = time.monotonic()
        for seq in list(self._paused):
            runner = self.runners[seq.model_name]
            if seq.stream.closed:
                self._end(seq, FinishReason.CANCELLED)
            elif seq.pause_reason is PauseReason.PREEMPTED:
                continue   # _admit resumes it
            elif (seq.stream.buffered_tokens <= limit // 2
                  and self._free_slots(runner) > 0
                  # it would be preempted again at once
                  and not (seq.priority is Priority.BATCH and self._waiting.has_interactive)):
                self._resume(runner, seq)
            elif now - seq.stream.last_read > self.config.stalled_reader_timeout_s:
                err = ReaderStalledError(
                    f"the reader did not read for {self.config.stalled_reader_timeout_s:g} s")
                self._end(seq, FinishReason.ERROR, err.message, err.code)

    def _expire(self, now: float) -> None:
        """End every request whose deadline has passed, wherever it is."""
        for seq in self._deadlines.pop_expired(now):
            where = {SequenceStatus.WAITING: "waiting in the queue",
                     SequenceStatus.RUNNING: "running",
                     SequenceStatus.PAUSED: "paused"}[seq.status]
            err = DeadlineExceededError(
                f"the request's deadline of {seq.request.timeout_s:g} s passed while it was "
                f"{where} ({len(seq.generated)} tokens generated)")
            self.counters.expired += 1
            self._end(seq, FinishReason.ERROR, err.message, err.code)

    def _step(self, runner: ModelRunner) -> None:
        try:
            prompt_responses, responses = runner.step()
        except Exception as exc:
            log.exception("model %s failed during a step", runner.loaded.name)
            for seq in runner.reset():
                seq.status = SequenceStatus.FINISHED  # nothing left to remove from the batch
                self._complete(seq, FinishReason.ERROR, error=f"model step failed: {exc!r}",
                               error_code="engine_error")
            # Most often an allocation failed (the GPU out of memory): hand MLX's cache of
            # freed buffers back, or the next steps fail the same way.
            mx.clear_cache()
            return
        started = time.perf_counter()
        self.counters.steps += 1
        self.counters.prefill_steps += bool(prompt_responses)
        for response in prompt_responses:
            if response.end_of_prompt:   # prompt passed: it joins the decode batch now
                seq = runner.by_uid.get(response.uid)
                if seq is not None and seq.joined_at is None:
                    seq.joined_at, seq.joined_step = time.monotonic(), self.counters.steps
        for response in responses:
            seq = runner.by_uid.get(response.uid)
            if seq is not None:   # None: a retired sequence's garbage token
                self._on_token(runner, seq, response)
        self.counters.tokens_s += time.perf_counter() - started
        # before the readers wake (in _run, after every runner's step): a reader woken by
        # its request's end finds the slot free (one that is already reading may see the
        # end a moment earlier)
        runner.release_due(self.counters.steps, self.config.prefill_wait_steps)

    def _on_token(self, runner: ModelRunner, seq: Sequence, response) -> None:
        token = response.token
        if seq.first_token_at is None:
            seq.first_token_at = time.monotonic()
            seq.first_token_step = self.counters.steps
        seq.generated.append(token)
        self.counters.generated_tokens += 1
        params = seq.params
        logprobs = ([token_logprob(response.logprobs, token, params.top_logprobs)]
                    if params.logprobs else None)

        stop_token = runner.is_stop_token(seq, token)
        finish = (FinishReason.STOP if stop_token
                  else FinishReason.LENGTH if len(seq.generated) >= seq.max_tokens else None)
        text = "" if stop_token else seq.detokenizer.add([token])
        if finish is not None:
            text += seq.detokenizer.flush()
        if seq.stop_matcher is not None:
            text, matched = seq.stop_matcher.feed(text)
            if matched:
                finish = FinishReason.STOP
            elif finish is not None:
                text += seq.stop_matcher.flush()

        delta = RequestOutput(seq.request_id, text, [token], logprobs)
        if len(seq.generated) == 1:   # the prompt's size, for streams that report usage as they go
            delta.usage = Usage(len(seq.prompt_ids), 1, seq.cached_tokens)
        if finish is None:
            self._push(seq, delta)
            return
        runner.retire(seq, self.counters.steps)
        seq.status = SequenceStatus.FINISHED
        self._complete(seq, finish, delta=delta)

    def _end(self, seq: Sequence, reason: FinishReason, error: str | None = None,
             error_code: str | None = None) -> None:
        """End a sequence from outside the batch's own flow (cancel, stall, shutdown)."""
        status = seq.status
        if status is SequenceStatus.FINISHED:
            return
        if status is SequenceStatus.WAITING:
            self._waiting.remove(seq)
            self._leave_queue(seq, admitted=False)
        elif status is SequenceStatus.RUNNING:
            self.runners[seq.model_name].remove(seq)
        elif status is SequenceStatus.PAUSED:
            self._paused.remove(seq)
            seq.paused_cache = None
        seq.status = SequenceStatus.FINISHED
        self._complete(seq, reason, error=error, error_code=error_code)

    def _complete(self, seq: Sequence, reason: FinishReason, *, delta: RequestOutput | None = None,
                  error: str | None = None, error_code: str | None = None) -> None:
        self.kv_reserved_bytes -= seq.kv_held
        seq.kv_held = 0
        if self._live.pop(seq.request_id, None) is not None:
            if seq.priority is Priority.BATCH:
                self._live_batch -= 1
            if seq.deadline is not None:
                self._deadlines.compact(len(self._live))
        with self._lock:
            self._ids.discard(seq.request_id)
        self.counters.finished += 1
        now = time.monotonic()
        delta = delta or RequestOutput(seq.request_id)
        delta.finish_reason = reason
        delta.error, delta.error_code = error, error_code
        delta.usage = Usage(len(seq.prompt_ids), len(seq.generated), seq.cached_tokens)
        first = seq.first_token_at
        delta.timings = timings = Timings(
            queued_s=(seq.admitted_at or now) - seq.submitted_at,
            ttft_s=(first - seq.submitted_at) if first else 0.0,
            decode_s=(now - first) if first else 0.0,
            total_s=now - seq.submitted_at,
        )
        self.counters.queued_s += timings.queued_s
        self.counters.ttft_s += timings.ttft_s
        self.counters.request_s += timings.total_s
        if seq.joined_at is not None:
            self.counters.to_decode_s += seq.joined_at - seq.admitted_at
            self.counters.to_decode_steps += seq.joined_step - seq.admitted_step
            if first:
                self.counters.to_token_steps += seq.first_token_step - seq.joined_step
        self._push(seq, delta)

    def _abort_all(self, message: str) -> None:
        with self._lock:
            self._closed = True
        for seq in list(self._live.values()):
            try:
                self._end(seq, FinishReason.ERROR, message, EngineClosedError.code)
            except Exception:  # the batch may be broken; still tell the reader
                seq.status = SequenceStatus.FINISHED
                self._complete(seq, FinishReason.ERROR, error=message,
                               error_code=EngineClosedError.code)
        # Submissions that raced with the stop; none can come after this.
        while True:
            try:
                msg = self._inbox.get_nowait()
            except queue.Empty:
                break
            if isinstance(msg, _Submit):
                self._leave_queue(msg.seq, admitted=False)
                msg.seq.status = SequenceStatus.FINISHED
                self._complete(msg.seq, FinishReason.ERROR, error=message,
                               error_code=EngineClosedError.code)
            elif isinstance(msg, _Call):
                msg.future.set_exception(EngineClosedError(message))
