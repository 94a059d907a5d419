"""Figure 3: the local model (the ``transformers`` agent) against its baselines.

Side by side, in interleaved rounds of one run:

- **raw**: the same model's ``model.generate()`` for one request, in its own
  process (``benchmarks.model_worker generate``), on the Hugging Face copy
  of the bundled GGUF (same weights, de-quantized to float32);
- **service**: the real service (``transformers`` agent, the bundled model,
  its converted copy cached under ``data/bench/service``) answering one
  user, then ``users`` users at once, over WebSockets; while the batch
  generates, new clients connect (the event loop must not stall);
- **peer**: ``transformers serve --continuous-batching`` serving the Hugging
  Face folder on loopback to ``users`` concurrent OpenAI-API clients (and to
  one), the server a user would otherwise pick;
- **llama-server**: llama.cpp's own server (``benchmarks.llama_server``, built
  once from source) on the bundled GGUF file itself, with the agent's thread
  count and ``users`` slots, asked by the same clients as the peer;
- **TTFT**: a short prompt to the idle service, time to its first chunk.

Every side generates greedily, at most ``max_new_tokens`` tokens, stopping
at the end-of-sequence token. Tokens/s are generated tokens (from the
transcript's ``tokens_out``, the OpenAI ``usage``, or ``generate()``'s
output) over the wall time from the request to its last token.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import subprocess
import time
from pathlib import Path

from . import harness, llama_server
from .harness import PYTHON, REPO, ServerProcess, chat_path, median, percentile

TARGETS = {"batch_vs_single": 5.0, "batch_vs_peer": 1.2, "single_vs_raw": 0.9,
           "ttft_ms": 300.0, "p99_connect_ms": 50.0,
           # issue 17, target 1
           "batch_vs_llama": 1.0, "single_vs_llama": 0.5}
CACHE = REPO / "data" / "bench"
HF_FOLDER = CACHE / "SmolLM2-135M-Instruct-hf"
SYSTEM_PROMPT = "You are a helpful assistant. The user's name is {username}."
# Prompts that ask for long answers, so that replies run to max_new_tokens.
PROMPTS = [
    "Write a long story about a lighthouse keeper who finds a message in a bottle.",
    "Explain in detail how a steam engine works, step by step.",
    "Describe the history of the Roman Empire from its founding to its fall.",
    "Write a detailed guide to growing tomatoes in a small garden.",
    "Tell a long story about a dragon who is afraid of flying.",
    "Explain how the internet works, from cables to web pages, in detail.",
    "Describe a journey across the Sahara desert on a camel, day by day.",
    "Write a detailed recipe for baking bread at home, with every step.",
]
SHORT_PROMPT = "Hi!"
OFFLINE = {"HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", "HF_HUB_DISABLE_TELEMETRY": "1"}


def ensure_hf_folder(folder: Path = HF_FOLDER) -> Path:
    """The bundled GGUF saved once as a Hugging Face folder (about 30 s, 540 MB)."""
    if not (folder / "config.json").is_file():
        folder.parent.mkdir(parents=True, exist_ok=True)
        shutil.rmtree(folder.with_name(folder.name + ".partial"), ignore_errors=True)
        subprocess.run([PYTHON, "-m", "benchmarks.model_worker", "convert", str(folder)],
                       check=True, cwd=REPO, env={**os.environ, **OFFLINE},
                       stdout=subprocess.DEVNULL, timeout=600)
    return folder


class RawGenerate:
    """The baseline process: loads the model, then one generate() per request."""

    def __init__(self, folder: Path, max_new_tokens: int, model_threads: int | None, dtype: str):
        env = {**os.environ, **OFFLINE}
        if model_threads:
            env["OMP_NUM_THREADS"] = str(model_threads)
        self.proc = subprocess.Popen(
            [PYTHON, "-m", "benchmarks.model_worker", "generate", str(folder),
             "--max-new-tokens", str(max_new_tokens), "--dtype", dtype],
            stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL,
            cwd=REPO, env=env, text=True, bufsize=1)

    def wait_ready(self) -> "RawGenerate":
        ready = self.read()
        if not ready.get("ready"):
            raise RuntimeError(f"raw generate() worker failed: {ready}")
        return self

    def read(self) -> dict:
        line = self.proc.stdout.readline()
        if not line:
            raise RuntimeError(f"raw generate() worker exited ({self.proc.poll()})")
        return json.loads(line)

    def generate(self, messages: list[dict]) -> dict:
        self.proc.stdin.write(json.dumps({"messages": messages}) + "\n")
        self.proc.stdin.flush()
        return self.read()

    def close(self) -> None:
        self.proc.stdin.close()
        try:
            self.proc.wait(30)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait(10)


def start_peer(workdir: Path, folder: Path, size: dict,
               dtype: str) -> tuple[ServerProcess | None, str]:
    """``transformers serve --continuous-batching`` on loopback; (None, why) if it cannot run."""
    executable = shutil.which("transformers") or str(Path(PYTHON).parent / "transformers")
    if not Path(executable).exists():
        return None, "the `transformers` CLI is not installed (pip install 'transformers[serving]')"
    peer = ServerProcess([], workdir / "peer.log", env=OFFLINE, ready_path="/health")
    peer.argv = [executable, "serve", "--continuous-batching", "--device", "cpu",
                 "--host", harness.HOST, "--port", str(peer.port), "--dtype", dtype,
                 *size.get("peer_args", []), str(folder)]
    try:
        peer.start(timeout=300)
    except RuntimeError as exc:
        return None, f"transformers serve did not start: {str(exc)[-400:]}"
    return peer, ""


def peer_run(peer: ServerProcess, folder: Path, prompts: list[list[dict]], workdir: Path,
             max_tokens: int) -> dict:
    path = workdir / "peer-prompts.json"
    path.write_text(json.dumps(prompts), encoding="utf-8")
    out = subprocess.run(
        [PYTHON, "-m", "benchmarks.model_worker", "peer", "--port", str(peer.port),
         "--model", str(folder), "--prompts", str(path), "--max-tokens", str(max_tokens)],
        check=True, capture_output=True, text=True, cwd=REPO, timeout=900)
    result = json.loads(out.stdout.strip().splitlines()[-1])
    return {**result, "tok_s": result["tokens"] / result["seconds"]}


def agent_dtype() -> str:
    """What the agent's ``dtype: auto`` picks on this machine; the raw baseline
    and the peer run in it too, so that all three do the same arithmetic."""
    from plugins.transformers_weights import compute_dtype

    return str(compute_dtype("auto")).removeprefix("torch.")


def messages_for(username: str, prompt: str) -> list[dict]:
    return [{"role": "system", "content": SYSTEM_PROMPT.format(username=username)},
            {"role": "user", "content": prompt}]


class ServiceClient:
    """Asks the service through load-generator processes; tokens come from its transcript."""

    def __init__(self, server: ServerProcess, db_url: str, tokens: list[str], workdir: Path):
        self.server, self.db_url, self.tokens, self.workdir = server, db_url, tokens, workdir
        self.asked = 0

    def ask(self, prompts: list[str], probes: int = 0, probe_interval: float = 0.05) -> dict:
        self.asked += 1
        last_id = self._last_message_id()
        targets = [{"port": self.server.port, "message": prompt,
                    "path": chat_path(f"ask{self.asked}-{n}", self.tokens[n])}
                   for n, prompt in enumerate(prompts)]
        specs = [{"mode": "ask", "targets": targets, "max_seconds": 900}]
        if probes:
            probe_tokens = self.tokens[len(prompts):len(prompts) + probes]
            specs.append({"mode": "probe", "interval": probe_interval, "count": probes,
                          "max_seconds": 300,
                          "targets": [{"port": self.server.port, "path": chat_path("probe", t)}
                                      for t in probe_tokens]})
        results = harness.run_loadgens(specs, self.workdir, start_in=0.5)
        answers = results[0]["results"]
        rows = harness.query(
            self.db_url, "SELECT tokens_in, tokens_out, status FROM messages "
            "WHERE role = 'assistant' AND id > :last", last=last_id)
        tokens = sum(row.tokens_out or 0 for row in rows)
        seconds = max(a["total_ms"] for a in answers) / 1000
        return {
            "tokens": tokens, "seconds": seconds, "tok_s": tokens / seconds,
            "replies": len(rows), "not_ok": sum(1 for row in rows if row.status != "ok"),
            # The prompts as the agent counted them: shows what a variant's
            # config put into them (memories make them longer).
            "prompt_tokens": median([row.tokens_in or 0 for row in rows]) if rows else 0,
            "first_ms": median([a["first_ms"] for a in answers if a["first_ms"] is not None]),
            "connect_ms": results[1]["connect_ms"] if probes else [],
        }

    def _last_message_id(self) -> int:
        rows = harness.query(self.db_url, "SELECT coalesce(max(id), 0) AS id FROM messages")
        return rows[0].id


def start_variants(stack: contextlib.ExitStack, workdir: Path, variants: dict[str, Path],
                   configs: dict[str, dict], agent: dict, data_dir: Path,
                   count: int) -> dict[str, "ServiceClient"]:
    """Other copies of the service (name -> folder), each with its own database
    and its ``configs`` overlay (harness.split_overlay), started at once (their
    model loads overlap) and stopped by ``stack``; then their users save the
    overlay's memories."""
    servers, clients, memories = [], {}, {}
    for name, app_dir in variants.items():
        db = stack.enter_context(harness.database("sqlite", workdir / name))
        tokens = harness.prepare_users(db.url, count, app_dir=app_dir)
        sections, memories[name] = harness.split_overlay(configs.get(name, {}))
        config = harness.write_config(workdir / name, db.url, agent, data_dir=data_dir,
                                      overlay=sections)
        server = ServerProcess.service(config, workdir / f"{name}.log", app_dir,
                                       ready_path="/readyz")
        servers.append(server)
        clients[name] = ServiceClient(server, db.url, tokens, workdir)
    for server in ServerProcess.start_all(servers, timeout=900):
        stack.callback(server.stop)
    for name, client in clients.items():
        harness.save_memories(client.server.port, client.tokens, memories[name])
    return clients


