"""A teacher served by an inference engine (vLLM, sglang) through its OpenAI-compatible API. No Django.

Admins configure the servers a worker may query (``DISTILLWEB_TEACHER_SERVERS="name=base_url,..."``, an
optional bearer token per server in ``DISTILLWEB_TEACHER_SERVER_TOKEN_<NAME>``); a run's teacher of source
``server`` names one of them (``params["server"]``) and the served model (``name``). Users never give a URL,
and messages name a server by its configured name, never by its address or token.

What a run asks of the server:

- :meth:`ServedTeacher.check`: the server answers, ``/v1/models`` lists the model, and its tokenizer is the
  student's (probe texts tokenised by the server's ``/tokenize`` give the student's ids; the student's last
  token id decodes to the same text);
- :meth:`ServedTeacher.topk`: per row of token ids, ``POST /v1/completions`` with ``prompt_logprobs: k`` and
  ``max_tokens: 1``; each predicted position's top-k ids and log-probabilities, the actual next token's
  log-probability and the tail mass (1 − Σ top-k, clamped, as :func:`.cache.topk_of` computes it), in the
  records :func:`.teachers._lm_topk_batch` stores. Rows go in requests of a few prompts, several requests at
  a time (``DISTILLWEB_TEACHER_SERVER_CONCURRENCY``);
- :meth:`ServedTeacher.generate`: continuations of token-id prompts (seq_kd), with the run's decoding
  settings.

Connection errors, timeouts and 5xx answers are retried with exponential backoff; what then fails is a
:class:`.errors.ModelLoadError` naming the server. Importing this module loads no torch (the settings parse
the servers with :func:`parse_servers`).
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Iterator, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from typing import TYPE_CHECKING, Any

from .errors import ConfigError, ModelLoadError

if TYPE_CHECKING:
    from torch import Tensor

    from .config import AllowedPaths, ModelConfig

SERVERS_ENV = "DISTILLWEB_TEACHER_SERVERS"
TOKEN_ENV_PREFIX = "DISTILLWEB_TEACHER_SERVER_TOKEN_"
CONCURRENCY_ENV = "DISTILLWEB_TEACHER_SERVER_CONCURRENCY"
TIMEOUT_ENV = "DISTILLWEB_TEACHER_SERVER_TIMEOUT"
SERVER_NAME = re.compile(r"[a-z0-9][a-z0-9_-]{0,39}")
MODEL_NAME_MAX = 200
ROWS_PER_REQUEST = 8
_MIN_TAIL = 1e-12  # as .cache.topk_of clamps the tail
# Texts whose ids the server's tokenizer must give as the student's does (besides a few of the dataset's).
PROBE_TEXTS = (
    "The quick brown fox jumps over the lazy dog. 0123456789",
    "  Tabs\tand\nnew lines, ünïcödé, 東京, emoji 🙂 and punctuation: (a+b)*c; x != y?",
)


class ServerUnavailable(ModelLoadError):
    """The server could not be reached, timed out or kept failing (5xx) through every retry."""


# --- configuration ------------------------------------------------------------------------------------------


def parse_servers(text: str) -> dict[str, str]:
    """``name=base_url[,name2=base_url2]`` as {name: base_url}. Raises ValueError naming the bad part."""
    servers: dict[str, str] = {}
    for part in (p.strip() for p in (text or "").split(",")):
        if not part:
            continue
        name, sep, url = (s.strip() for s in part.partition("="))
        if not sep or not SERVER_NAME.fullmatch(name):
            raise ValueError(
                f"{SERVERS_ENV}: '{name}' is not a server name (lower-case letters, digits, '-' and '_', "
                "at most 40), given as name=base_url."
            )
        if not re.fullmatch(r"https?://[^\s/]+(/[^\s]*)?", url):
            raise ValueError(f"{SERVERS_ENV}: the base URL of server '{name}' is not an http(s) URL.")
        if name in servers:
            raise ValueError(f"{SERVERS_ENV}: server '{name}' is named twice.")
        servers[name] = url.rstrip("/")
    return servers


def configured_servers() -> dict[str, str]:
    """The servers this process's environment configures."""
    return parse_servers(os.environ.get(SERVERS_ENV, ""))


def token_env(name: str) -> str:
    return TOKEN_ENV_PREFIX + name.upper().replace("-", "_")


def server_of(model: ModelConfig) -> str:
    """The configured server a ``server`` teacher names."""
    value = model.params.get("server", "")
    return value if isinstance(value, str) else ""


