"""The ``transformers`` agent on a tiny random model built by tests/tiny_model.py.

Fixtures (this module): ``tiny_model_dir`` (session: the saved tiny model),
``tiny_tokenizer`` (session). One test, marked slow, loads the real bundled
SmolLM2 model from its GGUF file.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from pathlib import Path

import pytest

from plugins import transformers_agent
from plugins.transformers_agent import TransformersAgent, TransformersOptions
from tornado_app.agents import AgentError, AgentRequest
from tornado_app.config import ConfigError, Settings

from .tiny_model import build_tokenizer, save_tiny_model


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory) -> Path:
    return save_tiny_model(tmp_path_factory.mktemp("tiny-model") / "tiny-llama")


@pytest.fixture(scope="session")
def tiny_four_bit_dir(tmp_path_factory) -> Path:
    """The tiny model with its decoder layers' weights on a Q4_1 grid."""
    return save_tiny_model(tmp_path_factory.mktemp("tiny-model") / "tiny-q4", four_bit=True)


@pytest.fixture(scope="session")
def tiny_tokenizer():
    return build_tokenizer()


def make_agent(folder: Path | None, data_dir: Path, **options) -> TransformersAgent:
    options.setdefault("temperature", 0)
    if folder is not None:
        options.setdefault("model_path", str(folder))
    return TransformersAgent(TransformersOptions(**options), Settings(data_dir=str(data_dir)))


@contextlib.asynccontextmanager
async def started_agent(folder: Path | None, data_dir: Path, **options):
    """make_agent, started; closed on the way out."""
    agent = make_agent(folder, data_dir, **options)
    await agent.start()
    try:
        yield agent
    finally:
        await agent.close()


def ask(text: str) -> AgentRequest:
    return AgentRequest([{"role": "system", "content": "Be brief."},
                         {"role": "user", "content": text}], "alice")


async def collect(agent: TransformersAgent, request: AgentRequest) -> str:
    return "".join([piece async for piece in agent.stream(request)])


def run(coroutine_function, *args):
    """Run an async test body on a fresh event loop."""
    return asyncio.run(coroutine_function(*args))


def test_loads_a_folder_and_streams_an_answer(tiny_model_dir, tmp_path):
    async def body():
        async with started_agent(tiny_model_dir, tmp_path, max_new_tokens=12) as agent:
            request = ask("Hello there")
            pieces = [piece async for piece in agent.stream(request)]
            assert pieces and "".join(pieces)
            assert request.usage.tokens_in == len(agent.encode_prompt(request.messages))
            assert request.usage.tokens_out == 12
            assert agent.model == "tiny-llama"
            assert agent.reply_tokens == 12
            assert agent.context_tokens == 4096  # the model's max_position_embeddings
            assert agent.count_tokens("héllo") == 6  # byte-level: é is two tokens

    run(body)


def test_ready_only_once_loaded(tiny_model_dir, tmp_path):
    async def body():
        agent = make_agent(tiny_model_dir, tmp_path)
        assert not agent.ready
        waiter = asyncio.create_task(agent.wait_ready())
        await asyncio.sleep(0.05)
        assert not waiter.done()
        await agent.start()
        await asyncio.wait_for(waiter, 1)
        assert agent.ready
        await agent.close()
        assert not agent.ready
        assert not agent.engine

    run(body)


def test_concurrent_requests_share_decode_steps(tiny_model_dir, tmp_path):
    prompts = ["one", "a longer second prompt", "3", "the fourth prompt, longest of all of them"]

    async def body():
        # max_batch_size 4: batches of 3 and 4 rows use the MKL-packed weights.
        async with started_agent(tiny_model_dir, tmp_path, max_new_tokens=20,
                                 max_batch_size=4) as agent:
            alone = [await collect(agent, ask(p)) for p in prompts]
            sequential_steps = agent.engine.stats.decode_steps
            assert sequential_steps == 4 * 19  # the first token of each comes from its prefill

            async def staggered(index, prompt):
                await asyncio.sleep(0.002 * index)  # some join a batch already running
                return await collect(agent, ask(prompt))

            together = await asyncio.gather(*(staggered(i, p) for i, p in enumerate(prompts)))
            stats = agent.engine.stats
            assert stats.max_batch > 1
            assert stats.joins >= 1  # at least one request joined a running batch
            assert stats.decode_steps - sequential_steps < sequential_steps
            # Batching (left padding, joins, trims) must not change any reply.
            assert together == alone

    run(body)


