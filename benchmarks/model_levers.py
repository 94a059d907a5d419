"""Speed levers of the ``transformers`` agent, side by side (issue 17, target 1).

``python -m benchmarks.model_levers speed --variant NAME=JSON ...`` runs the
real agent (in-process, no server) once per variant per round, each in a
fresh process (torch's thread pools and allocator start clean), alternating
the variants within every round; it prints tokens/s for 1 request and for
``--users`` concurrent ones and each variant's ratio to the first, per round.
``answers`` prints each variant's greedy answers to the 20 prompts below, for
checking that a lever keeps the model's quality.

A variant is agent options as JSON, e.g. ``f32='{"dtype": "float32"}'``.
The weights are figure 3's Hugging Face copy of the bundled GGUF.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import subprocess
import sys
import time
from pathlib import Path

from .harness import PYTHON, REPO, median
from .local_model import OFFLINE, PROMPTS, ensure_hf_folder

# Short factual and task prompts: a broken lever shows at once in these.
QUALITY_PROMPTS = [
    "What is the capital of France?",
    "What is 12 plus 7?",
    "Name three primary colours.",
    "Translate 'good morning' into Spanish.",
    "What is the boiling point of water in Celsius?",
    "Who wrote Romeo and Juliet?",
    "Give me a synonym for 'happy'.",
    "What planet is known as the Red Planet?",
    "How many days are there in a week?",
    "Write a haiku about the sea.",
    "What is the largest ocean on Earth?",
    "Explain what a noun is in one sentence.",
    "What do bees make?",
    "Name a famous painting by Leonardo da Vinci.",
    "What gas do plants take in from the air?",
    "What is the opposite of 'cold'?",
    "How many legs does a spider have?",
    "What language is spoken in Brazil?",
    "Suggest a name for a pet cat.",
    "What is the freezing point of water in Fahrenheit?",
]


def worker(folder: Path, options: dict, mode: str, users: int, max_new: int) -> dict:
    from plugins.transformers_agent import TransformersAgent, TransformersOptions
    from tornado_app.agents import AgentRequest
    from tornado_app.config import Settings

    options = {"model_path": str(folder), "cache_dir": None, "temperature": 0,
               "max_new_tokens": max_new, "max_batch_size": max(users, 8),
               "time_limit_seconds": 900, "context_tokens": 2048, **options}

    def request(prompt: str) -> AgentRequest:
        return AgentRequest([{"role": "system", "content": "You are a helpful assistant."},
                             {"role": "user", "content": prompt}], "bench")

    async def answer(agent, prompt: str) -> tuple[str, int]:
        req = request(prompt)
        text = "".join([piece async for piece in agent.stream(req)])
        return text, req.usage.tokens_out

    async def timed(agent, prompts: list[str]) -> float:
        started = time.perf_counter()
        results = await asyncio.gather(*(answer(agent, p) for p in prompts))
        return sum(tokens for _, tokens in results) / (time.perf_counter() - started)

    async def main() -> dict:
        started = time.perf_counter()
        agent = TransformersAgent(TransformersOptions(**options), Settings(data_dir="."))
        await agent.start()
        load = time.perf_counter() - started
        try:
            if mode == "answers":
                answers = await asyncio.gather(*(answer(agent, p) for p in QUALITY_PROMPTS))
                return {"load_s": load, "answers": [text for text, _ in answers]}
            await answer(agent, "Hi!")  # lazy initialisation
            prompts = (PROMPTS * (users // len(PROMPTS) + 1))[:users]
            single = await timed(agent, prompts[:1])
            batch = await timed(agent, prompts)
            return {"load_s": load, "single_tok_s": single, "batch_tok_s": batch}
        finally:
            await agent.close()

    return asyncio.run(main())


def run_worker(folder: Path, options: dict, mode: str, users: int, max_new: int) -> dict:
    out = subprocess.run(
        [PYTHON, "-m", "benchmarks.model_levers", "worker", str(folder), json.dumps(options),
         mode, str(users), str(max_new)],
        check=True, capture_output=True, text=True, cwd=REPO,
        env={**os.environ, **OFFLINE}, timeout=1800)
    return json.loads(out.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.model_levers")
    parser.add_argument("mode", choices=["speed", "answers", "worker"])
    parser.add_argument("rest", nargs="*")
    parser.add_argument("--variant", action="append", default=[], metavar="NAME=JSON")
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--users", type=int, default=8)
    parser.add_argument("--max-new-tokens", type=int, default=64)
    parser.add_argument("--base", default="{}", metavar="JSON",
                        help="options of the baseline variant `current` (default: none)")
    args = parser.parse_args()
    if args.mode == "worker":
        folder, options, mode, users, max_new = args.rest
        result = worker(Path(folder), json.loads(options), mode, int(users), int(max_new))
        sys.stdout.write(json.dumps(result) + "\n")
        return
    folder = ensure_hf_folder()
    variants = {"current": json.loads(args.base)}
    for item in args.variant:
        name, _, options = item.partition("=")
        variants[name] = json.loads(options)
    if args.mode == "answers":
        results = {name: run_worker(folder, options, "answers", 1, 48)
                   for name, options in variants.items()}
        for index, prompt in enumerate(QUALITY_PROMPTS):
            print(f"\n{index + 1}. {prompt}")
            for name, result in results.items():
                print(f"   {name}: {result['answers'][index]!r}")
        return
    rows: dict[str, list[dict]] = {name: [] for name in variants}
    for index in range(args.rounds):
        order = list(variants.items())
        if index % 2:
            order.reverse()
        for name, options in order:
            rows[name].append(run_worker(folder, options, "speed", args.users,
                                         args.max_new_tokens))
            print(f"round {index + 1} {name}: {rows[name][-1]}", flush=True)
    base = rows["current"]
    for name, results in rows.items():
        single = [r["single_tok_s"] / b["single_tok_s"] for r, b in zip(results, base)]
        batch = [r["batch_tok_s"] / b["batch_tok_s"] for r, b in zip(results, base)]
        print(f"{name}: 1 user {median([r['single_tok_s'] for r in results]):.1f} tok/s "
              f"({median(single):.2f}x), {args.users} users "
              f"{median([r['batch_tok_s'] for r in results]):.1f} tok/s ({median(batch):.2f}x); "
              f"per round {', '.join(f'{x:.2f}' for x in batch)}; load "
              f"{median([r['load_s'] for r in results]):.1f} s")


if __name__ == "__main__":
    main()