def model_name_problem(value: Any) -> str | None:
    """Why ``value`` is not a served model name (what the server lists in ``/v1/models``), or None."""
    if not isinstance(value, str) or not value.strip():
        return "give the model name the server serves (as its /v1/models lists it)"
    if len(value) > MODEL_NAME_MAX or not value.isprintable() or value != value.strip():
        return f"a served model name is at most {MODEL_NAME_MAX} printable characters, without outer spaces"
    return None


def server_problem(model: ModelConfig, names: Sequence[str]) -> str | None:
    """Why a ``server`` teacher cannot be used with the servers ``names``, or None."""
    name = server_of(model)
    if not name:
        return "name one of the configured teacher servers"
    if name not in names:
        known = ", ".join(sorted(names)) or "none is configured"
        return f"'{name}' is not a configured teacher server ({known})"
    problem = model_name_problem(model.name)
    return f"its served model name is not usable: {problem}" if problem else None


def servers_allowed(allowed: AllowedPaths | None) -> dict[str, str]:
    """The servers a run may query: those the worker set (``AllowedPaths.teacher_servers``), else (the engine
    used from the CLI) this process's environment."""
    if allowed is None:
        return configured_servers()
    return dict(s.split("=", 1) for s in allowed.teacher_servers)


# --- the client ---------------------------------------------------------------------------------------------


class ServedStats:
    """What the server has done for this process: requests, tokens scored or generated, and the seconds at
    least one request was in flight (so concurrent requests count once: tokens/s is the server's rate)."""

    def __init__(self) -> None:
        self.requests, self.tokens, self.seconds = 0, 0, 0.0
        self._lock, self._in_flight, self._since = threading.Lock(), 0, 0.0

    @contextlib.contextmanager
    def request(self, tokens: int) -> Iterator[list[int]]:
        """One request of ``tokens`` tokens; append to the yielded list the tokens its answer adds."""
        with self._lock:
            if not self._in_flight:
                self._since = time.perf_counter()
            self._in_flight += 1
        counted = [tokens]
        try:
            yield counted
        finally:
            with self._lock:
                self._in_flight -= 1
                self.requests += 1
                self.tokens += sum(counted)
                if not self._in_flight:
                    self.seconds += time.perf_counter() - self._since

    @property
    def tokens_per_s(self) -> float:
        return self.tokens / self.seconds if self.seconds > 0 else 0.0