async def cancel_the_first_mid_reply(agent: TransformersAgent, requests: list) -> None:
    """Stream ``requests`` at once; cancel the first at its first piece; the
    others must finish."""
    first_piece = asyncio.Event()

    async def consume(request, signal=None):
        async for _ in agent.stream(request):
            if signal is not None:
                signal.set()

    tasks = [asyncio.create_task(consume(requests[0], first_piece)),
             *(asyncio.create_task(consume(r)) for r in requests[1:])]
    await first_piece.wait()
    tasks[0].cancel()
    results = await asyncio.gather(*tasks, return_exceptions=True)
    assert isinstance(results[0], asyncio.CancelledError)
    assert results[1:] == [None] * (len(requests) - 1)


@pytest.mark.parametrize("four_bit", [False, True], ids=["plain", "int4"])
def test_cancel_stops_one_request_and_the_others_finish(tiny_model_dir, tiny_four_bit_dir,
                                                        tmp_path, four_bit):
    budget = 400
    folder = tiny_four_bit_dir if four_bit else tiny_model_dir

    async def body():
        async with started_agent(folder, tmp_path, max_new_tokens=budget) as agent:
            assert int4_layers(agent) == (14 if four_bit else 0)
            assert q8_layers(agent) == (1 if four_bit else 0)  # 3 rows: on its Q8_0 codes
            requests = [ask(f"question {i}") for i in range(3)]
            await cancel_the_first_mid_reply(agent, requests)
            assert [r.usage.tokens_out for r in requests[1:]] == [budget, budget]
            stats = agent.engine.stats
            assert stats.cancelled == 1
            assert stats.tokens < 2 * budget + budget // 2  # the cancelled one stopped early

    run(body)


def test_max_new_tokens_is_respected(tiny_model_dir, tmp_path):
    async def body():
        async with started_agent(tiny_model_dir, tmp_path, max_new_tokens=5) as agent:
            request = ask("count")
            text = await collect(agent, request)
            assert request.usage.tokens_out == 5
            # Five byte tokens: at most five characters, some maybe U+FFFD (3 bytes).
            assert len(text.encode("utf-8")) <= 5 * 3

    run(body)


def test_time_limit_cuts_a_long_generation(tiny_model_dir, tmp_path):
    async def body():
        async with started_agent(tiny_model_dir, tmp_path, max_new_tokens=100_000,
                                 time_limit_seconds=0.3) as agent:
            request = ask("go on forever")
            started = time.monotonic()
            await collect(agent, request)
            elapsed = time.monotonic() - started
            assert 0.3 <= elapsed < 3
            assert 0 < request.usage.tokens_out < 100_000

    run(body)


def test_sampling_is_reproducible_with_a_seed(tiny_model_dir, tmp_path):
    async def reply(seed):
        async with started_agent(tiny_model_dir, tmp_path, max_new_tokens=30, temperature=1.0,
                                 top_p=0.9, seed=seed) as agent:
            request = ask("surprise me")
            text = await collect(agent, request)
            assert request.usage.tokens_out == 30
            return text

    async def body():
        first, again, other = await reply(1), await reply(1), await reply(2)
        assert first == again
        assert first != other

    run(body)


def test_sampling_without_a_seed_differs_between_starts(tiny_model_dir, tmp_path):
    # Without a seed each start draws its own: two starts giving the same 30 sampled
    # tokens is as unlikely as a seed collision (the fixed default state did exactly that).
    async def reply():
        async with started_agent(tiny_model_dir, tmp_path, max_new_tokens=30, temperature=1.0,
                                 top_p=0.9) as agent:
            return await collect(agent, ask("surprise me"))

    async def body():
        assert await reply() != await reply()

    run(body)


def nucleus(probs, top_p: float) -> set[int]:
    """The tokens top_p keeps, from a full sort: those after which the likelier
    ones hold no more than top_p."""
    ordered = sorted(range(len(probs)), key=lambda token: -probs[token])
    kept, before = set(), 0.0
    for token in ordered:
        if before > top_p:
            break
        kept.add(token)
        before += probs[token]
    return kept


