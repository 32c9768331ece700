"""The engine-independent part of rollouts: token lists -> right-padded Batch and back (hand-built)."""

import pytest
import torch

from rlhf_ray.rollout_batch import build_rollout_batch, scatter_response_values, split_sequences

PAD, EOS = 0, 2


def test_build_rollout_batch_layout():
    prompts = [[5, 6, 7], [8]]
    responses = [[9, EOS], [10, 11, 12]]  # the first stopped on EOS, the second hit max_new_tokens
    logprobs = [[-0.5, -0.25], [-1.0, -2.0, -3.0]]
    meta = {"prompt_index": [0, 1]}
    b = build_rollout_batch(prompts, responses, logprobs, PAD, meta)

    assert b["input_ids"].tolist() == [[5, 6, 7, 9, EOS], [8, 10, 11, 12, PAD]]
    assert b["input_ids"].dtype == torch.long
    assert b["attention_mask"].tolist() == [[1, 1, 1, 1, 1], [1, 1, 1, 1, 0]]
    assert b["attention_mask"].dtype == torch.long
    assert b["response_mask"].tolist() == [[0, 0, 0, 1, 1], [0, 1, 1, 1, 0]]  # EOS included
    assert b["response_mask"].dtype == torch.float32
    # position t holds the log-prob of token t; 0 on prompt and padding
    assert b["rollout_logprobs"].tolist() == [[0, 0, 0, -0.5, -0.25], [0, -1.0, -2.0, -3.0, 0]]
    assert b["rollout_logprobs"].dtype == torch.float32
    assert b.meta == meta and len(b) == 2


def test_split_sequences_inverts_build():
    prompts = [[5, 6, 7], [8], [3, 4]]
    responses = [[9, EOS], [10, 11, 12], []]
    b = build_rollout_batch(prompts, responses, None, PAD)
    assert "rollout_logprobs" not in b
    assert split_sequences(b) == list(zip(prompts, responses))


def test_scatter_response_values():
    out = scatter_response_values([[1.0, 2.0], [], [3.0]], [1, 0, 2], (3, 4))
    assert out.tolist() == [[0, 1, 2, 0], [0, 0, 0, 0], [0, 0, 3, 0]]


@pytest.mark.parametrize(
    "prompts, responses, logprobs, match",
    [
        ([[1]], [[2], [3]], None, "1 prompts but 2 responses"),
        ([[1]], [[2, 3]], [[-1.0]], "response 0 has 2 tokens but 1 log-probs"),
        ([[]], [[2]], None, "prompt 0 is empty"),
    ],
)
def test_build_rollout_batch_rejects_inconsistent_input(prompts, responses, logprobs, match):
    with pytest.raises(ValueError, match=match):
        build_rollout_batch(prompts, responses, logprobs, PAD)
