"""Rewards that see the answer: each prompt record's other fields reach the reward function as keyword
arguments (lists aligned with the responses), through the prompt stream, the reward actor, the evaluation
and the HTTP scorer; functions that take only (prompts, responses) keep working. Fast, no Ray: the reward
actor's class runs in this process (`RewardModel.__ray_actor_class__`, its own code, not a stand-in)."""

from __future__ import annotations

import json

import pytest
import requests
import torch

from actors.glue import eval_scores
from actors.reward import RewardModel
from rlhf_ray.batch import Batch
from rlhf_ray.config import RLHFConfig
from rlhf_ray.data import PromptSource
from rlhf_ray.data.prompts import record_fields
from rlhf_ray.rewards import (
    FIELDS_META,
    RemoteScorer,
    RewardError,
    fields_for,
    fields_of,
    score_with_rule,
    serve_rule_function,
)
from rlhf_ray.rewards_builtin import arithmetic_reward, concise_reward
from tests.http_scorer import ScorerServer

PROMPTS = ["2 + 3 =", "10 - 4 =", "3 x 3 ="]
RESPONSES = ["5", "The answer is 7.", "9."]
FIELDS = {"answer": [5, 6, 9], "kind": ["add", "sub", "mul"]}


def rows_batch(prompts: list[str], responses: list[str], fields: dict[str, list] | None) -> Batch:
    """A batch as an engine returns it: texts and, when given, one fields dict per row in the meta."""
    meta: dict[str, list] = {"prompt": list(prompts), "response": list(responses)}
    if fields is not None:
        meta[FIELDS_META] = [dict(zip(fields, values)) for values in zip(*fields.values())]
    n = len(responses)
    return Batch({"response_mask": torch.ones(n, 2)}, meta)


# ---- which fields a rule function gets -----------------------------------------------------------------
def test_named_parameters_get_their_fields_aligned_with_the_responses():
    seen = {}

    def rule(prompts, responses, answer):
        seen["answer"] = answer
        return [float(r.rstrip(".").split()[-1] == str(a)) for r, a in zip(responses, answer)]

    assert score_with_rule(rule, PROMPTS, RESPONSES, "rule", FIELDS) == [1.0, 0.0, 1.0]
    assert seen["answer"] == [5, 6, 9]  # only the field it names, in row order


def test_kwargs_get_every_field_and_old_functions_get_none():
    got = {}

    def takes_all(prompts, responses, **kwargs):
        got.update(kwargs)
        return [0.0] * len(responses)

    score_with_rule(takes_all, PROMPTS, RESPONSES, "rule", FIELDS)
    assert got == FIELDS
    # an old-style function: two parameters, called as before (fields or not)
    assert score_with_rule(concise_reward, PROMPTS, RESPONSES, "old", FIELDS) == concise_reward(
        PROMPTS, RESPONSES
    )
    assert score_with_rule(lambda p, r: [1.0] * len(r), PROMPTS, RESPONSES, "old", FIELDS) == [1.0] * 3
    # a keyword-only parameter with a default: given when the data has it, else the default
    assert fields_for(lambda p, r, *, kind=None: [], FIELDS, "s") == {"kind": FIELDS["kind"]}
    assert fields_for(lambda p, r, *, level=None: [], FIELDS, "s") == {}
    # a field named like the function's own first parameters is not passed through **kwargs
    assert fields_for(lambda prompts, responses, **kw: [], {"prompts": [1], "x": [2]}, "s") == {"x": [2]}
    assert fields_for(len, FIELDS, "s") == {}  # no readable signature: nothing extra


def test_a_required_field_the_data_lacks_is_named():
    with pytest.raises(RewardError, match="needs the field 'answer'.*have 'kind'.*data.train_path"):
        score_with_rule(arithmetic_reward, PROMPTS, RESPONSES, "arith", {"kind": FIELDS["kind"]})
    with pytest.raises(RewardError, match="needs the field 'answer'.*no fields besides the prompt"):
        score_with_rule(arithmetic_reward, PROMPTS, RESPONSES, "arith", None)
    with pytest.raises(ValueError, match="field 'answer' has 2 values for 3 responses"):
        score_with_rule(arithmetic_reward, PROMPTS, RESPONSES, "arith", {"answer": [1, 2]})


def test_fields_of_turns_rows_into_columns():
    batch = rows_batch(PROMPTS, RESPONSES, FIELDS)
    assert fields_of(batch.meta) == FIELDS
    assert fields_of({"prompt": PROMPTS}) == {}
    assert fields_of({FIELDS_META: [{"a": 1}, {"b": 2}]}) == {"a": [1, None], "b": [None, 2]}
    # a slice of the batch (a reward actor of a group scores one) keeps its rows' fields
    assert fields_of(batch.select([2, 0]).meta) == {"answer": [9, 5], "kind": ["mul", "add"]}