def test_top_p_samples_each_rows_nucleus_from_candidates_or_a_full_sort():
    """A peaked row's nucleus lies among its likeliest TOP_P_CANDIDATES tokens;
    a flat row's does not, and then the rows are sorted whole. Either way every
    sample is in the nucleus, and every token of a small nucleus comes up."""
    import types

    import torch

    from plugins.transformers_batching import TOP_P_CANDIDATES, BatchEngine

    vocab = 4 * TOP_P_CANDIDATES
    generator = torch.Generator().manual_seed(3)
    peaked = torch.full((vocab,), 0.05 / (vocab - 3))
    peaked[[7, 100, 201]] = torch.tensor([0.5, 0.3, 0.15])
    flat = torch.linspace(1.0, 2.0, vocab)[torch.randperm(vocab, generator=generator)]
    flat /= flat.sum()
    engine = types.SimpleNamespace(_generator=generator)
    for rows in ([peaked], [peaked, flat]):  # candidates only; a full sort for both
        probs = torch.stack(rows)
        seen = [set() for _ in rows]
        for _ in range(300):
            for row, token in enumerate(BatchEngine._sample_top_p(engine, probs, 0.9)):
                seen[row].add(token)
        assert seen[0] == {7, 100, 201}
        if len(rows) == 2:
            expected = nucleus(flat.tolist(), 0.9)
            assert seen[1] <= expected
            # Its nucleus is larger than the candidates, and it was sampled whole.
            assert len(seen[1]) > TOP_P_CANDIDATES


def test_end_of_sequence_stops_the_reply(tiny_model_dir, tmp_path):
    async def body():
        async with started_agent(tiny_model_dir, tmp_path, max_new_tokens=50) as agent:
            agent.engine.eos_ids = set(range(len(agent.tokenizer)))  # every token ends it
            request = ask("stop")
            assert await collect(agent, request) == ""
            assert request.usage.tokens_out == 1

    run(body)


def test_event_loop_stays_responsive_while_generating(tiny_model_dir, tmp_path):
    async def body():
        async with started_agent(tiny_model_dir, tmp_path, max_new_tokens=100_000,
                                 time_limit_seconds=1.0) as agent:
            generation = asyncio.gather(*(collect(agent, ask(f"busy {i}")) for i in range(4)))
            gaps, last = [], time.monotonic()
            while not generation.done():
                await asyncio.sleep(0.01)
                now = time.monotonic()
                gaps.append(now - last)
                last = now
            await generation
            assert len(gaps) > 20
            assert max(gaps) < 0.25  # a blocked loop would stall for the whole second

    run(body)


def test_incremental_decoding_keeps_multibyte_characters_whole(tiny_tokenizer):
    from plugins.transformers_batching import IncrementalDecoder

    text = "héllo wörld, 日本語 🎉 done"
    decoder = IncrementalDecoder(tiny_tokenizer)
    tokens = tiny_tokenizer.encode(text, add_special_tokens=False)
    pieces = [decoder.push(token) for token in tokens]
    pieces.append(decoder.flush())
    assert "".join(pieces) == text
    assert not any("\ufffd" in piece for piece in pieces)
    assert decoder.push(tiny_tokenizer.eos_token_id) == ""  # special tokens are skipped


def test_decode_linear_layers_compute_what_nn_linear_does():
    import torch

    from plugins.transformers_weights import DecodeLinear

    linear = torch.nn.Linear(64, 48)
    plain, packed = DecodeLinear(linear), DecodeLinear(linear, packed_rows=8)
    with torch.inference_mode():
        for rows in (1, 5, 6, 7, 8, 9, 40):  # 6-8 rows take the packed path
            hidden = torch.randn(rows, 1, 64)
            assert torch.allclose(plain(hidden), linear(hidden), atol=1e-5)
            assert torch.allclose(packed(hidden), linear(hidden), atol=1e-5)


