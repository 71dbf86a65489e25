"""mlx-lm's BatchGenerator with cheaper joins.

When prefilled sequences join the decode batch, BatchGenerator splits them off the prompt
batch (a deep copy of their KV caches, a gather of each layer and a host sync to read the
padding), then runs a first decode step for them alone (a forward pass that reads every
weight of the model for a handful of rows) before merging them into the batch. It also
waits for every prompt pass. The running sequences wait through all of it, and serving
joins many times per second under load.

``ServingBatchGenerator`` changes five things and nothing else:

- A prompt pass runs on the device while the host goes on: BatchGenerator waits for it,
  leaving the device idle while the host then hands out tokens and builds the next step.
  (mlx-lm's prompt timer therefore counts only the host's part of a prompt pass; the
  device's part delays the next decode step's results.)
- Prompt passes can pad their prompts to a multiple of a few tokens: on CUDA, every new
  (rows, length) shape of a prompt pass costs a build on first use, and served prompts of
  every length would keep bringing new ones.
- A prompt batch that moves to decoding whole is handed over as is, without the copy; and
  prompts that are done move to decoding before new sequences join the prompt batch, so
  that an arrival on the step a prompt pass ends does not split that batch apart.
- Dropping rows (sequences leaving) and extracting rows' caches read the caches' padding
  back to the host once, not once per layer and sequence: every read waits for the device
  to finish all queued work, and the decode pipeline stalls with it.
- The joining sequences' last input token (a prompt's last token, or a resumed sequence's
  last generated one) is fed to the batch's next decode step with every other row, instead
  of a forward pass of its own. That step returns the fed token itself for those rows, an
  *echo* and not a generated token; ``next`` leaves echoes out. A joining sequence's first
  token therefore comes one decode step later, and the batch saves a forward pass per join.

The KV cache of every row keeps holding exactly the tokens fed so far, so extracting,
trimming and resuming caches work as before; ``all_tokens`` of an extraction says which.
"""

from __future__ import annotations

import time

from mlx_serving.engine import fd_limits  # noqa: F401  isort: skip  (before mlx-lm)
import mlx.core as mx
from mlx_lm.generate import (BatchGenerator, GenerationBatch, PromptProcessingBatch,
                             _right_pad_prompts)
from mlx_lm.models.cache import BatchKVCache, KVCache


def filter_rows(caches: list, keep: list[int]) -> list:
    """Every layer's cache cut down to the rows ``keep``, as ``BatchKVCache.filter`` does,
    with one host read of the padding for all layers instead of one per layer."""
    if not keep:
        caches.clear()
        return caches
    padded = [c for c in caches if type(c) is BatchKVCache]
    for c in caches:
        if type(c) is not BatchKVCache:
            c.filter(keep)
    if not padded:
        return caches
    rows = mx.array(keep)
    for c in padded:
        if c.keys is not None:
            c.keys, c.values = c.keys[rows], c.values[rows]
        c.offset, c.left_padding = c.offset[rows], c.left_padding[rows]
    # the padding all remaining rows share is cut off the front
    shared = mx.stack([c.left_padding.min() for c in padded]).tolist()
    for c, pad in zip(padded, shared):
        if pad > 0:
            if c.keys is not None:
                c.keys, c.values = c.keys[..., pad:, :], c.values[..., pad:, :]
            c._idx -= pad
            c.left_padding = c.left_padding - pad
    return caches


def extract_rows(caches: list, idxs: list[int]) -> list[list]:
    """Rows ``idxs`` of every layer's cache, each as a single-sequence cache, as
    ``BatchKVCache.extract`` does, with one host read of the padding for all layers and rows."""
    padded = [c for c in caches if type(c) is BatchKVCache]
    rows = mx.array(idxs)
    pads = iter(mx.stack([c.left_padding[rows] for c in padded]).tolist() if padded else [])
    extracted = [[] for _ in idxs]
    for c in caches:
        if type(c) is not BatchKVCache:
            for out, idx in zip(extracted, idxs):
                out.append(c.extract(idx))
            continue
        for out, idx, pad in zip(extracted, idxs, next(pads)):
            row = KVCache()
            row.keys = mx.contiguous(c.keys[idx:idx + 1, :, pad:c._idx])
            row.values = mx.contiguous(c.values[idx:idx + 1, :, pad:c._idx])
            row.offset = row.keys.shape[2]
            out.append(row)
    return extracted


