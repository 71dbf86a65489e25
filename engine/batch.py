"""mlx-lm's BatchGenerator with cheaper joins.

When prefilled sequences join the decode batch, BatchGenerator splits them off the prompt
batch (a deep copy of their KV caches, a gather of each layer and a host sync to read the
padding), then runs a first decode step for them alone (a forward pass that reads every
weight of the model for a handful of rows) before merging them into the batch. It also
waits for every prompt pass. The running sequences wait through all of it, and serving
joins many times per second under load.

``ServingBatchGenerator`` changes four things and nothing else:

- A prompt pass runs on the device while the host goes on: BatchGenerator waits for it,
  leaving the device idle while the host then hands out tokens and builds the next step.
  (mlx-lm's prompt timer therefore counts only the host's part of a prompt pass; the
  device's part delays the next decode step's results.)
- Prompt passes can pad their prompts to a multiple of a few tokens: on CUDA, every new
  (rows, length) shape of a prompt pass costs a build on first use, and served prompts of
  every length would keep bringing new ones.
- A prompt batch that moves to decoding whole is handed over as is, without the copy.
- The joining sequences' last input token (a prompt's last token, or a resumed sequence's
  last generated one) is fed to the batch's next decode step with every other row, instead
  of a forward pass of its own. That step returns the fed token itself for those rows, an
  *echo* and not a generated token; ``next`` leaves echoes out. A joining sequence's first
  token therefore comes one decode step later, and the batch saves a forward pass per join.

The KV cache of every row keeps holding exactly the tokens fed so far, so extracting,
trimming and resuming caches work as before; ``all_tokens`` of an extraction says which.
"""

from __future__ import annotations

import mlx.core as mx
from mlx_lm.generate import (BatchGenerator, GenerationBatch, PromptProcessingBatch,
                             _right_pad_prompts)


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


class _PromptBatch(PromptProcessingBatch):
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