def test_decode_attention_packs_one_query_a_row_and_gives_what_sdpa_gives(tiny_tokenizer,
                                                                         monkeypatch):
    import torch
    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    from plugins.transformers_attention import decode_sdpa

    from .tiny_model import build_model

    module = build_model(tiny_tokenizer).model.layers[0].self_attn  # 4 query, 2 key/value heads
    calls = []
    sdpa = torch.nn.functional.scaled_dot_product_attention

    def spy(query, *args, **kwargs):
        calls.append((tuple(query.shape), kwargs.get("enable_gqa", False)))
        return sdpa(query, *args, **kwargs)

    monkeypatch.setattr(torch.nn.functional, "scaled_dot_product_attention", spy)
    torch.manual_seed(1)
    rows, length, dim = 3, 7, module.head_dim
    key, value = torch.randn(rows, 2, length, dim), torch.randn(rows, 2, length, dim)
    mask = torch.ones(rows, 1, 1, length, dtype=torch.bool)
    mask[0, ..., :2] = False
    with torch.inference_mode():
        for query_length, attention_mask in ((1, None), (1, mask), (4, None)):
            query = torch.randn(rows, 4, query_length, dim)
            if query_length > 1:
                key4, value4 = key[:, :, :query_length], value[:, :, :query_length]
            else:
                key4, value4 = key, value
            ours, _ = decode_sdpa(module, query, key4, value4, attention_mask, scaling=0.3)
            theirs, _ = sdpa_attention_forward(module, query, key4, value4, attention_mask,
                                               scaling=0.3)
            assert ours.shape == (rows, query_length, 4, dim)
            assert torch.allclose(ours, theirs, atol=1e-6)
    # One query a row and no mask: packed onto the key/value heads, where
    # transformers would take SDPA's slow enable_gqa kernel (its second call).
    assert calls[0] == ((rows, 2, 2, dim), False)
    assert calls[1] == ((rows, 4, 1, dim), True)


def test_the_agent_decodes_with_the_packed_attention_and_leaves_others_alone(tiny_model_dir,
                                                                            tiny_tokenizer,
                                                                            tmp_path):
    from plugins.transformers_attention import use_decode_sdpa

    from .tiny_model import build_model

    async def body():
        async with started_agent(tiny_model_dir, tmp_path, max_new_tokens=4) as agent:
            assert agent.engine.model.config._attn_implementation == "decode_sdpa"
            assert await collect(agent, ask("hello"))

    run(body)
    eager = build_model(tiny_tokenizer)
    eager.set_attn_implementation("eager")
    assert not use_decode_sdpa(eager)
    assert eager.config._attn_implementation == "eager"


def int4_layers(agent: TransformersAgent) -> int:
    from plugins.transformers_weights import Int4Linear

    return sum(isinstance(m, Int4Linear) for m in agent.engine.model.modules())


def q8_layers(agent: TransformersAgent) -> int:
    from plugins.transformers_weights import Q8Linear

    return sum(isinstance(m, Q8Linear) for m in agent.engine.model.modules())


def assert_kernel_result(layer, hidden, full):
    """``layer`` gives, in the model's dtype, what it gives a bfloat16 model (the kernel
    runs in KERNEL_DTYPE whatever the dtype), and that is the full weight's product
    to bfloat16's precision."""
    import torch

    from plugins.transformers_weights import KERNEL_DTYPE

    out = layer(hidden)
    assert out.dtype == hidden.dtype
    assert torch.equal(out, layer(hidden.to(KERNEL_DTYPE)).to(hidden.dtype))
    assert torch.allclose(out.float(), full(hidden).float(), rtol=1e-2, atol=1e-2)


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_q8_layers_compute_what_their_eight_bit_weights_do(dtype):
    import torch

    from plugins.transformers_weights import (KERNEL_DTYPE, Q8_MAX_ROWS, Q8Linear, int4_codes,
                                              q8_codes)

    from .tiny_model import snap_to_eight_bits

    dtype = getattr(torch, dtype)
    linear = torch.nn.Linear(64, 40)  # 40 outputs: padded to the kernel's 48
    assert q8_codes(linear.weight) is None  # full precision: left alone
    snap_to_eight_bits(linear.weight)
    assert int4_codes(linear.weight) is None  # 8-bit codes are not 4-bit ones
    q8 = Q8Linear(linear, q8_codes(linear.weight)).to(dtype)
    assert q8.scales_high.dtype == q8.scales_low.dtype == KERNEL_DTYPE  # .to() leaves them
    with torch.inference_mode():
        for rows in (1, Q8_MAX_ROWS):
            assert_kernel_result(q8, torch.randn(rows, 1, 64, dtype=dtype), linear)
        more = torch.randn(Q8_MAX_ROWS + 1, 1, 64, dtype=dtype)  # more rows: the full weight
        assert torch.allclose(q8(more), linear(more), rtol=1e-5, atol=1e-5)  # float32: swapped


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_int4_layers_compute_what_their_four_bit_weights_do(dtype):
    import torch

    from plugins.transformers_weights import INT4_MAX_ROWS, KERNEL_DTYPE, Int4Linear, int4_codes

    from .tiny_model import snap_to_four_bits

    dtype = getattr(torch, dtype)
    linear = torch.nn.Linear(64, 48)
    assert int4_codes(linear.weight) is None  # full precision: left alone
    snap_to_four_bits(linear.weight)
    int4 = Int4Linear(linear, int4_codes(linear.weight)).to(dtype)
    assert int4.scales_and_zeros.dtype == KERNEL_DTYPE  # .to() leaves them
    with torch.inference_mode():
        for rows in (1, 8, INT4_MAX_ROWS):
            assert_kernel_result(int4, torch.randn(rows, 1, 64, dtype=dtype), linear)
        prompt = torch.randn(1, INT4_MAX_ROWS + 1, 64, dtype=dtype)  # more rows: the full weight
        assert torch.equal(int4(prompt), linear(prompt))
    assert int4_codes(torch.nn.Linear(64, 40).weight) is None  # the kernel packs 16 outputs


