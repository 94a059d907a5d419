"""Continuous batching for a local causal LM: one worker thread, one decode loop.

Every request becomes a :class:`Sequence`. The :class:`BatchEngine` thread
owns the model and a KV cache shared by all running sequences (one row each,
left-padded so that every row ends at the same column). Each loop turn it

1. admits the sequences that arrived meanwhile (up to ``max_batch_size``): a
   prefill pass over their prompts builds their rows of the cache, which are
   then joined to the running batch (the shorter side is left-padded);
2. runs one decode step for the whole batch: one token for every row;
3. hands each sequence's new text to its event loop, in one call per loop;
4. drops the rows that finished (end of sequence, token budget, time limit)
   or whose consumer went away (cancel), and trims padding no row needs.

So a request that arrives while others are generating joins them at the next
step instead of waiting for the batch to end, and a cancelled one leaves at
the next step while the others go on. The cost of a decode step grows only a
little with the batch (the weights are read once per step for all rows),
which is where the aggregate speed-up comes from.

The engine thread also loads the model (see BatchEngine._run for why). This
module imports torch; the plugin imports it lazily, in a worker thread.
"""

from __future__ import annotations

import asyncio
import collections
import concurrent.futures
import logging
import threading
import time
from dataclasses import dataclass, field
from typing import Any, Callable

import torch
from transformers import DynamicCache
from transformers.cache_utils import DynamicLayer

from plugins.transformers_threads import ThreadTuner
from tornado_app.agents import call_in_loops

logger = logging.getLogger(__name__)

# Prompts are prefilled in chunks of this many tokens: the attention scores of
# one chunk against the cache stay small however long the prompt is.
PREFILL_CHUNK = 512

# top_p's nucleus is looked for among each row's this many likeliest tokens
# (a partial selection) before the whole row is sorted: sorting SmolLM2's
# 49,152 probabilities took 3.6 ms a step for one row and 20.7 ms for 8, more
# than the rest of an 8-row step, where the nucleus at a chat temperature
# holds a few tokens.
TOP_P_CANDIDATES = 64
# Replies whose KV the prompt cache keeps, by why they stopped: the whole
# ones, which the conversation's next prompt repeats (a cancelled or failed
# reply never joins a prompt).
KEPT_REPLIES = ("eos", "length")
# Spare room (in tokens) added whenever a KV buffer must grow.
CACHE_GROWTH = 128


