"""Fixtures shared by the test modules."""

from __future__ import annotations

from pathlib import Path

import pytest

from rlhf_ray.runtime import setup_process_env

setup_process_env()  # no hub, caches inside the project, whatever shell the tests run from


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory) -> Path:
    """The synthetic task's word tokenizer and a randomly initialised tiny Llama (0.86M parameters,
    max_position_embeddings 256), saved once per session; transformers and vLLM load the directory."""
    from rlhf_ray.data.synthetic import VOCAB
    from rlhf_ray.models import build_word_tokenizer, tiny_model

    return tiny_model(tmp_path_factory.mktemp("tiny_model") / "model", build_word_tokenizer(VOCAB), seed=0)