def test_with_amx_fewer_rows_take_the_int4_kernel(monkeypatch):
    import torch

    from plugins.transformers_weights import (INT4_MAX_ROWS, INT4_MAX_ROWS_AMX, Int4Linear,
                                              int4_codes, int4_max_rows)

    from .tiny_model import snap_to_four_bits

    for amx in (False, True):
        monkeypatch.setattr(torch.cpu, "_is_amx_tile_supported", lambda amx=amx: amx)
        assert int4_max_rows(torch.float32) == INT4_MAX_ROWS  # AMX's products are bfloat16's
        assert int4_max_rows(torch.bfloat16) == (INT4_MAX_ROWS_AMX if amx else INT4_MAX_ROWS)
    assert INT4_MAX_ROWS_AMX < 12 <= INT4_MAX_ROWS
    linear = torch.nn.Linear(64, 48)
    snap_to_four_bits(linear.weight)
    int4 = Int4Linear(linear, int4_codes(linear.weight), max_rows=INT4_MAX_ROWS_AMX)
    with torch.inference_mode():
        twelve = torch.randn(12, 1, 64)  # above max_rows: the full weight
        assert torch.equal(int4(twelve), linear(twelve))
        eight = torch.randn(INT4_MAX_ROWS_AMX, 1, 64)  # the kernel, in bfloat16
        assert not torch.equal(int4(eight), linear(eight))
        assert_kernel_result(int4, eight, linear)


def test_a_four_bit_model_runs_on_int4_weights(tiny_four_bit_dir, tmp_path):
    import copy

    import torch
    from transformers import AutoModelForCausalLM

    from plugins.transformers_weights import INT4_MAX_ROWS, use_int4_weights

    # A decode step's logits on the full weights and on the codes, after the same
    # prompt: the kernel computes in bfloat16, so they agree to its precision.
    full = AutoModelForCausalLM.from_pretrained(tiny_four_bit_dir, dtype=torch.float32).eval()
    coded = copy.deepcopy(full)
    assert use_int4_weights(coded)[:3] == (14, 1, 15)  # 7 per layer, and lm_head's Q8_0
    draw = torch.Generator().manual_seed(0)
    ids = torch.randint(0, full.config.vocab_size, (3, 12), generator=draw)
    step = torch.randint(0, full.config.vocab_size, (3, 1), generator=draw)
    logits = []
    with torch.inference_mode():
        for model in (full, coded):
            cache = model(ids, use_cache=True).past_key_values  # 36 rows: the full weights
            logits.append(model(step, past_key_values=cache).logits)  # 3 rows: the kernel
    expected, got = logits
    assert not torch.equal(got, expected)
    assert (got - expected).abs().max() <= 0.02 * expected.abs().max()
    # In the engine (float32 on the bfloat16 kernel), a row batched with others
    # gives what it gives alone. Every prompt is longer than INT4_MAX_ROWS tokens
    # and none is kept, so each prefill takes the full weights, alone or together,
    # and every decode step the kernel.
    prompts = ["one", "a longer second prompt", "3", "the fourth prompt, longest of all of them"]

    async def replies() -> list[str]:
        async with started_agent(tiny_four_bit_dir, tmp_path, dtype="float32", max_new_tokens=24,
                                 max_batch_size=4, prefix_cache_tokens=0) as agent:
            assert int4_layers(agent) == 14
            assert q8_layers(agent) == 1
            assert min(len(agent.encode_prompt(ask(p).messages)) for p in prompts) > INT4_MAX_ROWS
            alone = [await collect(agent, ask(p)) for p in prompts]
            together = await asyncio.gather(*(collect(agent, ask(p)) for p in prompts))
            assert list(together) == alone
            return alone

    assert all(run(replies))


