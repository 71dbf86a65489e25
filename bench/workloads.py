"""Workloads beyond fixed lengths: ShareGPT-like lengths and shared-prefix multi-turn chats.

Each is a frozen, seeded dataclass with ``specs()`` (warm-up and measured requests), like
``loadgen.Workload``, so ``run_load`` and ``sweep`` drive any of them. Prompts are words
from the load generator's list (about one token each); nothing is downloaded.

ShareGPT-like lengths: no dataset can be fetched here, so input and output lengths are
drawn from lognormal distributions whose means are the ShareGPT figures of the vLLM paper
(Kwon et al., SOSP 2023, §6.1 and Fig. 11: 161.31 input and 337.99 output tokens on
average, 8.4x and 5.8x Alpaca's). The spreads (``input_sigma``, ``output_sigma``) are our
choice, not published figures; lengths are clipped to [4, 1024] as vLLM's ShareGPT
sampler drops shorter prompts and longer sequences.
"""

from __future__ import annotations

import math
import random
from dataclasses import dataclass
from typing import ClassVar

from mlx_serving.bench.loadgen import RequestSpec, Workload, random_text, shorten

SHAREGPT_INPUT_MEAN = 161.31   # tokens, vLLM paper Fig. 11
SHAREGPT_OUTPUT_MEAN = 337.99  # tokens, vLLM paper Fig. 11


def lognormal_lengths(rng: random.Random, n: int, mean: float, sigma: float,
                      low: int, high: int) -> list[int]:
    """``n`` lengths from a lognormal of the given mean and log-space ``sigma``,
    rounded and clipped to [low, high]."""
    mu = math.log(mean) - sigma * sigma / 2
    return [min(high, max(low, round(rng.lognormvariate(mu, sigma)))) for _ in range(n)]


@dataclass(frozen=True)
class ShareGPTLike:
    """Requests whose input and output lengths follow ShareGPT's (see the module doc).

    ``scale`` multiplies both means (e.g. 0.25 on a CPU). Every request still asks for
    exactly its drawn output length (EOS ignored), so every server does the same work.
    """

    kind: ClassVar[str] = "sharegpt"
    requests: int = 64
    chat: bool = True
    warmup: int = 2
    seed: int = 0
    warmup_max_tokens: int | None = None
    input_mean: float = SHAREGPT_INPUT_MEAN
    output_mean: float = SHAREGPT_OUTPUT_MEAN
    input_sigma: float = 1.0
    output_sigma: float = 0.8
    scale: float = 1.0
    min_tokens: int = 4
    max_tokens: int = 1024

    def specs(self) -> tuple[list[RequestSpec], list[RequestSpec]]:
        """The warm-up requests and the measured ones."""
        rng = random.Random(self.seed)
        n = self.warmup + self.requests
        ins = lognormal_lengths(rng, n, self.input_mean * self.scale, self.input_sigma,
                                self.min_tokens, self.max_tokens)
        outs = lognormal_lengths(rng, n, self.output_mean * self.scale, self.output_sigma,
                                 self.min_tokens, self.max_tokens)
        specs = [RequestSpec(f"{i} " + random_text(rng, k - 1), m, self.chat)
                 for i, (k, m) in enumerate(zip(ins, outs))]
        return shorten(specs[:self.warmup], self.warmup_max_tokens), specs[self.warmup:]


@dataclass(frozen=True)
class SharedPrefixChat:
    """Multi-turn conversations that share one system prompt.

    Every request starts with the same ``system_tokens``-word system prompt (a prefix
    cache can serve it); conversation c's turn t carries its t earlier user turns and
    replies (``turn_tokens`` words each, replies ``max_tokens`` words) before the new user
    turn, so later turns extend a prefix sent before. Replies in the history are
    synthetic, not the server's, so requests do not wait on each other and the mix runs
    at any concurrency. Requests go out turn by turn across ``turns``-turn conversations
    (every conversation's turn 0, then every turn 1, ...).
    """

    kind: ClassVar[str] = "shared-prefix"
    requests: int = 64
    chat: bool = True
    warmup: int = 2
    seed: int = 0
    warmup_max_tokens: int | None = None
    system_tokens: int = 256
    turn_tokens: int = 64
    max_tokens: int = 128
    turns: int = 4

    def specs(self) -> tuple[list[RequestSpec], list[RequestSpec]]:
        """The warm-up requests and the measured ones."""
        rng = random.Random(self.seed)
        system = ("system", f"[{self.seed}] " + random_text(rng, self.system_tokens - 1))
        n = self.warmup + self.requests
        conversations = max(1, math.ceil(n / self.turns))
        turns = [[(f"{c}.{t} " + random_text(rng, self.turn_tokens - 1),
                   random_text(rng, self.max_tokens)) for t in range(self.turns)]
                 for c in range(conversations)]
        specs = []
        for t in range(self.turns):
            for c in range(conversations):
                history = [system]
                for user, reply in turns[c][:t]:
                    history += [("user", user), ("assistant", reply)]
                specs.append(RequestSpec(turns[c][t][0], self.max_tokens, self.chat,
                                         tuple(history)))
        specs = specs[:n]
        return shorten(specs[:self.warmup], self.warmup_max_tokens), specs[self.warmup:]


WORKLOADS = {"fixed": Workload, ShareGPTLike.kind: ShareGPTLike,
             SharedPrefixChat.kind: SharedPrefixChat}


def workload_kind(workload) -> str:
    """The ``--workload`` name of a workload object."""
    return getattr(workload, "kind", "fixed")
