"""Start and stop a local ``vllm serve`` (127.0.0.1, a free port) for tests and benchmarks.

    with LocalVllmServer(model_dir, log_path="server.log") as srv:
        client = openai.OpenAI(base_url=srv.base_url, api_key="none")

One process group per server, started by us and ended by us (SIGTERM, then SIGKILL after a grace
period). The defaults fit this project's CPU machines: fp32 (as the HF reference), 1 GiB of KV cache
(vLLM's CPU default reserves 92% of RAM), eager mode (compiling costs ~3 min per start on 2 cores).
"""
from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
import urllib.request

__all__ = ["LocalVllmServer", "free_port", "vllm_executable"]


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def vllm_executable() -> str:
    """The ``vllm`` CLI of the running interpreter's venv."""
    exe = os.path.join(os.path.dirname(sys.executable), "vllm")
    if not os.path.exists(exe):
        raise FileNotFoundError(f"no `vllm` next to {sys.executable}; create the serving venv with "
                                "`bash scripts/bootstrap.sh --vllm`")
    return exe


class LocalVllmServer:
    """``vllm serve MODEL`` on 127.0.0.1.

    Args:
        model: the model folder (a saved upcycled folder, or a plain HF one).
        served_name: the model name clients send. Default "upsafe".
        log_path: where the server's stdout/stderr go (default: a file next to nothing, os.devnull).
        eager: pass ``--enforce-eager`` (default True). False compiles with torch.compile first.
        kv_cache_bytes: ``--kv-cache-memory-bytes`` (default 1 GiB).
        max_model_len, dtype, seed, max_num_seqs: the vLLM options of the same names.
        extra_args: more CLI arguments. startup_timeout: seconds to wait for ``/health``.
        env: extra environment variables of the server (e.g. ``{"UPSAFE_ALLOW_NEGATIVE": "1"}``).
    """

    def __init__(self, model: str, *, served_name: str = "upsafe", log_path: str | None = None, eager: bool = True,
                 kv_cache_bytes: int = 1 << 30, max_model_len: int = 1024, dtype: str = "float32", seed: int = 0,
                 max_num_seqs: int = 64, extra_args: list[str] | tuple[str, ...] = (),
                 startup_timeout: float = 900.0, cwd: str | None = None, env: dict | None = None):
        self.model, self.served_name = os.fspath(model), served_name
        self.port = free_port()
        self.base_url = f"http://127.0.0.1:{self.port}/v1"
        self.log_path = log_path
        self.startup_timeout = startup_timeout
        self.cmd = [vllm_executable(), "serve", self.model, "--host", "127.0.0.1", "--port", str(self.port),
                    "--served-model-name", served_name, "--dtype", dtype, "--max-model-len", str(max_model_len),
                    "--kv-cache-memory-bytes", str(kv_cache_bytes), "--seed", str(seed),
                    "--max-num-seqs", str(max_num_seqs), "--disable-uvicorn-access-log",
                    *(["--enforce-eager"] if eager else []), *extra_args]
        # run outside any source checkout, so the installed upsafe_ext (built for this torch) is imported
        self.cwd = cwd or os.path.dirname(self.model.rstrip("/")) or "/"
        self.env = {**os.environ, **(env or {})}
        self.proc: subprocess.Popen | None = None
        self.startup_s: float | None = None

    def start(self) -> "LocalVllmServer":
        log = open(self.log_path, "ab") if self.log_path else subprocess.DEVNULL
        t0 = time.time()
        self.proc = subprocess.Popen(self.cmd, stdout=log, stderr=subprocess.STDOUT, cwd=self.cwd,
                                     env=self.env, start_new_session=True)
        if log is not subprocess.DEVNULL:
            log.close()
        deadline = t0 + self.startup_timeout
        while time.time() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"vllm serve exited with code {self.proc.returncode} during startup"
                                   f"{self._log_tail()}")
            if self.healthy():
                self.startup_s = time.time() - t0
                return self
            time.sleep(1.0)
        self.stop()
        raise TimeoutError(f"vllm serve was not healthy after {self.startup_timeout:.0f}s{self._log_tail()}")

    def healthy(self) -> bool:
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{self.port}/health", timeout=2) as r:
                return r.status == 200
        except OSError:
            return False

    def metrics(self) -> str:
        with urllib.request.urlopen(f"http://127.0.0.1:{self.port}/metrics", timeout=5) as r:
            return r.read().decode()

    def stop(self, grace: float = 30.0) -> None:
        p, self.proc = self.proc, None
        if p is None:
            return
        try:  # the group we created (start_new_session): the API server and its engine processes
            os.killpg(p.pid, signal.SIGTERM)
        except ProcessLookupError:
            return
        try:
            p.wait(grace)
        except subprocess.TimeoutExpired:
            try:
                os.killpg(p.pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
            p.wait(10)

    def _log_tail(self, n: int = 4000) -> str:
        if not self.log_path or not os.path.exists(self.log_path):
            return ""
        with open(self.log_path, "rb") as f:
            f.seek(max(0, os.path.getsize(self.log_path) - n))
            return "\n--- server log (tail) ---\n" + f.read().decode(errors="replace")

    def __enter__(self) -> "LocalVllmServer":
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()