class _OneReadRows:
    """A batch (prompt or decode) whose row filters and extractions read the caches back
    once (``filter_rows``, ``extract_row``)."""

    def filter(self, keep):
        caches, self.prompt_cache = self.prompt_cache, []   # filtered below, in one read
        super().filter(keep)
        self.prompt_cache = filter_rows(caches, keep)

    def extract_cache(self, idx):
        return extract_rows(self.prompt_cache, [idx])[0]


class _DecodeBatch(_OneReadRows, GenerationBatch):
    """The decode batch."""


class _JoiningRows(GenerationBatch):
    """Sequences whose last input token waits for the batch's next decode step.

    Only ever merged into the running batch (``GenerationBatch.extend``): its own first
    step, which ``GenerationBatch.__init__`` runs, feeds nothing.
    """

    def _step(self):
        # the next step feeds ``_next_tokens`` (the last input tokens); the rows' logprobs
        # for it are placeholders, dropped with the echo
        self._next_logprobs = [mx.array(0.0)] * len(self.uids)
        return [], []


class _PromptBatch(_OneReadRows, PromptProcessingBatch):
    pad_multiple = 1   # prompt passes pad every prompt to a multiple of this many tokens

    def prompt(self, tokens):
        """PromptProcessingBatch.prompt, except that the host does not wait for the last
        chunk: the device runs it while the host hands out the step's tokens and builds the
        next decode step, which waits for it. (BatchGenerator passes one chunk per call.)

        Prompts are right-padded to a multiple of ``pad_multiple`` tokens (mlx-lm pads to
        the longest), and the padding moves to the left of each row's cache, as mlx-lm
        does with its own.
        """
        if len(self.uids) != len(tokens):
            raise ValueError("The batch length doesn't match the number of inputs")
        if not tokens:
            return
        for held, new in zip(self.tokens, tokens):
            held += new
        lengths = [len(t) for t in tokens]
        width = -(-max(lengths) // self.pad_multiple) * self.pad_multiple
        padding = [width - n for n in lengths]
        if max(padding) > 0:
            inputs = _right_pad_prompts(tokens, max_length=width)
            for c in self.prompt_cache:
                c.prepare(lengths=lengths, right_padding=padding)
        else:
            inputs = mx.array(tokens)
        while inputs.shape[1] > 0:
            n = min(self.prefill_step_size, inputs.shape[1])
            self.model(inputs[:, :n], cache=self.prompt_cache)
            inputs = inputs[:, n:]
            if inputs.shape[1] > 0:   # bound the memory of a long prompt between chunks
                mx.eval([c.state for c in self.prompt_cache])
                mx.clear_cache()
        if max(padding) > 0:
            for c in self.prompt_cache:
                c.finalize()
        mx.async_eval([c.state for c in self.prompt_cache])

    def split(self, indices):
        if len(indices) < len(self.uids):
            return super().split(indices)
        moved = self.__class__.__new__(self.__class__)
        moved.__dict__.update(self.__dict__)
        self._clear()
        return moved

    def generate(self, tokens):
        if any(len(t) > 1 for t in tokens):   # BatchGenerator hands over single tokens
            return super().generate(tokens)
        rows = _JoiningRows(
            self.model, self.uids, mx.array([t[-1] for t in tokens], dtype=mx.uint32),
            self.prompt_cache, self.tokens, self.samplers, self.fallback_sampler,
            self.logits_processors, self.stop_sequences, self.max_tokens)
        self._clear()
        return rows

    def _clear(self) -> None:
        """Forget every row: their state now belongs to another batch."""
        self.uids, self.prompt_cache, self.tokens = [], [], []
        self.samplers, self.logits_processors, self.max_tokens = [], [], []
        self.stop_sequences = []


class ServingBatchGenerator(BatchGenerator):
    """BatchGenerator whose joining sequences ride the batch's next decode step.

    ``next`` returns ``(prompt_responses, generation_responses)`` as BatchGenerator's does,
    without the echo of each joining sequence's last input token.
    """

    def __init__(self, model, *, prompt_pad_multiple: int = 1, **kwargs):
        super().__init__(model, **kwargs)
        self._prompt_batch = _PromptBatch.empty(
            self.model, self.sampler, prefill_step_size=self.prefill_step_size)
        self._prompt_batch.pad_multiple = prompt_pad_multiple
        self._generation_batch = _DecodeBatch.empty(self.model, self.sampler)
        self._echoes: set[int] = set()   # uids whose next generation response is an echo

    def insert_segments(self, segments, max_tokens=None, *args, **kwargs):
        # BatchGenerator counts the echo among a sequence's max_tokens
        max_tokens = [m + 1 for m in (max_tokens or [self.max_tokens] * len(segments))]
        uids = super().insert_segments(segments, max_tokens, *args, **kwargs)
        self._echoes.update(uids)
        return uids

    def remove(self, uids, return_prompt_caches=False):
        self._echoes.difference_update(uids)
        return super().remove(uids, return_prompt_caches)

    def extract_cache(self, uids):
        """``BatchGenerator.extract_cache``, with one host read per batch for all the
        sequences extracted from it (mlx-lm reads once per sequence)."""
        results, rows = {}, {1: [], 2: []}
        for uid, (stage, idx) in self._find_uids(uids).items():
            if stage == 0:   # queued: its cache is still the one it was inserted with
                results[uid] = self._unprocessed_sequences[idx][3:5]
            else:
                rows[stage].append((uid, idx))
        for stage, batch in ((1, self._prompt_batch), (2, self._generation_batch)):
            if rows[stage]:
                caches = extract_rows(batch.prompt_cache, [idx for _, idx in rows[stage]])
                for (uid, idx), cache in zip(rows[stage], caches):
                    results[uid] = (cache, batch.tokens[idx])
        return results

    def _next(self):
        """``BatchGenerator._next`` with one change: prompts that are done move to the decode
        batch before new sequences join the prompt batch. mlx-lm admits first, and then has
        to split the prompt batch: a deep copy of its caches and a host read per layer."""
        generation_responses = []
        prompt_responses = []

        if len(self._generation_batch) > 0:
            tic = time.perf_counter()
            generation_responses = self._generation_batch.next()
            self._counters.decode_time += time.perf_counter() - tic
            self._counters.generation_tokens += len(generation_responses)
            self._counters.generation_steps += 1
            if self._counters.generation_steps % 512 == 0:
                mx.clear_cache()

        if len(self._generation_batch) >= self.completion_batch_size:
            return prompt_responses, generation_responses

        prompt_responses.extend(self._start_decoding())

        n = min(
            self.prefill_batch_size - len(self._prompt_batch),
            self.completion_batch_size - len(self._generation_batch),
            len(self._unprocessed_sequences),
        )
        if n > 0:
            self._prompt_batch.extend(self._make_batch(n))
            # arrivals with nothing to prefill (a resumed sequence, a prompt cached but its
            # last token) go straight on
            prompt_responses.extend(self._start_decoding())

        prompts = []
        for i, seq in enumerate(self._currently_processing):
            response = PromptProcessingBatch.Response(self._prompt_batch.uids[i], 0, False, False)
            segments = seq[0]
            n = min(len(segments[0]), self.prefill_step_size)
            prompts.append(segments[0][:n])
            segments[0] = segments[0][n:]
            if len(segments[0]) == 0:
                segments.pop(0)
                response.end_of_segment = True
            seq[1] += len(prompts[-1])
            response.progress = (seq[1], seq[2])
            prompt_responses.append(response)

        self._counters.prompt_tokens += sum(len(p) for p in prompts)
        tic = time.perf_counter()
        self._prompt_batch.prompt(prompts)
        self._counters.prompt_time += time.perf_counter() - tic

        return prompt_responses, generation_responses

    def _start_decoding(self) -> list:
        """Move the sequences whose prompt is done (only the last token left) to the decode
        batch; their end-of-prompt responses."""
        done = [i for i, seq in enumerate(self._currently_processing)
                if len(seq[0]) == 1 and len(seq[0][0]) == 1]
        if not done:
            return []
        last_inputs = [self._currently_processing[i][0][0] for i in done]
        progress = [(self._currently_processing[i][2],) * 2 for i in done]
        moved = set(done)
        self._currently_processing = [seq for i, seq in enumerate(self._currently_processing)
                                      if i not in moved]
        rows = self._prompt_batch.split(done).generate(last_inputs)
        self._generation_batch.extend(rows)
        return [PromptProcessingBatch.Response(uid, p, True, True)
                for uid, p in zip(rows.uids, progress)]

    def next(self):
        prompt_responses, responses = super().next()
        if self._echoes:
            echoes = self._echoes
            kept = []
            for r in responses:
                if r.uid in echoes:
                    echoes.discard(r.uid)
                else:
                    kept.append(r)
            responses = kept
        return prompt_responses, responses