def test_without_the_int4_kernel_the_weights_stay_as_they_are(tiny_four_bit_dir, tmp_path,
                                                             monkeypatch):
    import torch

    def missing(*args):
        raise NotImplementedError("no int4 kernel on this build")

    monkeypatch.setattr(torch.ops.aten, "_convert_weight_to_int4pack_for_cpu", missing)

    async def body():
        async with started_agent(tiny_four_bit_dir, tmp_path, max_new_tokens=6) as agent:
            assert int4_layers(agent) == q8_layers(agent) == 0
            request = ask("hello")
            assert await collect(agent, request)
            assert request.usage.tokens_out == 6

    run(body)


def test_omp_wait_policy_is_set_before_torch_loads(monkeypatch, caplog):
    import subprocess
    import sys

    script = ("import os, sys; from plugins.transformers_agent import set_omp_wait_policy; "
              "set_omp_wait_policy(sys.argv[1] or None); "
              "print(os.environ.get('OMP_WAIT_POLICY'), 'torch' in sys.modules)")
    root = Path(__file__).resolve().parent.parent
    monkeypatch.setenv("OMP_WAIT_POLICY", "ACTIVE")
    for policy, expected in (("passive", "PASSIVE False"), ("", "ACTIVE False")):
        out = subprocess.run([sys.executable, "-c", script, policy], cwd=root, check=True,
                             capture_output=True, text=True).stdout.split()
        assert " ".join(out) == expected
    # Here torch is loaded: too late to take effect, and the log says so.
    import torch  # noqa: F401

    transformers_agent.set_omp_wait_policy("passive")
    assert "OMP_WAIT_POLICY=PASSIVE in the environment" in caplog.text


def test_a_missing_model_path_is_a_config_error(tmp_path):
    with pytest.raises(ConfigError, match=r"agent\.transformers\.model_path: .*does not exist"):
        make_agent(tmp_path / "nowhere", tmp_path)


def test_a_folder_that_is_not_a_model_is_a_config_error(tmp_path):
    with pytest.raises(ConfigError, match="no config.json"):
        make_agent(tmp_path, tmp_path)
    with pytest.raises(ConfigError, match=r"gguf_file: no file 'x\.gguf'"):
        make_agent(tmp_path, tmp_path, gguf_file="x.gguf")


def test_a_relative_model_path_is_taken_from_data_dir(tiny_model_dir):
    agent = make_agent(None, tiny_model_dir.parent, model_path=tiny_model_dir.name)
    assert agent.source.folder == tiny_model_dir


def test_the_plugin_registers_its_agent_and_options(tiny_model_dir, tmp_path):
    offered = {}
    transformers_agent.register_agents(
        register=lambda name, factory, options=None: offered.update({name: (factory, options)}))
    factory, options = offered["transformers"]
    with pytest.raises(Exception, match="extra"):
        options.model_validate({"modle_path": "typo"})
    agent = factory(options.model_validate({"model_path": str(tiny_model_dir)}),
                    Settings(data_dir=str(tmp_path)))
    assert isinstance(agent, TransformersAgent) and not agent.ready


def test_a_model_that_fails_to_load_fails_requests_fast(tmp_path):
    folder = tmp_path / "broken"
    folder.mkdir()
    (folder / "config.json").write_text("{not json")

    async def body():
        agent = make_agent(folder, tmp_path)
        with pytest.raises(Exception):
            await agent.start()
        assert not agent.ready
        with pytest.raises(AgentError) as caught:
            await asyncio.wait_for(collect(agent, ask("hi")), 1)
        assert caught.value.kind == "local_model"

    run(body)


