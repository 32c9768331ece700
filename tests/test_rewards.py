"""The reward protocol: rule-function loading, score validation, and the HTTP scorer against real local
servers (good, down, garbage, slow, flaky), all on 127.0.0.1."""

import json
import math
import socket
import time

import numpy as np
import pytest
import torch

from rlhf_ray.data.synthetic import gold_reward
from rlhf_ray.rewards import (
    RemoteScorer,
    RewardError,
    check_scores,
    load_rule_function,
    score_with_rule,
    serve_rule_function,
)
from tests.http_scorer import ScorerServer

PROMPTS = ["sort: 3 1 2 =", "sort: 5 4 =", "sort: 9 9 0 ="]
RESPONSES = ["1 2 3", "4", "0 9 9 9"]


# ---- rule functions -------------------------------------------------------------------------------
def test_load_rule_function_finds_the_function():
    fn = load_rule_function("rlhf_ray.data.synthetic:gold_reward")
    assert fn is gold_reward
    assert fn(PROMPTS, RESPONSES) == gold_reward(PROMPTS, RESPONSES)


@pytest.mark.parametrize(
    "spec, match",
    [
        ("rlhf_ray.data.synthetic.gold_reward", "expected 'module:function'"),
        ("a:b:c", "expected 'module:function'"),
        (":gold_reward", "expected 'module:function'"),
        ("no_such_module_xyz:fn", "module 'no_such_module_xyz' was not found"),
        ("rlhf_ray.no_such_submodule:fn", "module 'rlhf_ray.no_such_submodule' was not found"),
        ("rlhf_ray.data.synthetic:no_such_fn", "has no attribute 'no_such_fn'.*gold_reward"),
        ("rlhf_ray.data.synthetic:VOCAB", "is a list, not a function"),
    ],
)
def test_load_rule_function_errors(spec, match):
    with pytest.raises(RewardError, match=match):
        load_rule_function(spec)


