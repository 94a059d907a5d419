"""The compiled 4-bit kernel (plugins/transformers_q4.py): its products, its
cache, and the ways back to torch's int4 kernel."""

from __future__ import annotations

import asyncio
import logging
import stat
from pathlib import Path

import pytest

torch = pytest.importorskip("torch")

from plugins import transformers_q4  # noqa: E402
from plugins.transformers_q4 import load_kernel  # noqa: E402
from plugins.transformers_weights import (INT4_MAX_ROWS, Int4Linear, Q8Linear,  # noqa: E402
                                          int4_codes, q8_codes)

from .test_transformers_agent import (ask, cancel_the_first_mid_reply,  # noqa: E402
                                      collect, run, started_agent, tiny_four_bit_dir,  # noqa: F401
                                      tiny_model_dir)  # noqa: F401 (fixtures)
from .tiny_model import snap_to_eight_bits, snap_to_four_bits  # noqa: E402

needs_avx2 = pytest.mark.skipif(not transformers_q4._cpu_fits(),
                                reason="the compiled kernel needs an x86-64 CPU with AVX2")


@pytest.fixture(scope="module")
def kernel(tmp_path_factory):
    if not transformers_q4._cpu_fits():
        pytest.skip("the compiled kernel needs an x86-64 CPU with AVX2")
    loaded = load_kernel(tmp_path_factory.mktemp("q4"))
    assert loaded is not None, "a C compiler is part of the test machine"
    return loaded


@pytest.fixture
def nothing_loaded(monkeypatch):
    """No kernel loaded in this process yet (load_kernel keeps the ones it loaded)."""
    monkeypatch.setattr(transformers_q4, "_LOADED", {})


def compiler_script(folder: Path, body: str) -> str:
    """A stand-in for ``cc``: a shell script running ``body``."""
    path = folder / "cc.sh"
    path.write_text(f"#!/bin/sh\n{body}\n")
    path.chmod(path.stat().st_mode | stat.S_IXUSR)
    return str(path)


def test_the_kernel_computes_what_the_four_bit_weights_do(kernel):
    linear = torch.nn.Linear(96, 48)
    snap_to_four_bits(linear.weight)
    layer = Int4Linear(linear, int4_codes(linear.weight), kernel=kernel)
    assert not hasattr(layer, "packed")  # torch's packing is not kept beside the codes
    with torch.inference_mode():
        for rows in (1, 3, 8, 9, INT4_MAX_ROWS):  # one pass of the weights takes 8 rows
            hidden = torch.randn(rows, 1, 96)
            out, expected = layer(hidden), linear(hidden)
            assert out.shape == expected.shape and out.dtype == torch.float32
            assert not torch.equal(out, expected)  # the rows are taken to 16-bit integers
            assert (out - expected).norm() <= 2e-4 * expected.norm()  # (8 bits: about 5e-3)
            for row in range(rows):  # each row's product does not depend on the others
                assert torch.equal(layer(hidden[row:row + 1]), out[row:row + 1])
        prompt = torch.randn(1, INT4_MAX_ROWS + 1, 96)  # more rows: the full weight
        assert torch.equal(layer(prompt), linear(prompt))


def test_the_kernel_computes_what_the_eight_bit_weights_do(kernel):
    linear = torch.nn.Linear(96, 40)
    snap_to_eight_bits(linear.weight)
    layer = Q8Linear(linear, q8_codes(linear.weight), kernel=kernel)
    assert not hasattr(layer, "packed_high")  # the codes as they are, not two 4-bit halves
    with torch.inference_mode():
        for rows in (1, 5, 9, INT4_MAX_ROWS):  # beyond torch's kernel's 4 rows too
            hidden = torch.randn(rows, 1, 96)
            out, expected = layer(hidden), linear(hidden)
            assert out.shape == expected.shape and not torch.equal(out, expected)
            assert (out - expected).norm() <= 2e-4 * expected.norm()
            for row in range(rows):
                assert torch.equal(layer(hidden[row:row + 1]), out[row:row + 1])
        prompt = torch.randn(INT4_MAX_ROWS + 1, 1, 96)  # more rows: the full weight
        assert torch.allclose(layer(prompt), linear(prompt), rtol=1e-5, atol=1e-5)