def test_converted_copies_replace_older_ones(tiny_model_dir, tmp_path):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir)
    tokenizer = AutoTokenizer.from_pretrained(tiny_model_dir)
    (tmp_path / "m-0123456789ab").mkdir()  # an older copy of the same file
    (tmp_path / "m-other-0123456789ab").mkdir()  # another model's copy
    target = tmp_path / "m-aaaaaaaaaaaa"
    transformers_agent._save_cache(model, tokenizer, target)
    assert (target / "config.json").is_file()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["m-aaaaaaaaaaaa", "m-other-0123456789ab"]


@pytest.mark.slow
def test_the_bundled_model_answers_and_is_cached(tmp_path, caplog):
    caplog.set_level(logging.INFO, logger="plugins.transformers_agent")
    question = "What is the capital of France?"

    async def answer() -> tuple[str, TransformersAgent]:
        agent = make_agent(None, tmp_path, max_new_tokens=32)
        assert agent.model == "SmolLM2-135M-Instruct.Q4_1"
        await agent.start()
        try:
            request = AgentRequest([{"role": "user", "content": question}], "alice")
            text = await collect(agent, request)
            assert 0 < request.usage.tokens_out <= 32
            return text, agent
        finally:
            await agent.close()

    first, agent = run(answer)
    assert "Paris" in first
    assert agent.context_tokens == 8192
    assert list((tmp_path / "model-cache").iterdir())  # the converted copy
    second, _ = run(answer)
    assert second == first
    assert "loaded in" in caplog.text and "(converted copy" in caplog.text
    # Q4_1 decoder layers run from their 4-bit codes, the Q8_0 output layer from its 8-bit ones.
    assert "210 of 211 linear layers on int4 weights, 1 on Q8_0 codes" in caplog.text


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_dtype_sets_the_weights_and_the_float32_layouts_only_in_float32(tiny_model_dir, tmp_path, dtype):
    import torch

    from plugins.transformers_weights import DecodeLinear

    async def body():
        async with started_agent(tiny_model_dir, tmp_path, dtype=dtype, max_new_tokens=4,
                                 packed_weights=True) as agent:
            model = agent.engine.model
            assert {p.dtype for p in model.parameters()} == {getattr(torch, dtype)}
            # The float32 layouts (and MKL packing) are for float32 only.
            linears = [m for m in model.modules() if isinstance(m, DecodeLinear)]
            assert bool(linears) == (dtype == "float32")
            request = ask("hello")
            await collect(agent, request)
            assert request.usage.tokens_out == 4

    run(body)


def conversation(*turns: str) -> AgentRequest:
    """A request whose messages alternate user and assistant, after a system prompt."""
    roles = ["user", "assistant"]
    return AgentRequest([{"role": "system", "content": "You are a careful, brief assistant."}]
                        + [{"role": roles[i % 2], "content": t} for i, t in enumerate(turns)],
                        "alice")


def test_a_prompt_that_starts_like_a_kept_one_prefills_only_the_rest(tiny_model_dir, tmp_path):
    async def replies(**options):
        # float32: prefilling from kept keys and values then computes the same numbers.
        async with started_agent(tiny_model_dir, tmp_path, dtype="float32", max_new_tokens=12,
                                 **options) as agent:
            first = await collect(agent, conversation("What is a prime number?"))
            first_prompt = len(agent.encode_prompt(conversation("What is a prime number?")
                                                   .messages))
            second = await collect(agent, conversation("What is a prime number?", first,
                                                       "And seven?"))
            third = await collect(agent, conversation("Something else entirely"))
            return [first, second, third], agent.engine.stats, first_prompt

    kept, stats, first_prompt = run(replies)
    # The second prompt starts with the whole first one; the third shares the
    # system prompt's tokens with both.
    assert stats.prefix_hits == 2
    assert stats.prefix_tokens > first_prompt
    plain, plain_stats, _ = asyncio.run(replies(prefix_cache_tokens=0))
    assert (plain_stats.prefix_hits, plain_stats.prefix_tokens) == (0, 0)
    assert kept == plain  # the same replies as prefilled from scratch