def test_load_rule_function_module_with_broken_imports(tmp_path, monkeypatch):
    (tmp_path / "my_broken_reward.py").write_text("import not_installed_dep_xyz\ndef fn(p, r): return []\n")
    (tmp_path / "my_raising_reward.py").write_text("raise RuntimeError('boom at import')\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    with pytest.raises(RewardError, match="imports 'not_installed_dep_xyz', which is not installed"):
        load_rule_function("my_broken_reward:fn")
    with pytest.raises(RewardError, match="raised RuntimeError: boom at import"):
        load_rule_function("my_raising_reward:fn")


def test_score_with_rule_wraps_errors():
    def bad(prompts, responses):
        raise ZeroDivisionError("oops")

    with pytest.raises(RewardError, match="my rule: the rule function raised ZeroDivisionError: oops"):
        score_with_rule(bad, PROMPTS, RESPONSES, "my rule")
    with pytest.raises(RewardError, match="got 2 scores for 3 responses"):
        score_with_rule(lambda p, r: [1.0, 2.0], PROMPTS, RESPONSES, "short rule")


# ---- check_scores ---------------------------------------------------------------------------------
def test_check_scores_accepts_numbers():
    assert check_scores([1, 2.5, np.float32(0.5)], 3, "s") == [1.0, 2.5, 0.5]
    assert check_scores(np.array([0.0, -1.0]), 2, "s") == [0.0, -1.0]
    assert check_scores(torch.tensor([3.0]), 1, "s") == [3.0]
    assert check_scores((), 0, "s") == []


@pytest.mark.parametrize(
    "scores, match",
    [
        ([1.0, math.nan, 0.0], "from src: score 1 is nan"),
        ([1.0, 0.0, -math.inf], "from src: score 2 is -inf"),
        ([1.0, 2.0], "from src: got 2 scores for 3 responses"),
        ([1.0, "2.0", 0.0], r"from src: score 1 is '2.0' \(str\), not a number"),
        ([1.0, None, 0.0], r"score 1 is None \(NoneType\)"),
        ([True, 1.0, 0.0], r"score 0 is True \(bool\)"),
        ("1 2 3", "expected a list of 3 numbers, got str"),
        ({"scores": [1, 2, 3]}, "expected a list of 3 numbers, got dict"),
        (None, "expected a list of 3 numbers, got NoneType"),
    ],
)
def test_check_scores_rejects(scores, match):
    with pytest.raises(RewardError, match=match):
        check_scores(scores, 3, "src")


# ---- the HTTP scorer ------------------------------------------------------------------------------
def test_remote_scorer_against_served_rule_function():
    server, url = serve_rule_function(gold_reward)
    try:
        assert url.startswith("http://127.0.0.1:")
        scorer = RemoteScorer(url, timeout_s=5, retries=0)
        assert scorer(PROMPTS, RESPONSES) == pytest.approx(gold_reward(PROMPTS, RESPONSES))
        assert scorer([], []) == []
        # a bad request is answered 400 and reported without retrying
        import requests

        r = requests.post(url, json={"prompts": ["a"]}, timeout=5)
        assert r.status_code == 400 and "bad request" in r.json()["error"]
    finally:
        server.shutdown()
        server.server_close()


def test_served_rule_function_rejects_nan_scores():
    server, url = serve_rule_function(lambda p, r: [math.nan] * len(r))
    try:
        with pytest.raises(RewardError, match="unavailable after 1 attempts.*HTTP 500.*score 0 is nan"):
            RemoteScorer(url, timeout_s=5, retries=0)(PROMPTS, RESPONSES)
    finally:
        server.shutdown()
        server.server_close()


def test_remote_scorer_server_down_fails_fast_and_clearly():
    with socket.socket() as s:  # a port nobody listens on
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    url = f"http://127.0.0.1:{port}/score"
    start = time.perf_counter()
    with pytest.raises(
        RewardError, match=rf"{url} is unavailable after 3 attempts \(cannot connect.*start the scorer"
    ):
        RemoteScorer(url, timeout_s=5, retries=2, backoff_s=0.05)(PROMPTS, RESPONSES)
    assert time.perf_counter() - start < 5


@pytest.mark.parametrize(
    "body, match",
    [
        (b"<html>oops</html>", "is not JSON"),
        (b'["not", "an", "object"]', "must be a JSON object with a 'scores' list"),
        (b'{"score": [1, 2, 3]}', "must be a JSON object with a 'scores' list"),
        (b'{"scores": [1, 2]}', "got 2 scores for 3 responses"),
        (b'{"scores": [1, "__import__(\'os\')", 3]}', "score 1 is .* not a number"),
        (b'{"scores": [1, NaN, 3]}', "score 1 is nan"),
        (b'{"scores": "1 2 3"}', "expected a list of 3 numbers, got str"),
    ],
)
def test_remote_scorer_garbage_answers(body, match):
    with ScorerServer(lambda req, attempt: (200, body)) as srv:
        with pytest.raises(RewardError, match=match) as info:
            RemoteScorer(srv.url, timeout_s=5, retries=2)(PROMPTS, RESPONSES)
        assert srv.url in str(info.value)
        assert srv.attempts == 1  # garbage is not retried


def test_remote_scorer_retries_server_errors_then_succeeds():
    def flaky(req, attempt):
        if attempt < 3:
            return 503, b"busy"
        return 200, json.dumps({"scores": [float(len(r)) for r in req["responses"]]}).encode()

    with ScorerServer(flaky) as srv:
        scores = RemoteScorer(srv.url, timeout_s=5, retries=2, backoff_s=0.01)(PROMPTS, RESPONSES)
        assert scores == [float(len(r)) for r in RESPONSES] and srv.attempts == 3
    server_error = r"unavailable after 2 attempts \(HTTP 500: 'internal'\)"
    with (
        ScorerServer(lambda req, attempt: (500, b"internal")) as srv,
        pytest.raises(RewardError, match=server_error),
    ):
        RemoteScorer(srv.url, timeout_s=5, retries=1, backoff_s=0.01)(PROMPTS, RESPONSES)
    with ScorerServer(lambda req, attempt: (404, b"no such route")) as srv:
        with pytest.raises(RewardError, match="rejected the request with HTTP 404"):
            RemoteScorer(srv.url, timeout_s=5, retries=2)(PROMPTS, RESPONSES)
        assert srv.attempts == 1


def test_remote_scorer_slow_server_times_out():
    def slow(req, attempt):
        time.sleep(2.0)
        return 200, json.dumps({"scores": [0.0] * len(req["responses"])}).encode()

    with ScorerServer(slow) as srv:
        start = time.perf_counter()
        with pytest.raises(RewardError, match=r"did not answer within reward.timeout_s=0.3 s"):
            RemoteScorer(srv.url, timeout_s=0.3, retries=2)(PROMPTS, RESPONSES)
        assert time.perf_counter() - start < 1.5


def test_remote_scorer_rejects_bad_url():
    with pytest.raises(RewardError, match="expected an http:// or https:// URL"):
        RemoteScorer("localhost:8000/score")
