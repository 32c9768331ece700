"""The reward-function protocol: how a sequence-level score is obtained when it does not come from a
trained reward model.

- **rule**: a Python function named `'module:function'`, called as
  `fn(prompts: list[str], responses: list[str], **fields) -> list[float]`;
- **http**: a remote scorer that takes `POST {"prompts": [...], "responses": [...], "fields": {...}}` (JSON)
  and answers `{"scores": [float, ...]}`, one score per response, in order.

**Fields** are the prompt record's other columns (all but `data.prompt_field`, e.g. a verifiable task's
`answer`), each a list aligned with the responses, as TRL's `GRPOTrainer` passes dataset columns. They
travel with the rollout (batch meta `FIELDS_META`, one dict per row). A rule function receives the fields
it names as parameters, or all of them if it takes `**kwargs`; one that takes only `(prompts, responses)`
gets none, so old functions keep working. A named parameter without a default that the data lacks is a
`RewardError` naming it. The HTTP request always carries `"fields"` (`{}` when there are none); old
scorers ignore it. See docs/REWARDS.md.

Both paths go through `check_scores`, so a NaN, an infinity, a string or a wrong count fails here, naming
the source and the bad index, instead of poisoning the advantages. Returned content is only parsed as
JSON, never evaluated. `serve_rule_function` turns any rule function into such a scorer (stdlib only),
for tests and for users who want their scorer in another process.
"""

from __future__ import annotations

import importlib
import inspect
import json
import math
import numbers
import threading
import time
from collections.abc import Callable, Sequence
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

import requests

RuleFunction = Callable[..., Sequence[float]]
FIELDS_META = "fields"  # the batch meta key that holds each row's prompt-record fields (a dict per row)


class RewardError(RuntimeError):
    """Scores could not be obtained or are unusable; the message names the source and the fix."""


# ---- validation ---------------------------------------------------------------------------------------
def check_scores(scores: Any, n: int, source: str) -> list[float]:
    """`scores` as a list of `n` finite floats, or a `RewardError` naming `source` and the bad entry.
    Accepts lists, tuples, numpy arrays and 1-d tensors of numbers; rejects booleans and strings."""
    if hasattr(scores, "tolist") and not isinstance(scores, list | tuple):
        scores = scores.tolist()  # numpy array / torch tensor
    if isinstance(scores, str | bytes | dict) or not isinstance(scores, Sequence):
        raise RewardError(
            f"reward from {source}: expected a list of {n} numbers, got {type(scores).__name__} "
            f"{_preview(scores)}"
        )
    if len(scores) != n:
        raise RewardError(
            f"reward from {source}: got {len(scores)} scores for {n} responses; it must return exactly one "
            "score per response, in order"
        )
    out: list[float] = []
    for i, value in enumerate(scores):
        if isinstance(value, bool) or not isinstance(value, numbers.Real):
            raise RewardError(
                f"reward from {source}: score {i} is {_preview(value)} ({type(value).__name__}), not a number"
            )
        value = float(value)
        if not math.isfinite(value):
            raise RewardError(
                f"reward from {source}: score {i} is {value}; scores must be finite (make the scorer return "
                "a finite number, e.g. 0.0 or a floor, for responses it cannot score)"
            )
        out.append(value)
    return out


def _preview(value: Any, limit: int = 120) -> str:
    text = repr(value)
    return text if len(text) <= limit else text[:limit] + "...'"


# ---- rule functions -----------------------------------------------------------------------------------
def load_rule_function(spec: str) -> RuleFunction:
    """The callable named by `'package.module:function'` (the attribute may be dotted: `'mod:Class.method'`).
    Imports only that module; errors say whether the module, the attribute or its type is wrong."""
    if not isinstance(spec, str) or spec.count(":") != 1 or not all(p.strip() for p in spec.split(":")):
        raise RewardError(
            f"reward.function={spec!r}: expected 'module:function', e.g. "
            "'rlhf_ray.data.synthetic:gold_reward'"
        )
    module_name, attr_path = (p.strip() for p in spec.split(":"))
    try:
        module = importlib.import_module(module_name)
    except ModuleNotFoundError as exc:
        if exc.name is not None and (module_name == exc.name or module_name.startswith(exc.name + ".")):
            raise RewardError(
                f"reward.function={spec!r}: module {module_name!r} was not found; make it importable from "
                "the actor (install it, add its directory to PYTHONPATH, or ship it with the Ray job's "
                "working_dir/py_modules)"
            ) from exc
        raise RewardError(
            f"reward.function={spec!r}: importing module {module_name!r} failed because it imports "
            f"{exc.name!r}, which is not installed ({exc})"
        ) from exc
    except Exception as exc:
        raise RewardError(
            f"reward.function={spec!r}: importing module {module_name!r} raised {type(exc).__name__}: {exc}"
        ) from exc
    obj: Any = module
    for part in attr_path.split("."):
        if not hasattr(obj, part):
            public = sorted(
                n
                for n, v in vars(module).items()
                if not n.startswith("_") and callable(v) and getattr(v, "__module__", None) == module.__name__
            )
            raise RewardError(
                f"reward.function={spec!r}: module {module_name!r} has no attribute {attr_path!r}; its "
                f"callables are: {', '.join(public[:20]) or '(none)'}"
            )
        obj = getattr(obj, part)
    if not callable(obj):
        raise RewardError(
            f"reward.function={spec!r}: {attr_path!r} is a {type(obj).__name__}, not a function; it must be "
            "callable as fn(prompts: list[str], responses: list[str], **fields) -> list[float]"
        )
    return obj