def test_rows_of_zeros_give_zeros(kernel):
    linear = torch.nn.Linear(64, 16, bias=False)
    snap_to_four_bits(linear.weight)
    layer = Int4Linear(linear, int4_codes(linear.weight), kernel=kernel)
    with torch.inference_mode():  # a block of zeros has no scale to divide by
        assert torch.equal(layer(torch.zeros(2, 64)), torch.zeros(2, 16))


@needs_avx2
def test_the_library_is_compiled_once_into_the_cache(tmp_path, monkeypatch, nothing_loaded):
    calls = tmp_path / "calls"
    monkeypatch.setenv("CC", compiler_script(tmp_path, f'echo run >> {calls}\nexec cc "$@"'))
    cache = tmp_path / "cache"
    first = load_kernel(cache)
    assert first is not None
    assert load_kernel(tmp_path / "elsewhere") is first  # loaded in this process already
    transformers_q4._LOADED.clear()  # a new process: the cached library, not a compiler
    assert load_kernel(cache) is not None
    assert calls.read_text().count("run") == 1
    assert len(list((cache / "kernels").glob("*.so"))) == 1
    changed = tmp_path / "transformers_q4.c"  # another source: another library
    changed.write_text(transformers_q4.SOURCE.read_text() + "\n/* changed */\n")
    monkeypatch.setattr(transformers_q4, "SOURCE", changed)
    assert load_kernel(cache) is not None
    assert calls.read_text().count("run") == 2
    assert len(list((cache / "kernels").glob("*.so"))) == 2
    assert not list((cache / "kernels").glob("*.part"))


@needs_avx2
def test_without_a_compiler_the_layers_stay_on_torch_kernel(tmp_path, monkeypatch, caplog):
    monkeypatch.setenv("CC", str(tmp_path / "no-such-cc"))
    with caplog.at_level(logging.INFO, logger="plugins.transformers_q4"):
        assert load_kernel(tmp_path) is None
    assert "no C compiler" in caplog.text


@needs_avx2
def test_a_compiler_that_fails_leaves_torch_kernel(tmp_path, monkeypatch, caplog):
    monkeypatch.setenv("CC", compiler_script(tmp_path, 'echo "fatal error: no headers" >&2\n'
                                                       "exit 1"))
    with caplog.at_level(logging.WARNING, logger="plugins.transformers_q4"):
        assert load_kernel(tmp_path / "cache") is None
    assert "could not compile" in caplog.text and "no headers" in caplog.text
    assert not list((tmp_path / "cache" / "kernels").iterdir())  # no partial library left


@needs_avx2
def test_a_kernel_that_computes_wrong_products_is_not_used(tmp_path, monkeypatch, caplog):
    wrong = tmp_path / "transformers_q4.c"  # forgets the weights' minimums
    source = transformers_q4.SOURCE.read_text()
    minimums = "+ dot_floats(wm, xs + r * blocks, blocks)"
    assert minimums in source
    wrong.write_text(source.replace(minimums, ""))
    monkeypatch.setattr(transformers_q4, "SOURCE", wrong)
    with caplog.at_level(logging.WARNING, logger="plugins.transformers_q4"):
        assert load_kernel(tmp_path) is None
    assert "wrong products" in caplog.text


def test_on_a_cpu_without_avx2_the_compiler_is_not_run(tmp_path, monkeypatch, caplog):
    monkeypatch.setattr(torch.backends.cpu, "get_cpu_capability", lambda: "DEFAULT")
    monkeypatch.setenv("CC", compiler_script(tmp_path, f"touch {tmp_path / 'ran'}\nexit 1"))
    with caplog.at_level(logging.INFO, logger="plugins.transformers_q4"):
        assert load_kernel(tmp_path) is None
    assert "needs an x86-64 CPU with AVX2" in caplog.text
    assert not (tmp_path / "ran").exists()