# ---- the prompt stream keeps each prompt's record -----------------------------------------------------
def test_prompt_source_keeps_each_prompts_fields(tmp_path):
    from rlhf_ray.config import DataConfig
    from rlhf_ray.models import build_word_tokenizer

    tok = build_word_tokenizer([str(i) for i in range(20)] + ["+", "=", "long"])
    records = [{"prompt": f"{i} + {i} =", "answer": 2 * i, "id": i} for i in range(6)]
    records[2]["prompt"] = " ".join(["long"] * 40)  # skipped for its length: its fields go with it
    src = PromptSource(records, tok, DataConfig(max_prompt_len=8), seed=3)
    assert len(src) == 5 and src.num_skipped == 1
    drawn = src.next_records(12)  # crosses into epoch 2
    for text, ids, fields in drawn:
        i = int(text.split()[0])
        assert fields == {"answer": 2 * i, "id": i} and ids == tok(text)["input_ids"]
    # the same order as `next`, which it shares the position with
    again = PromptSource(records, tok, DataConfig(max_prompt_len=8), seed=3)
    assert [(t, i) for t, i, _ in drawn] == again.next(12)
    assert record_fields(records, "prompt")[0] == {"answer": 0, "id": 0}


# ---- the reward actor and the evaluation --------------------------------------------------------------
def reward_actor(**reward) -> object:
    cfg = RLHFConfig.from_dict(
        {"reward": reward, "placement": {"reward": {"num_threads": torch.get_num_threads()}}}
    )
    return RewardModel.__ray_actor_class__(cfg)


def test_rule_reward_actor_passes_the_fields():
    actor = reward_actor(kind="rule", function="rlhf_ray.rewards_builtin:arithmetic_reward")
    scores = actor.score(rows_batch(PROMPTS, RESPONSES, FIELDS))["scores"]
    assert scores.tolist() == [1.0, 0.0, 1.0]
    # an old-style function on a batch with fields, and a batch without any
    old = reward_actor(kind="rule", function="rlhf_ray.rewards_builtin:concise_reward")
    expected = concise_reward(PROMPTS, RESPONSES)
    assert old.score(rows_batch(PROMPTS, RESPONSES, FIELDS))["scores"].tolist() == pytest.approx(expected)
    assert old.score(rows_batch(PROMPTS, RESPONSES, None))["scores"].tolist() == pytest.approx(expected)


def test_eval_function_sees_the_fields():
    batch = rows_batch(PROMPTS, RESPONSES, FIELDS)
    scores = Batch({"scores": torch.tensor([0.5, 0.5, 0.5])})
    out = eval_scores("rlhf_ray.rewards_builtin:arithmetic_reward", batch, scores)
    assert out["eval/gold"] == pytest.approx(2 / 3)


# ---- the HTTP scorer ------------------------------------------------------------------------------------
def test_http_request_carries_the_fields():
    requests_seen = []

    def respond(request, attempt):
        requests_seen.append(request)
        return 200, json.dumps({"scores": [1.0] * len(request["responses"])}).encode()

    with ScorerServer(respond) as server:
        actor = reward_actor(kind="http", url=server.url)
        actor.score(rows_batch(PROMPTS, RESPONSES, FIELDS))
        actor.score(rows_batch(PROMPTS, RESPONSES, None))
    assert requests_seen[0] == {"prompts": PROMPTS, "responses": RESPONSES, "fields": FIELDS}
    assert requests_seen[1] == {"prompts": PROMPTS, "responses": RESPONSES, "fields": {}}


def test_served_rule_function_reads_fields_and_old_requests_still_work():
    server, url = serve_rule_function(arithmetic_reward)
    old_server, old_url = serve_rule_function(concise_reward)
    try:
        assert RemoteScorer(url)(PROMPTS, RESPONSES, FIELDS) == [1.0, 0.0, 1.0]
        # a request without "fields" (an older client) to a function that does not need them
        plain = requests.post(old_url, json={"prompts": PROMPTS, "responses": RESPONSES}, timeout=5)
        assert plain.status_code == 200
        assert plain.json()["scores"] == pytest.approx(concise_reward(PROMPTS, RESPONSES))
        # ... and to one that needs the answer: the error names the field
        with pytest.raises(RewardError, match="HTTP 500|unavailable"):
            RemoteScorer(url, retries=0)(PROMPTS, RESPONSES)
        missing = requests.post(url, json={"prompts": PROMPTS, "responses": RESPONSES}, timeout=5)
        assert missing.status_code == 500 and "needs the field 'answer'" in missing.json()["error"]
        bad = requests.post(url, json={"prompts": PROMPTS, "responses": RESPONSES, "fields": {"answer": [1]}})
        assert bad.status_code == 400 and "'fields'" in bad.json()["error"]
    finally:
        for s in (server, old_server):
            s.shutdown()
            s.server_close()


def test_a_field_json_cannot_carry_is_named():
    with pytest.raises(RewardError, match="field 'when' cannot be sent as JSON"):
        RemoteScorer("http://127.0.0.1:9/score")(["p"], ["r"], {"when": [object()]})