def fields_of(meta: dict[str, list[Any]]) -> dict[str, list[Any]]:
    """The prompt-record fields of a batch's rows as columns, `{name: [value per row]}` (empty when the
    batch carries none). A row without a field that another row has gets None there."""
    rows = meta.get(FIELDS_META) or []
    names = list(dict.fromkeys(name for row in rows for name in row))
    return {name: [row.get(name) for row in rows] for name in names}


def fields_for(fn: RuleFunction, fields: dict[str, list[Any]], source: str) -> dict[str, list[Any]]:
    """The fields `fn` takes: all of them if it has `**kwargs`, else those it names as parameters after
    its first two (prompts, responses); none if its signature cannot be read. A parameter without a
    default that `fields` lacks is a `RewardError` naming it and the fields there are."""
    try:
        params = list(inspect.signature(fn).parameters.values())
    except (TypeError, ValueError):
        return {}
    positional = [p for p in params if p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD)]
    if any(p.kind is p.VAR_KEYWORD for p in params):  # not a field named like its first two parameters
        return {k: v for k, v in fields.items() if k not in {p.name for p in positional[:2]}}
    named = [p for p in positional[2:] if p.kind is p.POSITIONAL_OR_KEYWORD]
    named += [p for p in params if p.kind is p.KEYWORD_ONLY]
    missing = [p.name for p in named if p.name not in fields and p.default is p.empty]
    if missing:
        raise RewardError(
            f"reward from {source}: the rule function needs the field {missing[0]!r}, but the prompt records "
            f"have {', '.join(map(repr, fields)) or 'no fields besides the prompt'}; add {missing[0]!r} to "
            "every record of data.train_path and data.eval_path, or give the parameter a default"
        )
    return {p.name: fields[p.name] for p in named if p.name in fields}


def score_with_rule(
    fn: RuleFunction,
    prompts: list[str],
    responses: list[str],
    source: str,
    fields: dict[str, list[Any]] | None = None,
) -> list[float]:
    """Call a rule function with the record `fields` it takes (`fields_for`) and validate its output; an
    exception inside it becomes a `RewardError`."""
    for name, values in (fields or {}).items():
        if len(values) != len(responses):
            raise ValueError(f"field {name!r} has {len(values)} values for {len(responses)} responses")
    kwargs = fields_for(fn, fields or {}, source)
    try:
        scores = fn(list(prompts), list(responses), **kwargs)
    except Exception as exc:
        raise RewardError(
            f"reward from {source}: the rule function raised {type(exc).__name__}: {exc}"
        ) from exc
    return check_scores(scores, len(responses), source)


