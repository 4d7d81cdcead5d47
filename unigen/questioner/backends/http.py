"""Any OpenAI-compatible HTTP endpoint (a local ``vllm serve`` or llama.cpp ``llama-server``).

Standard library only (urllib + a thread pool), so no client package is needed. The few-shot
prompt is a plain completion, so the default route is ``/completions``; ``--api chat`` sends the
prompt as one user message to ``/chat/completions`` for servers that only expose chat models.

Failures are sorted by what a retry can change:

- timeouts, dropped connections, 408, 429 and 5xx: retried with exponential backoff and jitter;
  still failing after ``retries`` → a retryable ``Failure`` (the caption is asked again next run);
- 400/413/422: the server judged this one request invalid (typically a prompt longer than the
  model's context) → a permanent ``Failure``, recorded so no run asks again;
- 401/403/404/405, a refused connection or an unknown host after all retries: the endpoint, the
  key or the model name is wrong and no caption can succeed → ``BackendError``, the run stops.
"""

from __future__ import annotations

import http.client
import json
import os
import random
import socket
import threading
import time
import urllib.error
import urllib.parse
import urllib.request
from concurrent.futures import ThreadPoolExecutor

from ..errors import BackendError, UsageError
from .base import Backend, Failure, Generation, GenerationSettings

_FATAL_STATUS = frozenset({401, 403, 404, 405})
_INVALID_REQUEST_STATUS = frozenset({400, 413, 422})
_LOOPBACK = frozenset({"localhost", "127.0.0.1", "::1"})
# What a retry can fix: a slow or restarting server, a dropped or garbled connection.
_TRANSIENT = (TimeoutError, socket.timeout, ConnectionError, http.client.HTTPException)


def _excerpt(data: bytes, limit: int = 200) -> str:
    text = data.decode("utf-8", errors="replace").strip().replace("\n", " ")
    return text[:limit] + ("…" if len(text) > limit else "")


class HTTPBackend(Backend):
    name = "http"

    def __init__(
        self,
        endpoint: str,
        model: str | None = None,
        *,
        settings: GenerationSettings = GenerationSettings(),
        api: str = "completions",
        timeout: float = 120.0,
        retries: int = 3,
        backoff: float = 1.0,
        concurrency: int = 8,
        api_key: str | None = None,
    ):
        parsed = urllib.parse.urlparse(endpoint or "")
        if parsed.scheme not in ("http", "https") or not parsed.netloc:
            raise UsageError(f"--endpoint must be an http(s) URL such as http://127.0.0.1:8000/v1, got {endpoint!r}")
        if api not in ("completions", "chat"):
            raise UsageError(f"--api must be 'completions' or 'chat', got {api!r}")
        if timeout <= 0:
            raise UsageError(f"--timeout must be positive, got {timeout}")
        if retries < 0:
            raise UsageError(f"--retries must be >= 0, got {retries}")
        if backoff < 0:
            raise UsageError(f"--backoff must be >= 0, got {backoff}")
        if concurrency < 1:
            raise UsageError(f"--concurrency must be >= 1, got {concurrency}")
        route = "/chat/completions" if api == "chat" else "/completions"
        base = endpoint.rstrip("/")
        self.url = base if base.endswith(("/completions",)) else base + route
        self.model = model
        self.settings = settings
        self.api = api
        self.timeout = timeout
        self.retries = retries
        self.backoff = backoff
        self.concurrency = concurrency
        # Enough prompts in flight to keep every connection busy between batches.
        self.default_batch_size = 4 * concurrency
        self._headers = {"Content-Type": "application/json"}
        if api_key:
            self._headers["Authorization"] = f"Bearer {api_key}"
        # A local server must not be sent through an http_proxy set for the outside world.
        handlers = [urllib.request.ProxyHandler({})] if parsed.hostname in _LOOPBACK else []
        self._opener = urllib.request.build_opener(*handlers)
        self._pool = ThreadPoolExecutor(max_workers=concurrency, thread_name_prefix="questioner-http")
        self._rng = random.Random(os.getpid())
        self._rng_lock = threading.Lock()

    @classmethod
    def preflight(cls, **kwargs) -> None:
        cls(**kwargs).close()  # construction only validates and builds a thread pool: cheap

    def describe(self) -> dict:
        return {"backend": self.name, "model": self.model or self.url}

    def _payload(self, prompt: str) -> bytes:
        body = {
            "max_tokens": self.settings.max_new_tokens,
            "temperature": self.settings.temperature,
            "top_p": self.settings.top_p,
            "stop": list(self.settings.stop),
        }
        if self.model:
            body["model"] = self.model
        if self.api == "chat":
            body["messages"] = [{"role": "user", "content": prompt}]
        else:
            body["prompt"] = prompt
        return json.dumps(body).encode("utf-8")

    def _text(self, data: bytes) -> str:
        obj = json.loads(data)
        choice = obj["choices"][0]
        text = choice["message"]["content"] if self.api == "chat" else choice["text"]
        if not isinstance(text, str):
            raise TypeError("generation text is not a string")
        return text

    def _sleep_before_retry(self, attempt: int) -> None:
        with self._rng_lock:
            jitter = 1.0 + 0.25 * self._rng.random()  # de-synchronise workers that failed together
        time.sleep(self.backoff * (2**attempt) * jitter)

    def _request(self, prompt: str) -> Generation:
        data = self._payload(prompt)
        last = ""
        for attempt in range(self.retries + 1):
            if attempt:
                self._sleep_before_retry(attempt - 1)
            req = urllib.request.Request(self.url, data=data, headers=self._headers, method="POST")
            try:
                with self._opener.open(req, timeout=self.timeout) as resp:
                    body = resp.read()
            except urllib.error.HTTPError as exc:
                detail = f"HTTP {exc.code}: {_excerpt(exc.read() or b'')}"
                if exc.code in _FATAL_STATUS:
                    raise BackendError(f"--endpoint {self.url} answered {detail}; check the URL, "
                                       f"--model and the API key") from exc
                if exc.code in _INVALID_REQUEST_STATUS:
                    return Failure("endpoint_rejected_request", retryable=False, detail=detail)
                last = detail
                continue
            except urllib.error.URLError as exc:
                if isinstance(exc.reason, _TRANSIENT) and not isinstance(exc.reason, ConnectionRefusedError):
                    last = f"timeout or dropped connection ({exc.reason})"
                    continue
                # Refused connection, unknown host: retried in case the server is still starting.
                if attempt == self.retries:
                    raise BackendError(
                        f"--endpoint {self.url} is unreachable after {self.retries + 1} attempts: {exc.reason}"
                    ) from exc
                continue
            except _TRANSIENT as exc:
                last = f"timeout or dropped connection ({type(exc).__name__}: {exc})"
                continue
            try:
                return self._text(body)
            except (ValueError, KeyError, IndexError, TypeError) as exc:
                return Failure("bad_endpoint_response", retryable=True, detail=f"{exc}: {_excerpt(body)}")
        return Failure("endpoint_error", retryable=True, detail=f"{self.retries + 1} attempts, last: {last}")

    def generate(self, prompts: list[str], captions: list[str]) -> list[Generation]:
        # map() keeps prompt order and re-raises the first BackendError in the caller's thread.
        return list(self._pool.map(self._request, prompts))

    def close(self) -> None:
        self._pool.shutdown(wait=False, cancel_futures=True)