class ServedTeacher:
    """The client of one configured server and one served model.

    Args:
        name: the server's configured name (the only way messages name it).
        base_url: its address (``http://host:port``; ``/v1/...`` and ``/tokenize`` are appended).
        model: the served model name.
        token: a bearer token, or "".
        timeout: seconds one request may take; retries: further tries after a connection error, a timeout
            or a 5xx answer, waiting ``backoff · 2^i`` seconds before try i.
        concurrency: requests in flight at a time.
    """

    def __init__(
        self,
        name: str,
        base_url: str,
        model: str,
        *,
        token: str = "",
        timeout: float | None = None,
        retries: int = 4,
        backoff: float = 0.5,
        concurrency: int | None = None,
        rows_per_request: int = ROWS_PER_REQUEST,
    ) -> None:
        self.name, self.base_url, self.model, self._token = name, base_url.rstrip("/"), model, token
        self.timeout = timeout or float(os.environ.get(TIMEOUT_ENV, "120"))
        self.retries, self.backoff = retries, backoff
        self.concurrency = max(1, concurrency or int(os.environ.get(CONCURRENCY_ENV, "4")))
        self.rows_per_request = max(1, rows_per_request)
        self.stats = ServedStats()
        self.info: dict[str, Any] = {}

    @classmethod
    def for_model(cls, model: ModelConfig, allowed: AllowedPaths | None) -> ServedTeacher:
        """The client of a ``server`` teacher, from the servers the worker allows (tokens from its
        environment)."""
        servers = servers_allowed(allowed)
        problem = server_problem(model, list(servers))
        if problem:
            raise ModelLoadError(f"Teacher model '{model.describe()}' cannot be served: {problem}.")
        name = server_of(model)
        return cls(name, servers[name], model.name, token=os.environ.get(token_env(name), ""))

    def __repr__(self) -> str:  # never the URL or the token
        return f"ServedTeacher(server={self.name!r}, model={self.model!r})"

    @property
    def what(self) -> str:
        return f"Teacher server '{self.name}'"

    # -- HTTP --
    def _request(self, path: str, body: Mapping[str, Any] | None = None) -> Any:
        """GET (``body`` None) or POST JSON to ``path``; the parsed answer. Retries what may pass."""
        headers = {"Accept": "application/json"}
        if self._token:
            headers["Authorization"] = f"Bearer {self._token}"
        data = None
        if body is not None:
            data, headers["Content-Type"] = json.dumps(body).encode(), "application/json"
        last = ""
        for attempt in range(self.retries + 1):
            if attempt:
                time.sleep(self.backoff * 2 ** (attempt - 1))
            request = urllib.request.Request(self.base_url + path, data=data, headers=headers)
            try:
                with urllib.request.urlopen(request, timeout=self.timeout) as answer:
                    return json.loads(answer.read())
            except urllib.error.HTTPError as exc:
                detail = _error_detail(exc)
                if exc.code >= 500:
                    last = f"it answered {exc.code} on {path}{detail}"
                    continue
                raise ModelLoadError(f"{self.what} refused {path} ({exc.code}){detail}.") from None
            except (urllib.error.URLError, TimeoutError, ConnectionError, OSError) as exc:
                reason = getattr(exc, "reason", exc)
                kind = "timed out" if isinstance(reason, TimeoutError) else "cannot be reached"
                last = f"it {kind} ({type(reason).__name__})"
            except json.JSONDecodeError:
                raise ModelLoadError(f"{self.what} answered {path} with something other than JSON.") from None
        raise ServerUnavailable(f"{self.what} failed after {self.retries + 1} tries: {last}.")

    # -- the model and its tokenizer --
    def model_info(self) -> dict[str, Any]:
        """The model's entry of ``/v1/models`` (``id``, ``max_model_len`` on vLLM). Raises ModelLoadError when
        the server does not list it."""
        if not self.info:
            listed = self._request("/v1/models").get("data") or []
            names = [m.get("id") for m in listed if isinstance(m, dict)]
            if self.model not in names:
                raise ModelLoadError(
                    f"{self.what} does not serve model '{self.model}'; it serves: "
                    f"{', '.join(str(n) for n in names) or 'nothing'}."
                )
            self.info = next(m for m in listed if isinstance(m, dict) and m.get("id") == self.model)
        return self.info

    @property
    def max_model_len(self) -> int | None:
        value = self.model_info().get("max_model_len")
        return int(value) if isinstance(value, int) and value > 0 else None

    def tokenize(self, text: str, *, add_special_tokens: bool = True) -> list[int]:
        answer = self._request(
            "/tokenize", {"model": self.model, "prompt": text, "add_special_tokens": add_special_tokens}
        )
        return [int(t) for t in answer["tokens"]]

    def detokenize(self, ids: Sequence[int]) -> str:
        return str(self._request("/detokenize", {"model": self.model, "tokens": list(ids)})["prompt"])

    def check(self, tokenizer: Any, *, texts: Sequence[str] = (), max_length: int = 0, k: int = 0) -> None:
        """Pre-flight: the server lists the model, reads rows of ``max_length`` tokens, gives ``k``
        log-probabilities a position, and tokenises as ``tokenizer`` (the student's) does: the same ids for
        the probe texts and ``texts``, and the same text for the student's last token id.

        Raises:
            ModelLoadError (server, model) or ConfigError (tokenizer, length) naming what differs.
        """
        self.model_info()
        limit = self.max_model_len
        if limit is not None and max_length > limit:
            raise ConfigError(
                f"{self.what} reads at most {limit} tokens of model '{self.model}', but the student's rows "
                f"are {max_length} long. Lower the dataset's max_length."
            )
        if k:
            try:
                self.topk([self.tokenize(PROBE_TEXTS[0])[:4]], k)
            except (ModelLoadError, ValueError) as exc:
                if isinstance(exc, ServerUnavailable):
                    raise
                raise ConfigError(
                    f"{self.what} does not give the top {k} log-probabilities a position needs ({exc}). "
                    f"Start vLLM with --max-logprobs {k} or more."
                ) from None
        for text in (*PROBE_TEXTS, *texts):
            for special in (True, False):
                theirs = self.tokenize(text, add_special_tokens=special)
                ours = list(tokenizer(text, add_special_tokens=special)["input_ids"])
                if theirs != ours:
                    at = next((i for i, (a, b) in enumerate(zip(theirs, ours, strict=False)) if a != b), None)
                    at = min(len(theirs), len(ours)) if at is None else at
                    raise ConfigError(
                        f"{self.what} tokenises differently from the student: model '{self.model}' gives "
                        f"{len(theirs)} tokens where the student's tokenizer gives {len(ours)}, first "
                        f"differing at token {at} of a probe text. A served teacher must share the "
                        "student's tokenizer."
                    )
        last = len(tokenizer) - 1
        try:
            theirs_text = self.detokenize([last])
        except ModelLoadError as exc:
            raise ConfigError(
                f"{self.what}: model '{self.model}' has no token {last}, the student's last one: its "
                "vocabulary is smaller than the student's. A served teacher must share the student's "
                "tokenizer."
            ) from exc
        if theirs_text != tokenizer.decode([last]):
            raise ConfigError(
                f"{self.what}: model '{self.model}' decodes token {last} differently from the student's "
                "tokenizer. A served teacher must share the student's tokenizer."
            )

    # -- top-k of every position --
    def topk(
        self, rows: Sequence[Sequence[int]], k: int, *, on_done: Callable[[int], None] | None = None
    ) -> list[dict[str, Tensor]]:
        """Per row (token ids, at least one), the top-k of every predicted position (0 .. len − 2) as
        :func:`.teachers._lm_topk_batch` stores them: ``logprobs`` (n, k) float16, ``indices`` (n, k) int32,
        ``tail_logmass`` (n,) float16, ``target_logprob`` (n,) float32. ``on_done(rows)`` after each request.
        """
        out: list[dict[str, Tensor] | None] = [None] * len(rows)
        asked = []
        for i, row in enumerate(rows):
            if len(row) < 2:  # nothing is predicted: nothing to ask
                out[i] = parse_prompt_logprobs([None] * len(row), row, k)
            else:
                asked.append(i)
        # At most rows_per_request prompts a request, spread over the concurrent requests (a batch of 8 rows
        # is 4 requests of 2 at concurrency 4, not one of 8).
        size = max(1, min(self.rows_per_request, -(-len(asked) // self.concurrency)))
        groups = [asked[i : i + size] for i in range(0, len(asked), size)]

        def one(group: list[int]) -> None:
            prompts = [[int(t) for t in rows[i]] for i in group]
            body = {"model": self.model, "prompt": prompts, "max_tokens": 1, "temperature": 0.0,
                    "prompt_logprobs": k}
            with self.stats.request(sum(len(p) for p in prompts)):
                answer = self._request("/v1/completions", body)
            for choice in _choices(answer, len(prompts), self.what):
                i = group[choice["index"]]
                out[i] = parse_prompt_logprobs(choice.get("prompt_logprobs"), prompts[choice["index"]], k)
            if on_done is not None:
                on_done(len(group))

        self._map(one, groups)
        return out  # type: ignore[return-value]

    def generate(
        self,
        prompts: Sequence[Sequence[int]],
        *,
        max_new_tokens: int,
        temperature: float,
        seed: int,
        eos_id: int | None,
        on_done: Callable[[int], None] | None = None,
    ) -> list[list[int]]:
        """Continuations of token-id ``prompts`` (greedy at ``temperature`` 0, else sampled over the whole
        vocabulary with a seed per prompt), each up to and including the first EOS."""
        out: list[list[int] | None] = [None] * len(prompts)

        def one(i: int) -> None:
            prompt = [int(t) for t in prompts[i]]
            body: dict[str, Any] = {
                "model": self.model,
                "prompt": prompt,
                "max_tokens": max_new_tokens,
                "temperature": float(temperature),
                "top_p": 1.0,
                "top_k": -1,
                "return_token_ids": True,
                "ignore_eos": eos_id is None,
            }
            if temperature > 0:
                body["seed"] = (int(seed) + i) % 2**31
            with self.stats.request(len(prompt)) as counted:
                answer = self._request("/v1/completions", body)
                tokens = completion_tokens(_choices(answer, 1, self.what)[0], self.what)
                counted.append(len(tokens))
            if eos_id is not None and eos_id in tokens:
                tokens = tokens[: tokens.index(eos_id) + 1]
            out[i] = tokens
            if on_done is not None:
                on_done(1)

        self._map(one, list(range(len(prompts))))
        return out  # type: ignore[return-value]

    def _map(self, fn: Callable[[Any], None], items: list[Any]) -> None:
        if self.concurrency == 1 or len(items) <= 1:
            for item in items:
                fn(item)
            return
        with ThreadPoolExecutor(self.concurrency, thread_name_prefix="served-teacher") as pool:
            for future in [pool.submit(fn, item) for item in items]:
                future.result()


# --- parsing answers (pure) ---------------------------------------------------------------------------------


def _error_detail(exc: urllib.error.HTTPError) -> str:
    """The server's own error message (vLLM: ``{"error": {"message": ...}}``), shortened."""
    try:
        body = json.loads(exc.read() or b"{}")
    except (ValueError, OSError):
        return ""
    error = body.get("error", body) if isinstance(body, dict) else body
    message = error.get("message") if isinstance(error, dict) else error
    return f": {str(message)[:300]}" if message else ""


def _choices(answer: Any, n: int, what: str) -> list[dict[str, Any]]:
    choices = answer.get("choices") if isinstance(answer, dict) else None
    if not isinstance(choices, list) or len(choices) != n:
        got = len(choices) if isinstance(choices, list) else 0
        raise ModelLoadError(f"{what} answered a completion with {got} choices for {n} prompts.")
    indices = sorted(c.get("index", -1) for c in choices)
    if indices != list(range(n)):
        raise ModelLoadError(f"{what} answered a completion with choices that do not match its prompts.")
    return choices


def completion_tokens(choice: Mapping[str, Any], what: str) -> list[int]:
    """The generated token ids of a completion choice (vLLM: ``token_ids`` with ``return_token_ids``)."""
    ids = choice.get("token_ids")
    if not isinstance(ids, list):
        raise ModelLoadError(
            f"{what} gave no token ids with its completion: it must support return_token_ids (vLLM)."
        )
    return [int(t) for t in ids]


def parse_prompt_logprobs(
    positions: Sequence[Mapping[str, Any] | None] | None, prompt: Sequence[int], k: int
) -> dict[str, Tensor]:
    """One prompt's ``prompt_logprobs`` (one entry per prompt token, the first None: per token id, its
    ``logprob`` and ``rank``; the top ``k`` and the prompt's own token) as the records of one row.

    Predicted position ``j`` (0 .. len − 2) is entry ``j + 1``: the distribution of token ``j + 1`` given
    the tokens before it. Its top-k are the k entries of lowest rank (highest log-probability first), the
    target is the prompt's token ``j + 1``, the tail ``log(1 − Σ exp(top-k))`` clamped at 1e-12.

    Raises:
        ValueError: the answer does not hold k entries and the target at every position.
    """
    import torch

    n = max(len(prompt) - 1, 0)
    if positions is None or len(positions) != len(prompt):
        raise ValueError(
            f"prompt_logprobs has {len(positions or [])} entries for a prompt of {len(prompt)} tokens"
        )
    logprobs = torch.empty(n, k, dtype=torch.float64)
    indices = torch.empty(n, k, dtype=torch.int64)
    target = torch.empty(n, dtype=torch.float64)
    for j in range(n):
        entry = positions[j + 1]
        if not entry:
            raise ValueError(f"prompt_logprobs has no entry for position {j + 1}")
        items = sorted(
            ((int(tid), float(v["logprob"]), int(v.get("rank") or 0)) for tid, v in entry.items()),
            key=lambda t: (t[2], -t[1], t[0]),
        )
        if len(items) < k:
            raise ValueError(f"prompt_logprobs has {len(items)} tokens at position {j + 1}, fewer than k={k}")
        chosen = items[:k]
        # Highest first, as torch.topk orders them (equal ranks may come in either order).
        chosen.sort(key=lambda t: -t[1])
        indices[j] = torch.as_tensor([t[0] for t in chosen])
        logprobs[j] = torch.as_tensor([t[1] for t in chosen])
        key = str(int(prompt[j + 1]))
        if key not in entry:
            raise ValueError(f"prompt_logprobs lacks the prompt's own token at position {j + 1}")
        target[j] = float(entry[key]["logprob"])
    kept = torch.logsumexp(logprobs, dim=-1)
    tail = torch.log((-torch.expm1(kept.clamp_max(0.0))).clamp_min(_MIN_TAIL))
    return {
        "logprobs": logprobs.float().half(),
        "indices": indices.int(),
        "tail_logmass": tail.float().half(),
        "target_logprob": target.float(),
    }