def test_a_finished_reply_is_kept_with_its_prompt_for_the_next_one(tiny_model_dir, tmp_path):
    """The next prompt of a conversation repeats the last prompt and its reply:
    both are kept, so it prefills only what follows them, and replies as it
    would from scratch (float32)."""
    from plugins.transformers_batching import FINISHED, Sequence

    async def replies(**options):
        async with started_agent(tiny_model_dir, tmp_path, dtype="float32", max_new_tokens=8,
                                 **options) as agent:
            engine = agent.engine

            async def run_ids(prompt):
                sequence = Sequence(prompt=prompt, max_new_tokens=8, time_limit=60,
                                    loop=asyncio.get_running_loop())
                engine.submit(sequence)
                while (item := await sequence.queue.get()) is not FINISHED:
                    assert not isinstance(item, BaseException)
                return sequence.decoder.ids

            prompt = agent.encode_prompt(conversation("What is a prime number?").messages)
            reply = await run_ids(prompt)
            before = engine.stats.prefix_tokens
            follow = prompt + reply + prompt[-5:]  # the conversation goes on
            second = await run_ids(follow)
            kept = engine.prefixes.tokens if engine.prefixes else 0
            return (reply, second), engine.stats.prefix_tokens - before, kept, len(follow)

    (reply, second), reused, kept, follow = run(replies)
    # All of the reply the row fed back (all but one sampled past the end at most).
    assert reused >= follow - 5 - 1
    # One entry is left: the second prompt with its reply (each prompt gave way).
    assert follow + len(second) - 1 <= kept <= follow + len(second)
    plain, reused_plain, _, _ = asyncio.run(replies(prefix_cache_tokens=0))
    assert reused_plain == 0
    assert (reply, second) == plain


def test_a_sliding_window_model_answers_and_keeps_nothing(tmp_path, caplog):
    """Its cache is not the engine's growing one: it still answers requests
    that come together, and neither prompts nor replies are kept."""
    from plugins.transformers_batching import _growing, new_cache

    from .tiny_model import save_tiny_sliding_model

    folder = save_tiny_sliding_model(tmp_path / "tiny-sliding")

    async def body():
        async with started_agent(folder, tmp_path, max_new_tokens=12) as agent:
            assert not _growing(new_cache(agent.engine.model))
            together = await asyncio.gather(*(collect(agent, ask(p)) for p in ("one", "two")))
            again = await collect(agent, ask("one"))
            stats = agent.engine.stats
            assert all(together) and again == together[0]
            assert stats.failed == 0
            assert (stats.prefix_hits, agent.engine.prefixes.tokens) == (0, 0)

    with caplog.at_level(logging.ERROR, logger="plugins.transformers_batching"):
        run(body)
    assert not caplog.records  # no step failed on the way (the engine logs, then goes on)


def test_the_prefix_cache_keeps_the_latest_prompts_within_its_tokens():
    import torch

    from plugins.transformers_batching import MIN_PREFIX_TOKENS, PrefixCache

    def layers(length):
        kv = torch.zeros((1, 1, length, 2))
        return [(kv, kv)]

    cache = PrefixCache(max_tokens=100)
    a, b, c = [1] * 40, [2] * 40, [3] * 40
    for prompt in (a, b):
        cache.add(prompt, layers(40))
    assert cache.longest(a + [9])[1] == 40
    cache.add(c, layers(40))  # 120 tokens: b, the least recently used, goes
    assert cache.tokens == 80
    assert cache.longest(b + [9]) == (None, 0)
    assert cache.longest(a + [9])[1] == 40 and cache.longest(c + [9])[1] == 40
    # At most all but the prompt's last token, and nothing under the minimum.
    assert cache.longest(a)[1] == 39
    assert cache.longest([1] * (MIN_PREFIX_TOKENS - 1) + [5, 5]) == (None, 0)
    cache.add([7] * 101, layers(101))  # longer than the whole cache: not kept
    assert cache.tokens == 80


def test_cancel_of_a_reply_prefilled_from_a_kept_prompt(tiny_model_dir, tmp_path):
    budget = 200

    async def body():
        async with started_agent(tiny_model_dir, tmp_path, max_new_tokens=budget) as agent:
            await collect(agent, ask("question zero"))  # kept: the others start like it
            requests = [ask(f"question {i}") for i in range(3)]
            await cancel_the_first_mid_reply(agent, requests)
            assert [r.usage.tokens_out for r in requests[1:]] == [budget, budget]
            stats = agent.engine.stats
            assert stats.prefix_hits == 3 and stats.cancelled == 1

    run(body)