class GrowingLayer(DynamicLayer):
    """A KV cache layer that appends in place into a buffer with spare room.

    transformers' DynamicLayer concatenates the whole cache at every step,
    which at 8 rows of a few hundred tokens costs more than the attention.
    ``keys``/``values`` are views of the filled part, so the model sees the
    same tensors as with a DynamicLayer. Rows are always right-aligned: column
    ``length - 1`` is every row's latest token; padding lies on the left.
    """

    def lazy_initialization(self, key_states: torch.Tensor, value_states: torch.Tensor) -> None:
        super().lazy_initialization(key_states, value_states)
        self.length = 0
        self._keys = self._values = None

    def update(self, key_states, value_states, *args, **kwargs):
        if not self.is_initialized:
            self.lazy_initialization(key_states, value_states)
        end = self.length + key_states.shape[-2]
        if self._keys is None or end > self._keys.shape[2]:
            self._regrow(key_states, end)
        self._keys[:, :, self.length:end] = key_states
        self._values[:, :, self.length:end] = value_states
        self.length = end
        self._expose()
        return self.keys, self.values

    def _regrow(self, like: torch.Tensor, needed: int) -> None:
        capacity = needed + max(CACHE_GROWTH, needed // 2)
        keys = like.new_empty(like.shape[0], like.shape[1], capacity, like.shape[3])
        values = like.new_empty(keys.shape)
        if self.length:
            keys[:, :, :self.length] = self._keys[:, :, :self.length]
            values[:, :, :self.length] = self._values[:, :, :self.length]
        self._keys, self._values = keys, values

    def _expose(self) -> None:
        self.keys = self._keys[:, :, :self.length]
        self.values = self._values[:, :, :self.length]

    def batch_select_indices(self, indices: torch.Tensor) -> None:
        self._keys, self._values = self._keys[indices], self._values[indices]
        self._expose()

    def trim_left(self, columns: int) -> None:
        """Drop the first ``columns`` (padding in every row)."""
        self._keys, self._values = self._keys[:, :, columns:], self._values[:, :, columns:]
        self.length -= columns
        self._expose()

    def absorb(self, other: "GrowingLayer") -> None:
        """Append the rows of ``other`` below ours, both right-aligned to the wider one."""
        width = max(self.length, other.length)
        rows = self._keys.shape[0] + other._keys.shape[0]
        shape = (rows, self._keys.shape[1], width + CACHE_GROWTH, self._keys.shape[3])
        keys, values = self._keys.new_zeros(shape), self._values.new_zeros(shape)
        pairs = ((keys, self.keys, other.keys), (values, self.values, other.values))
        for buffer, mine, theirs in pairs:
            buffer[:mine.shape[0], :, width - self.length:width] = mine
            buffer[mine.shape[0]:, :, width - other.length:width] = theirs
        self._keys, self._values, self.length = keys, values, width
        self._expose()


def new_cache(model: Any) -> DynamicCache:
    """A cache for one batch: growing layers where the model's layers are plain."""
    cache = DynamicCache(config=model.config)
    if cache.layers and all(type(layer) is DynamicLayer for layer in cache.layers):
        cache.layers = [GrowingLayer() for _ in cache.layers]
    return cache


# A kept prefix is reused only when at least this many tokens match: below
# that, the copy costs about what prefilling them would.
MIN_PREFIX_TOKENS = 16


class PrefixCache:
    """The KV of recent prompts, so that a prompt that starts with the same
    tokens (the system prompt, the conversation so far) prefills only the rest.

    Bounded by ``max_tokens`` in all; the least recently used go first. Each
    entry holds a prompt's ids and, per layer, its keys and values for one row
    (copies: the batch's buffers move on).
    """

    def __init__(self, max_tokens: int):
        self.max_tokens = max_tokens
        self._entries: collections.OrderedDict[tuple[int, ...], tuple[torch.Tensor, list]] = (
            collections.OrderedDict())
        self._tokens = 0

    def longest(self, prompt: list[int]) -> tuple[list | None, int]:
        """The kept layers sharing the longest start with ``prompt``, and how many
        tokens they share (at most all but its last: that one gives the logits)."""
        ids = torch.tensor(prompt)
        best, best_length, best_key = None, 0, None
        for key, (kept, layers) in self._entries.items():
            width = min(len(kept), len(prompt) - 1)
            if width <= best_length:
                continue
            differ = (kept[:width] != ids[:width]).nonzero()
            length = int(differ[0]) if len(differ) else width
            if length > best_length:
                best, best_length, best_key = layers, length, key
        if best is None or best_length < MIN_PREFIX_TOKENS:
            return None, 0
        self._entries.move_to_end(best_key)
        return best, best_length

    def add(self, prompt: list[int], layers: list[tuple[torch.Tensor, torch.Tensor]]) -> None:
        key = tuple(prompt)
        if key in self._entries:
            self._entries.move_to_end(key)
            return
        if len(prompt) > self.max_tokens:
            return
        # An entry that starts this one is of no more use (a prompt, once its
        # reply is kept): whatever matches it matches this one as far.
        for older in [k for k in self._entries if len(k) < len(key) and key[:len(k)] == k]:
            del self._entries[older]
            self._tokens -= len(older)
        while self._entries and self._tokens + len(prompt) > self.max_tokens:
            evicted, _ = self._entries.popitem(last=False)
            self._tokens -= len(evicted)
        self._entries[key] = (torch.tensor(prompt), layers)
        self._tokens += len(prompt)

    @property
    def tokens(self) -> int:
        return self._tokens


class IncrementalDecoder:
    """Turns token ids, one at a time, into text deltas that join up exactly.

    A token may be part of a multi-byte character, or change how its
    neighbour decodes, so the text is decoded over a short window of recent
    tokens and a delta is released only once it no longer ends in an
    incomplete character (the same scheme as vLLM and TGI).
    """

    def __init__(self, tokenizer: Any):
        self._tokenizer = tokenizer
        self.ids: list[int] = []
        self._prefix = 0  # window start: tokens before it are never decoded again
        self._read = 0  # tokens up to here are already out as text

    def _decode(self, ids: list[int]) -> str:
        return self._tokenizer.decode(
            ids, skip_special_tokens=True, clean_up_tokenization_spaces=False
        )

    def push(self, token_id: int) -> str:
        self.ids.append(token_id)
        before = self._decode(self.ids[self._prefix:self._read])
        after = self._decode(self.ids[self._prefix:])
        if len(after) > len(before) and not after.endswith("\ufffd"):
            self._prefix, self._read = self._read, len(self.ids)
            return after[len(before):]
        return ""

    def flush(self) -> str:
        """What is still held back (an incomplete character at the very end)."""
        before = self._decode(self.ids[self._prefix:self._read])
        after = self._decode(self.ids[self._prefix:])
        self._prefix = self._read = len(self.ids)
        return after[len(before):] if len(after) > len(before) else ""


class Finished:
    """Marks the end of a sequence's text on its queue."""


FINISHED = Finished()


@dataclass(eq=False)
class Sequence:
    """One request: its prompt, its budget, and where its text goes."""

    prompt: list[int]
    max_new_tokens: int
    time_limit: float
    loop: asyncio.AbstractEventLoop
    # Text deltas, then FINISHED or an exception; read on ``loop`` only.
    queue: asyncio.Queue = field(default_factory=asyncio.Queue)
    # Set from the event loop when the consumer goes away; read by the engine.
    cancelled: bool = False
    tokens_out: int = 0
    stop_reason: str | None = None
    started: float = 0.0
    decoder: IncrementalDecoder | None = None
    next_token: int = 0  # sampled, not yet fed to the model

    def cancel(self) -> None:
        self.cancelled = True


@dataclass
class EngineStats:
    """Counters for tests, logs and benchmarks (written by the engine thread)."""

    prefills: int = 0
    joins: int = 0  # prefills that joined a batch already running
    decode_steps: int = 0
    tokens: int = 0
    max_batch: int = 0
    finished: int = 0
    cancelled: int = 0
    failed: int = 0
    prefix_hits: int = 0  # prompts that started from a kept prefix
    prefix_tokens: int = 0  # prompt tokens not prefilled thanks to them


@dataclass(frozen=True)
class SamplingConfig:
    max_batch_size: int = 8
    temperature: float = 0.0  # 0: greedy
    top_p: float = 1.0
    seed: int | None = None
    prefix_cache_tokens: int = 0  # 0: no prefix cache
    adapt_threads: bool = False  # time decode steps on torch's threads and on one (ThreadTuner)


# What the engine's loader returns: the model, a tokenizer, end-of-sequence ids.
LoadedWeights = tuple[Any, Any, set[int]]


class BatchEngine:
    """The worker thread that runs every generation of one model."""

    def __init__(self, load: Callable[[], LoadedWeights], config: SamplingConfig,
                 error_factory: Callable[[], Exception]):
        # ``load`` runs on the engine thread: see _run.
        self._load = load
        self.model: Any = None
        self.tokenizer: Any = None
        self.eos_ids: set[int] = set()
        #: Resolves once the weights are loaded (or with the loading error).
        self.loaded: concurrent.futures.Future = concurrent.futures.Future()
        self.config = config
        self.stats = EngineStats()
        self._error_factory = error_factory
        self._pending: collections.deque[Sequence] = collections.deque()
        self._wakeup = threading.Condition()
        self._stopping = False
        self._rows: list[Sequence] = []
        self._cache: DynamicCache | None = None
        self._mask: torch.Tensor | None = None  # (rows, cache columns): 1 = real token
        self._lengths: torch.Tensor | None = None  # real tokens in each row's cache
        self._generator = torch.Generator()
        self.threads: ThreadTuner | None = None  # set once loaded, if config.adapt_threads
        self.prefixes = PrefixCache(config.prefix_cache_tokens) if (
            config.prefix_cache_tokens) else None
        # A fresh Generator starts from torch's fixed default state, so without a
        # seed every start would draw the same first samples; take one from the OS.
        if config.seed is not None:
            self._generator.manual_seed(config.seed)
        else:
            self._generator.seed()  # std::random_device
        self._thread = threading.Thread(target=self._run, name="transformers-batcher", daemon=True)

    # -- the event loop's side -------------------------------------------------

    def start(self) -> None:
        self._thread.start()

    def submit(self, sequence: Sequence) -> None:
        with self._wakeup:
            if self._stopping:
                raise self._error_factory()
            self._pending.append(sequence)
            self._wakeup.notify()

    def stop(self) -> None:
        """Stop the thread; unfinished sequences fail.

        Blocks for up to one decode step; not for a load in progress (the
        thread then exits, and frees the weights, once loading ends).
        """
        with self._wakeup:
            self._stopping = True
            self._wakeup.notify()
        if self.loaded.done() and self._thread.is_alive():
            self._thread.join()

    # -- the engine thread -----------------------------------------------------

    def _run(self) -> None:
        # Loading and generating on the same thread matters: once one thread
        # has run torch's OpenMP regions, another thread's run ~40% slower here.
        if not self.loaded.set_running_or_notify_cancel():
            return  # the agent was closed before its thread started
        try:
            self.model, self.tokenizer, self.eos_ids = self._load()
        except BaseException as exc:
            self.loaded.set_exception(exc)
            return
        if self.config.adapt_threads:
            self.threads = ThreadTuner(torch.get_num_threads(), torch.set_num_threads)
        self.loaded.set_result(None)
        with torch.inference_mode():
            while True:
                newcomers = self._take_newcomers()
                if newcomers is None:
                    break
                events: list[tuple[Sequence, Any]] = []
                try:
                    if newcomers:
                        self._prefill(newcomers, events)
                    self._drop_done_rows(events)
                    if self._rows:
                        self._decode_step(events)
                        self._drop_done_rows(events)
                    if self.threads and not self._rows:
                        self.threads.idle()
                except Exception:
                    logger.exception("local model generation failed")
                    self._fail(self._rows + [s for s in newcomers if s not in self._rows], events)
                self._publish(events)
        shutdown: list[tuple[Sequence, Any]] = []
        self._fail(self._rows + list(self._pending), shutdown)
        self._pending.clear()
        self._publish(shutdown)

    def _take_newcomers(self) -> list[Sequence] | None:
        """Wait for work when idle; return the sequences to admit now (None: stop)."""
        with self._wakeup:
            while not self._stopping and not self._rows and not self._pending:
                self._wakeup.wait()
            if self._stopping:
                return None
            if self._rows and not self._joinable():
                return []  # this cache cannot take new rows: they wait for the batch to end
            room = self.config.max_batch_size - len(self._rows)
            newcomers = []
            while self._pending and len(newcomers) < room:
                sequence = self._pending.popleft()
                if not sequence.cancelled:
                    newcomers.append(sequence)
            return newcomers

    def _joinable(self) -> bool:
        # Rows can be joined and trimmed only in plain (full-attention) caches.
        return self._cache is None or _growing(self._cache)

    def _forward(self, input_ids, mask, positions, cache) -> torch.Tensor:
        output = self.model(
            input_ids=input_ids,
            attention_mask=mask,
            position_ids=positions,
            past_key_values=cache,
            use_cache=True,
            logits_to_keep=1,
        )
        return output.logits[:, -1, :]

    def _prefill(self, newcomers: list[Sequence], events: list) -> None:
        """Run the prompts of ``newcomers`` and join them to the running batch:
        those that start with a kept prefix one by one from it, the others
        together. Every prompt is kept for the next ones."""
        fresh = []
        for sequence in newcomers:
            # Only growing caches are kept (_keep), so a hit can always join.
            kept, length = (self.prefixes.longest(sequence.prompt) if self.prefixes
                            else (None, 0))
            if kept is None:
                fresh.append(sequence)
            else:
                self._prefill_after(sequence, kept, length, events)
        if fresh:
            self._prefill_together(fresh, events)

    def _keep(self, tokens: list[int], cache: DynamicCache, row: int) -> None:
        """Keep the KV of ``tokens``: row ``row`` of ``cache``, its last columns
        (rows are right-aligned)."""
        if self.prefixes is None or not _growing(cache):
            return
        end = cache.layers[0].length
        start = end - len(tokens)
        self.prefixes.add(tokens, [
            (layer.keys[row:row + 1, :, start:end].clone(),
             layer.values[row:row + 1, :, start:end].clone()) for layer in cache.layers])

    def _keep_reply(self, sequence: Sequence, row: int) -> None:
        """Keep a finished reply's KV after its prompt's: the conversation's next
        prompt starts with both, so it prefills only the new message. The row
        holds the prompt and every token fed back, which is all of the reply
        but a last sampled one (the end-of-sequence token, or one past
        ``max_new_tokens``)."""
        length = int(self._lengths[row])
        self._keep((sequence.prompt + sequence.decoder.ids)[:length], self._cache, row)

    def _prefill_after(self, sequence: Sequence, kept: list, length: int, events: list) -> None:
        """Prefill one prompt from its first ``length`` tokens' kept KV."""
        cache = new_cache(self.model)
        for layer, (keys, values) in zip(cache.layers, kept):
            layer.update(keys[:, :, :length], values[:, :, :length])
        total = len(sequence.prompt)
        ids = torch.tensor([sequence.prompt[length:]])
        mask = torch.ones((1, total), dtype=torch.long)
        positions = torch.arange(length, total).unsqueeze(0)
        self.stats.prefix_hits += 1
        self.stats.prefix_tokens += length
        self._run_prompts([sequence], ids, mask, positions, cache, events)

    def _prefill_together(self, newcomers: list[Sequence], events: list) -> None:
        width = max(len(s.prompt) for s in newcomers)
        ids = torch.zeros((len(newcomers), width), dtype=torch.long)
        mask = torch.zeros((len(newcomers), width), dtype=torch.long)
        for row, sequence in enumerate(newcomers):
            ids[row, width - len(sequence.prompt):] = torch.tensor(sequence.prompt)
            mask[row, width - len(sequence.prompt):] = 1
        positions = (mask.cumsum(dim=1) - 1).clamp(min=0)
        self._run_prompts(newcomers, ids, mask, positions, new_cache(self.model), events)

    def _run_prompts(self, sequences: list[Sequence], ids: torch.Tensor, mask: torch.Tensor,
                     positions: torch.Tensor, cache: DynamicCache, events: list) -> None:
        """Run the prompts' last columns (``ids``, ``positions``; ``mask`` covers
        every column, those already in ``cache`` first) chunk by chunk, keep
        each prompt, join the rows to the batch and take their first tokens."""
        for sequence in sequences:
            sequence.started = time.monotonic()
            sequence.decoder = IncrementalDecoder(self.tokenizer)
        cached = mask.shape[1] - ids.shape[1]
        for start in range(0, ids.shape[1], PREFILL_CHUNK):
            end = start + PREFILL_CHUNK
            logits = self._forward(ids[:, start:end], mask[:, :cached + end],
                                   positions[:, start:end], cache)
        self.stats.prefills += 1
        for row, sequence in enumerate(sequences):
            self._keep(sequence.prompt, cache, row)
        self._join(sequences, cache, mask, mask.sum(dim=1))
        self._accept(sequences, self._sample(logits), events)

    def _decode_step(self, events: list) -> None:
        rows = self._rows
        if self.threads:
            self.threads.before_step(len(rows))
        started = time.perf_counter()
        input_ids = torch.tensor([[s.next_token] for s in rows], dtype=torch.long)
        self._mask = torch.cat([self._mask, self._mask.new_ones((len(rows), 1))], dim=1)
        logits = self._forward(input_ids, self._mask, self._lengths.unsqueeze(1), self._cache)
        tokens = self._sample(logits)
        if self.threads:
            self.threads.after_step(len(rows), time.perf_counter() - started)
        self._lengths = self._lengths + 1
        self.stats.decode_steps += 1
        self.stats.max_batch = max(self.stats.max_batch, len(rows))
        self._accept(rows, tokens, events)

    def _sample(self, logits: torch.Tensor) -> list[int]:
        if self.config.temperature <= 0:
            # In float32 (exact for bfloat16): torch's bfloat16 argmax is not
            # vectorised, 160 us a row of 49152 against 34 with the cast.
            return logits.float().argmax(dim=-1).tolist()
        probs = torch.softmax(logits.float() / self.config.temperature, dim=-1)
        if self.config.top_p < 1.0:
            return self._sample_top_p(probs, self.config.top_p)
        return torch.multinomial(probs, 1, generator=self._generator).squeeze(-1).tolist()

    def _sample_top_p(self, probs: torch.Tensor, top_p: float) -> list[int]:
        """Sample among the smallest set of likeliest tokens whose probability
        reaches ``top_p`` (each row's nucleus).

        The candidates are each row's TOP_P_CANDIDATES likeliest tokens when
        they hold more than ``top_p`` (every token after them then follows more
        than ``top_p``, so it is outside the nucleus: the same set as from a
        full sort), else every token, sorted.
        """
        likeliest, order = probs.topk(min(TOP_P_CANDIDATES, probs.shape[-1]), dim=-1)
        if bool((likeliest.sum(dim=-1) <= top_p).any()):
            likeliest, order = probs.sort(dim=-1, descending=True)
        outside = likeliest.cumsum(dim=-1) - likeliest > top_p
        likeliest = likeliest.masked_fill(outside, 0.0)
        choice = torch.multinomial(likeliest, 1, generator=self._generator)
        return order.gather(-1, choice).squeeze(-1).tolist()

    def _accept(self, sequences: list[Sequence], tokens: list[int], events: list) -> None:
        """Record each sequence's new token, its text, and whether it is done."""
        now = time.monotonic()
        for sequence, token in zip(sequences, tokens):
            if sequence.stop_reason is not None:
                continue
            sequence.tokens_out += 1
            self.stats.tokens += 1
            sequence.next_token = token
            if token in self.eos_ids:
                sequence.stop_reason = "eos"
            else:
                text = sequence.decoder.push(token)
                if text:
                    events.append((sequence, text))
                if sequence.tokens_out >= sequence.max_new_tokens:
                    sequence.stop_reason = "length"
                elif now - sequence.started >= sequence.time_limit:
                    sequence.stop_reason = "time"
            if sequence.stop_reason == "time":
                logger.info("a reply hit the time limit (%.0f s) after %d tokens",
                            sequence.time_limit, sequence.tokens_out)
            if sequence.stop_reason is not None:
                rest = sequence.decoder.flush()
                if rest:
                    events.append((sequence, rest))
                events.append((sequence, FINISHED))
                self.stats.finished += 1

    def _join(self, newcomers: list[Sequence], cache: DynamicCache, mask: torch.Tensor,
              lengths: torch.Tensor) -> None:
        if not self._rows:
            self._rows, self._cache = list(newcomers), cache
            self._mask, self._lengths = mask, lengths
            return
        self.stats.joins += 1
        width = max(self._mask.shape[1], mask.shape[1])
        for old, new in zip(self._cache.layers, cache.layers):
            old.absorb(new)
        self._mask = torch.cat([_pad_left(self._mask, width), _pad_left(mask, width)], dim=0)
        self._lengths = torch.cat([self._lengths, lengths])
        self._rows.extend(newcomers)

    def _drop_done_rows(self, events: list) -> None:
        for sequence in self._rows:
            if sequence.cancelled and sequence.stop_reason is None:
                sequence.stop_reason = "cancelled"
                self.stats.cancelled += 1
        keep = [i for i, s in enumerate(self._rows) if s.stop_reason is None]
        if len(keep) == len(self._rows):
            return
        for row, sequence in enumerate(self._rows):
            if sequence.stop_reason in KEPT_REPLIES:
                self._keep_reply(sequence, row)
        if not keep:
            self._rows, self._cache, self._mask, self._lengths = [], None, None, None
            return
        index = torch.tensor(keep, dtype=torch.long)
        self._rows = [self._rows[i] for i in keep]
        self._cache.batch_select_indices(index)
        self._mask = self._mask[index]
        self._lengths = self._lengths[index]
        # Columns that are padding in every remaining row cost time at each step.
        if self._joinable():
            used = self._mask.any(dim=0).nonzero()
            first = int(used[0]) if len(used) else 0
            if first:
                self._mask = self._mask[:, first:]
                for layer in self._cache.layers:
                    layer.trim_left(first)

    def _fail(self, sequences: list[Sequence], events: list) -> None:
        for sequence in sequences:
            if sequence.stop_reason is None:
                sequence.stop_reason = "error"
                self.stats.failed += 1
                events.append((sequence, self._error_factory()))
        self._rows, self._cache, self._mask, self._lengths = [], None, None, None

    @staticmethod
    def _publish(events: list[tuple[Sequence, Any]]) -> None:
        """Hand the events to their event loops: one thread-safe call per loop."""
        call_in_loops(((sequence.loop, (sequence.queue, item)) for sequence, item in events),
                      _deliver)


def _deliver(items: list[tuple[asyncio.Queue, Any]]) -> None:
    for queue, item in items:
        queue.put_nowait(item)


def _growing(cache: DynamicCache) -> bool:
    """Whether every layer of ``cache`` is a GrowingLayer (rows can join, leave, be kept)."""
    return all(isinstance(layer, GrowingLayer) for layer in cache.layers)


def _pad_left(mask: torch.Tensor, width: int) -> torch.Tensor:
    """Pad a (rows, columns) mask on the left with zeros up to ``width`` columns."""
    missing = width - mask.shape[1]
    if missing <= 0:
        return mask
    return torch.cat([mask.new_zeros((mask.shape[0], missing)), mask], dim=1)