# ---- remote scorer ------------------------------------------------------------------------------------
class RemoteScorer:
    """Client of an HTTP scorer (protocol in the module docstring). Connection failures and 5xx/429
    answers are retried `retries` times with exponential backoff; a timeout, a 4xx answer or a malformed
    body fails at once with a `RewardError` that names the URL and what to fix."""

    def __init__(self, url: str, timeout_s: float = 30.0, retries: int = 2, backoff_s: float = 0.25):
        if not isinstance(url, str) or not url.startswith(("http://", "https://")):
            raise RewardError(f"reward.url={url!r}: expected an http:// or https:// URL of the scorer")
        self.url, self.timeout_s, self.retries, self.backoff_s = (
            url,
            float(timeout_s),
            int(retries),
            backoff_s,
        )
        self._session = requests.Session()

    def __call__(
        self, prompts: list[str], responses: list[str], fields: dict[str, list[Any]] | None = None
    ) -> list[float]:
        return self.score(prompts, responses, fields)

    def score(
        self, prompts: list[str], responses: list[str], fields: dict[str, list[Any]] | None = None
    ) -> list[float]:
        """Scores of `responses`; `fields` (record columns aligned with them) go in the request's
        `"fields"` object. A field that JSON cannot carry is a `RewardError` naming it."""
        if len(prompts) != len(responses):
            raise ValueError(f"RemoteScorer: {len(prompts)} prompts but {len(responses)} responses")
        fields = {name: list(values) for name, values in (fields or {}).items()}
        for name, values in fields.items():
            if len(values) != len(responses):
                raise ValueError(
                    f"RemoteScorer: field {name!r} has {len(values)} values for {len(responses)}"
                )
            try:
                json.dumps(values)
            except (TypeError, ValueError) as exc:
                raise RewardError(
                    f"reward scorer {self.url}: the prompt records' field {name!r} cannot be sent as JSON "
                    f"({exc}); store it in the data as a string, number, list or object"
                ) from exc
        payload = {"prompts": list(prompts), "responses": list(responses), "fields": fields}
        body = self._post(payload)
        if not isinstance(body, dict) or "scores" not in body:
            raise RewardError(
                f"reward scorer {self.url}: the answer must be a JSON object with a 'scores' list, got "
                f"{_preview(body)}"
            )
        return check_scores(body["scores"], len(responses), f"scorer {self.url}")

    def _post(self, payload: dict) -> Any:
        last = ""
        for attempt in range(self.retries + 1):
            if attempt:
                time.sleep(self.backoff_s * 2 ** (attempt - 1))
            try:
                resp = self._session.post(self.url, json=payload, timeout=self.timeout_s)
            except requests.Timeout as exc:
                raise RewardError(
                    f"reward scorer {self.url} did not answer within reward.timeout_s={self.timeout_s:g} s "
                    f"({type(exc).__name__}); make the scorer faster, send fewer prompts per step, or raise "
                    "reward.timeout_s"
                ) from exc
            except requests.ConnectionError as exc:
                last = f"cannot connect ({type(exc).__name__})"
                continue
            except requests.RequestException as exc:
                raise RewardError(f"reward scorer {self.url}: request failed: {exc}") from exc
            if resp.status_code >= 500 or resp.status_code == 429:
                last = f"HTTP {resp.status_code}: {resp.text[:200]!r}"
                continue
            if resp.status_code >= 400:
                raise RewardError(
                    f"reward scorer {self.url} rejected the request with HTTP {resp.status_code}: "
                    f"{resp.text[:300]!r}; it must accept POST {{'prompts': [...], 'responses': [...]}}"
                )
            try:
                return resp.json()
            except ValueError as exc:
                raise RewardError(
                    f"reward scorer {self.url} answered with something that is not JSON: {resp.text[:200]!r}; "
                    "it must answer {'scores': [float, ...]}"
                ) from exc
        raise RewardError(
            f"reward scorer {self.url} is unavailable after {self.retries + 1} attempts ({last}); start the "
            "scorer or fix reward.url"
        )

    def close(self) -> None:
        self._session.close()


# ---- a minimal scorer server --------------------------------------------------------------------------
def serve_rule_function(
    fn: RuleFunction, host: str = "127.0.0.1", port: int = 0
) -> tuple[ThreadingHTTPServer, str]:
    """Serve `fn` with the scorer protocol from a daemon thread. Returns the server (stop it with
    `server.shutdown(); server.server_close()`) and its URL. Binds 127.0.0.1 unless told otherwise."""

    class Handler(BaseHTTPRequestHandler):
        def do_POST(self) -> None:
            try:
                length = int(self.headers.get("Content-Length") or 0)
                request = json.loads(self.rfile.read(length) or b"null")
                prompts, responses = request["prompts"], request["responses"]
                if not (
                    isinstance(prompts, list)
                    and isinstance(responses, list)
                    and len(prompts) == len(responses)
                ):
                    raise ValueError("'prompts' and 'responses' must be lists of equal length")
                if not all(isinstance(x, str) for x in prompts + responses):
                    raise ValueError("'prompts' and 'responses' must hold strings")
                fields = request.get("fields") or {}  # absent from the requests of older clients
                if not isinstance(fields, dict) or not all(
                    isinstance(v, list) and len(v) == len(responses) for v in fields.values()
                ):
                    raise ValueError("'fields' must map names to lists as long as 'responses'")
            except (ValueError, KeyError, TypeError) as exc:
                self._answer(400, {"error": f"bad request: {exc}"})
                return
            try:
                scores = score_with_rule(fn, prompts, responses, "the served rule function", fields)
            except Exception as exc:
                self._answer(500, {"error": f"{type(exc).__name__}: {exc}"})
                return
            self._answer(200, {"scores": scores})

        def _answer(self, status: int, body: dict) -> None:
            data = json.dumps(body).encode()
            self.send_response(status)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            self.wfile.write(data)

        def log_message(self, format: str, *args: Any) -> None:  # quiet
            pass

    server = ThreadingHTTPServer((host, port), Handler)
    server.daemon_threads = True
    threading.Thread(target=server.serve_forever, args=(0.1,), name="reward-scorer", daemon=True).start()
    bound_host, bound_port = server.server_address[:2]
    return server, f"http://{bound_host}:{bound_port}/score"