def kernels_of(agent) -> set:
    return {type(module.kernel).__name__ for module in agent.engine.model.modules()
            if isinstance(module, (Int4Linear, Q8Linear))}


@needs_avx2
def test_a_float32_model_runs_its_four_bit_layers_on_the_compiled_kernel(tiny_four_bit_dir,
                                                                         tmp_path,
                                                                         nothing_loaded):
    async def body():
        async with started_agent(tiny_four_bit_dir, tmp_path, dtype="float32",
                                 max_new_tokens=8) as agent:
            assert kernels_of(agent) == {"Q4Kernel"}
            assert await collect(agent, ask("hello"))
        assert list((tmp_path / "model-cache" / "kernels").glob("*.so"))  # compiled once, kept
        async with started_agent(tiny_four_bit_dir, tmp_path, dtype="float32", max_new_tokens=8,
                                 compiled_int4_kernel=False) as agent:
            assert kernels_of(agent) == {"NoneType"}  # torch's
            assert await collect(agent, ask("hello"))
        async with started_agent(tiny_four_bit_dir, tmp_path, dtype="bfloat16",
                                 max_new_tokens=8) as agent:
            assert kernels_of(agent) == {"NoneType"}  # bfloat16 inputs: torch's is made for them
            assert await collect(agent, ask("hello"))

    run(body)


@needs_avx2
def test_a_model_without_coded_layers_compiles_nothing(tiny_model_dir, tmp_path, nothing_loaded,
                                                       caplog):
    async def body():
        with caplog.at_level(logging.INFO, logger="plugins.transformers_agent"):
            async with started_agent(tiny_model_dir, tmp_path, dtype="float32",
                                     max_new_tokens=8) as agent:
                assert kernels_of(agent) == set()
                assert await collect(agent, ask("hello"))
        assert not (tmp_path / "model-cache" / "kernels").exists()
        assert "0 on Q8_0 codes, on torch's int4 kernel" in caplog.text

    run(body)


@needs_avx2
def test_on_the_compiled_kernel_greedy_replies_are_the_full_weights_ones(tiny_four_bit_dir,
                                                                        tmp_path):
    """16-bit rows: the replies of the de-quantized weights, alone and in a batch
    (the bundled model's 20 fixed prompts too, docs/agents/transformers.md)."""
    prompts = ["one", "a longer second prompt", "3", "the fourth prompt, longest of all of them"]

    async def replies(**options) -> tuple[list[str], list[str], set]:
        async with started_agent(tiny_four_bit_dir, tmp_path, dtype="float32", max_new_tokens=24,
                                 max_batch_size=4, prefix_cache_tokens=0, **options) as agent:
            alone = [await collect(agent, ask(p)) for p in prompts]
            together = await asyncio.gather(*(collect(agent, ask(p)) for p in prompts))
            return alone, list(together), kernels_of(agent)

    async def body():
        compiled = await replies()
        full = await replies(int4_weights=False)
        assert compiled[2] == {"Q4Kernel"} and full[2] == set()
        assert compiled[0] == compiled[1] == full[0] == full[1]
        assert all(compiled[0])

    run(body)


@needs_avx2
def test_cancel_in_the_middle_of_a_batch_on_the_compiled_kernel(tiny_four_bit_dir, tmp_path):
    budget = 200

    async def body():
        async with started_agent(tiny_four_bit_dir, tmp_path, dtype="float32",
                                 max_new_tokens=budget) as agent:
            assert kernels_of(agent) == {"Q4Kernel"}
            requests = [ask(f"question {i}") for i in range(3)]
            await cancel_the_first_mid_reply(agent, requests)
            assert [r.usage.tokens_out for r in requests[1:]] == [budget, budget]
            assert agent.engine.stats.cancelled == 1

    run(body)