def variant_results(rows: dict[str, list], singles: list[float],
                    batches: list[float]) -> dict:
    """Each variant's rates and its per-round ratios to this tree."""
    out = {}
    for name, measured in rows.items():
        single = [r["tok_s"] for r in measured["single"]]
        batch = [r["tok_s"] for r in measured["batch"]]
        out[name] = {
            "single_tok_s": median(single), "batch_tok_s": median(batch),
            "single_vs_service": median([v / s for v, s in zip(single, singles)]),
            "batch_vs_service": median([v / b for v, b in zip(batch, batches)]),
            "batch_round_ratios": [v / b for v, b in zip(batch, batches)],
            "ttft_ms": median(measured["ttft"]),
            "replies_not_ok": sum(r["not_ok"] for r in measured["batch"]),
            "prompt_tokens": median([r["prompt_tokens"] for r in measured["batch"]]),
        }
    return out


def run(workdir: Path, size: dict, variants: dict[str, Path] | None = None,
        configs: dict[str, dict] | None = None) -> dict:
    """``variants``: other copies of the service (name -> folder), each asked
    the same questions in the same rounds, right after this tree. ``configs``:
    what to lay over a variant's config (name -> a --variant-config file's
    content: config sections, and ``benchmark.memories`` for its users to save)."""
    users, rounds = size["users"], size["rounds"]
    variants = variants or {}
    configs = configs or {}
    max_new = size["max_new_tokens"]
    folder = Path(size.get("hf_folder") or ensure_hf_folder())
    prompts = (PROMPTS * (users // len(PROMPTS) + 1))[:users]
    dtype = agent_dtype()
    agent = {"backend": "transformers", "transformers": {
        # No time limit to speak of: on a busy machine a cut reply would flatter the rate.
        "max_new_tokens": max_new, "temperature": 0, "max_batch_size": users, "dtype": dtype,
        "time_limit_seconds": 900,
        "context_tokens": 2048, **size.get("agent_options", {})}}
    notes: list[str] = []
    rows: dict[str, list] = {k: [] for k in ("raw", "single", "batch", "probed", "peer_batch",
                                             "peer_single", "llama_batch", "llama_single",
                                             "ttft", "connect")}
    variant_rows = {name: {"single": [], "batch": [], "ttft": []} for name in variants}
    with harness.database("sqlite", workdir) as db, contextlib.ExitStack() as stack:
        tokens = harness.prepare_users(db.url, users + size["probes"])
        data_dir = Path(size.get("data_dir", CACHE / "service"))
        config = harness.write_config(workdir, db.url, agent, data_dir=data_dir)
        others = start_variants(stack, workdir, variants, configs, agent, data_dir, users)
        started = time.perf_counter()
        service = ServerProcess.service(config, workdir / "model-service.log",
                                        ready_path="/readyz")
        raw = RawGenerate(folder, max_new, size.get("model_threads"), dtype)  # loads meanwhile
        try:
            service.start(timeout=900)
        except BaseException:
            raw.close()
            raise
        with service:
            load_seconds = time.perf_counter() - started
            client = ServiceClient(service, db.url, tokens, workdir)
            peer = llama = None
            try:
                raw.wait_ready()
                why = "peer skipped (BENCH_PEER=0 or smoke size)"
                if size.get("peer", True):
                    peer, why = start_peer(workdir, folder, size, dtype)
                if why:
                    notes.append(why)
                if size.get("peer", True):
                    threads = size.get("model_threads") or _torch_threads()
                    llama, why = llama_server.start(workdir, users, threads)
                    if why:
                        notes.append(why)
                username = "bench00000"  # the first user; its system prompt
                one = [messages_for(username, prompts[0])]
                many = [messages_for(f"bench{n:05d}", p) for n, p in enumerate(prompts)]
                if size.get("warmup", True):
                    # First calls pay for lazy initialisation everywhere.
                    raw.generate(one[0])
                    client.ask([SHORT_PROMPT])
                    for other in others.values():
                        other.ask([SHORT_PROMPT])
                    if peer is not None:
                        peer_run(peer, folder, one, workdir, 8)
                    if llama is not None:
                        peer_run(llama, folder, one, workdir, 8)
                for index in range(rounds):
                    rows["raw"].append(raw.generate(one[0]))
                    rows["single"].append(client.ask(prompts[:1]))
                    # The rate set against the peers is measured under their load:
                    # the users' sockets and nothing else. New sockets arriving
                    # while the replies generate get a batch of their own.
                    rows["batch"].append(client.ask(prompts))
                    probed = client.ask(prompts, probes=size["probes"],
                                        probe_interval=size["probe_interval"])
                    rows["probed"].append(probed)
                    rows["connect"] += probed["connect_ms"]
                    if peer is not None and index < size.get("peer_rounds", rounds):
                        rows["peer_batch"].append(peer_run(peer, folder, many, workdir, max_new))
                        if index == 0:
                            rows["peer_single"].append(peer_run(peer, folder, one, workdir, max_new))
                    if llama is not None:
                        rows["llama_batch"].append(peer_run(llama, folder, many, workdir, max_new))
                        rows["llama_single"].append(peer_run(llama, folder, one, workdir, max_new))
                    rows["ttft"].append(client.ask([SHORT_PROMPT])["first_ms"])
                    for name, other in others.items():
                        variant_rows[name]["single"].append(other.ask(prompts[:1]))
                        variant_rows[name]["batch"].append(other.ask(prompts))
                        variant_rows[name]["ttft"].append(other.ask([SHORT_PROMPT])["first_ms"])
            finally:
                raw.close()
                for server in (peer, llama):
                    if server is not None:
                        server.stop()
            service_rss = harness.rss_kib(service.pid)
    raw_rates = [r["tokens"] / r["seconds"] for r in rows["raw"]]
    singles = [r["tok_s"] for r in rows["single"]]
    batches = [r["tok_s"] for r in rows["batch"]]
    peers = [r["tok_s"] for r in rows["peer_batch"]]
    peer_single = median([r["tok_s"] for r in rows["peer_single"]]) if rows["peer_single"] else None
    llamas = [r["tok_s"] for r in rows["llama_batch"]]
    llama_singles = [r["tok_s"] for r in rows["llama_single"]]
    # Ratios are taken within each round (measured minutes apart at most), then
    # the median over rounds: slow changes in the machine's load cancel out.
    return {
        "users": users, "rounds": rounds, "max_new_tokens": max_new, "dtype": dtype,
        "service_start_seconds": load_seconds, "service_rss_mib": service_rss / 1024,
        "raw_tok_s": median(raw_rates), "single_tok_s": median(singles),
        "batch_tok_s": median(batches),
        "probed_tok_s": median([r["tok_s"] for r in rows["probed"]]),
        "peer_batch_tok_s": median(peers) if peers else None, "peer_single_tok_s": peer_single,
        "single_vs_raw": median([s / r for s, r in zip(singles, raw_rates)]),
        "batch_vs_single": median([b / s for b, s in zip(batches, singles)]),
        "batch_vs_raw": median([b / r for b, r in zip(batches, raw_rates)]),
        "batch_vs_peer": median([b / p for b, p in zip(batches, peers)]) if peers else None,
        "llama_batch_tok_s": median(llamas) if llamas else None,
        "llama_single_tok_s": median(llama_singles) if llamas else None,
        "batch_vs_llama": median([b / p for b, p in zip(batches, llamas)]) if llamas else None,
        "single_vs_llama": (median([s / p for s, p in zip(singles, llama_singles)])
                            if llamas else None),
        "round_ratios": [{"single_vs_raw": s / r, "batch_vs_single": b / s}
                         for s, r, b in zip(singles, raw_rates, batches)],
        "ttft_ms": median(rows["ttft"]),
        "p99_connect_ms": percentile(rows["connect"], 99),
        "p50_connect_ms": percentile(rows["connect"], 50),
        "connect_probes": len(rows["connect"]),
        "tokens_per_reply": [r["tokens"] for r in rows["raw"]],
        "batch_replies_not_ok": sum(r["not_ok"] for r in rows["batch"] + rows["probed"]),
        "prompt_tokens": median([r["prompt_tokens"] for r in rows["batch"]]),
        "notes": notes,
        "variants": variant_results(variant_rows, singles, batches),
        "rounds_detail": rows,
        "variants_detail": variant_rows,
    }


def report(result: dict) -> list[tuple[str, str, str]]:
    users = result["users"]
    peer = (f"**{result['batch_vs_peer']:.2f}x** ({result['batch_tok_s']:.1f} vs "
            f"{result['peer_batch_tok_s']:.1f} tok/s)" if result["batch_vs_peer"]
            else "not measured: " + "; ".join(result["notes"]))
    return [
        (f"Agent, {users} users at once / agent, 1 user (aggregate tokens/s)",
         f"**{result['batch_vs_single']:.2f}x** ({result['batch_tok_s']:.1f} vs "
         f"{result['single_tok_s']:.1f} tok/s)", f">= {TARGETS['batch_vs_single']:.0f}x"),
        (f"Agent, {users} users / `transformers serve --continuous-batching`, {users} clients",
         peer, f">= {TARGETS['batch_vs_peer']}x"),
        *_llama_rows(result),
        ("Agent, 1 user / raw `generate()`",
         f"**{result['single_vs_raw']:.2f}x** ({result['single_tok_s']:.1f} vs "
         f"{result['raw_tok_s']:.1f} tok/s)", f">= {TARGETS['single_vs_raw']}x"),
        ("Time to first token, short prompt, no queue",
         f"**{result['ttft_ms']:.0f} ms**", f"<= {TARGETS['ttft_ms']:.0f} ms"),
        (f"p99 connect-to-welcome while {users} replies generate",
         f"**{result['p99_connect_ms']:.1f} ms** (p50 {result['p50_connect_ms']:.1f} ms, "
         f"{result['connect_probes']} clients)", f"<= {TARGETS['p99_connect_ms']:.0f} ms"),
    ]


def _llama_rows(result: dict) -> list[tuple[str, str, str]]:
    users = result["users"]
    if not result.get("batch_vs_llama"):
        return [(f"Agent / `llama-server` (same GGUF, {users} slots)",
                 "not measured: " + "; ".join(result["notes"]), ">= 1.0x")]
    return [
        (f"Agent, {users} users / `llama-server`, {users} clients (same GGUF and threads)",
         f"**{result['batch_vs_llama']:.2f}x** ({result['batch_tok_s']:.1f} vs "
         f"{result['llama_batch_tok_s']:.1f} tok/s)", f">= {TARGETS['batch_vs_llama']}x"),
        ("Agent, 1 user / `llama-server`, 1 client",
         f"**{result['single_vs_llama']:.2f}x** ({result['single_tok_s']:.1f} vs "
         f"{result['llama_single_tok_s']:.1f} tok/s)", f">= {TARGETS['single_vs_llama']}x"),
    ]


def _torch_threads() -> int:
    """The agent's default thread count (torch's: one per physical core)."""
    import torch

    return torch.get_num_threads()
