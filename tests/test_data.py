"""Data loading, prompt formatting/tokenisation/length handling, the prompt stream, SFT and preference batches."""

from __future__ import annotations

import json
import logging

import datasets
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch

from rlhf_ray.config import DataConfig
from rlhf_ray.data import (
    DataError,
    PromptSource,
    encode_preferences,
    encode_prompts,
    encode_sft,
    load_records,
    write_jsonl,
)
from rlhf_ray.data.synthetic import VOCAB
from rlhf_ray.models import build_word_tokenizer


@pytest.fixture(scope="module")
def tok():
    return build_word_tokenizer([*VOCAB, "a", "b", "c", "d", "e", "f"])


def ids_of(tok, text):
    return tok(text, add_special_tokens=False)["input_ids"]


# ---- load_records ---------------------------------------------------------------------------------
def test_jsonl_roundtrip_and_schema(tmp_path):
    path = write_jsonl(
        tmp_path / "d.jsonl",
        [
            {"prompt": "sort: 1 2 =", "response": "1 2", "id": 1},
            {"prompt": "sort: 3 =", "response": "3", "extra": "x"},
        ],
    )
    ds = load_records(path, ["prompt", "response"])
    assert isinstance(ds, datasets.Dataset)
    assert ds["prompt"] == ["sort: 1 2 =", "sort: 3 ="]
    assert ds["id"] == [1, None] and ds["extra"] == [None, "x"]  # fields of later lines are kept
    with pytest.raises(DataError) as err:
        load_records(path, ["prompt", "chosen"])
    msg = str(err.value)
    assert str(path) in msg and "'chosen'" in msg and "'response'" in msg and "'prompt'" in msg
    assert "line 1" in msg


def test_jsonl_missing_field_on_a_later_line(tmp_path):
    path = tmp_path / "d.jsonl"
    path.write_text('{"prompt": "a"}\n\n{"prompt": "b"}\n{"text": "c"}\n')
    assert len(load_records(path, [])) == 3
    with pytest.raises(
        DataError, match=r"line 4: no field 'prompt' \(needed: 'prompt'; available fields: 'text'\)"
    ):
        load_records(path, ["prompt"])


def test_jsonl_bad_lines_name_the_line(tmp_path):
    bad_json = tmp_path / "bad.jsonl"
    bad_json.write_text('{"prompt": "a"}\n{"prompt": "b"\n')
    with pytest.raises(DataError, match=r"bad.jsonl' line 2: malformed JSON"):
        load_records(bad_json, ["prompt"])
    bad_utf8 = tmp_path / "latin1.jsonl"
    bad_utf8.write_bytes(b'{"prompt": "a"}\n{"prompt": "b"}\n{"prompt": "caf\xe9"}\n')
    with pytest.raises(DataError, match=r"line 3: not valid UTF-8"):
        load_records(bad_utf8, ["prompt"])
    not_object = tmp_path / "list.jsonl"
    not_object.write_text('["a", "b"]\n')
    with pytest.raises(DataError, match=r"line 1: expected a JSON object, got list"):
        load_records(not_object, ["prompt"])
    mixed = tmp_path / "mixed.jsonl"
    mixed.write_text('{"prompt": "a"}\n{"prompt": {"x": 1}}\n')
    with pytest.raises(DataError, match=r"field 'prompt' mixes value types"):
        load_records(mixed, ["prompt"])


def test_load_parquet_and_saved_datasets(tmp_path):
    pq.write_table(pa.table({"prompt": ["p1", "p2"], "chosen": ["c1", "c2"]}), tmp_path / "d.parquet")
    ds = load_records(tmp_path / "d.parquet", ["prompt", "chosen"])
    assert ds["chosen"] == ["c1", "c2"]
    with pytest.raises(
        DataError, match=r"d.parquet' has no field 'rejected'.*available fields: 'prompt', 'chosen'"
    ):
        load_records(tmp_path / "d.parquet", ["prompt", "chosen", "rejected"])

    datasets.Dataset.from_dict({"prompt": ["x", "y", "z"]}).save_to_disk(str(tmp_path / "saved"))
    saved = load_records(tmp_path / "saved", ["prompt"])
    assert saved["prompt"] == ["x", "y", "z"]
    with pytest.raises(DataError, match=r"saved' has no field 'response'.*available fields: 'prompt'"):
        load_records(tmp_path / "saved", ["response"])

    dd = datasets.DatasetDict(
        {
            "train": datasets.Dataset.from_dict({"prompt": ["t"]}),
            "test": datasets.Dataset.from_dict({"prompt": ["u"]}),
        }
    )
    dd.save_to_disk(str(tmp_path / "dict"))
    assert load_records(tmp_path / "dict", ["prompt"])["prompt"] == ["t"]
    datasets.DatasetDict({"test": dd["test"]}).save_to_disk(str(tmp_path / "nodict"))
    with pytest.raises(DataError, match="without a 'train' split"):
        load_records(tmp_path / "nodict", ["prompt"])


def test_load_errors_for_paths(tmp_path):
    with pytest.raises(DataError, match="does not exist"):
        load_records(tmp_path / "nope.jsonl")
    (tmp_path / "d.csv").write_text("prompt\na\n")
    with pytest.raises(DataError, match="unknown format '.csv'"):
        load_records(tmp_path / "d.csv")
    (tmp_path / "empty.jsonl").write_text("\n\n")
    with pytest.raises(DataError, match="holds no records"):
        load_records(tmp_path / "empty.jsonl")
    (tmp_path / "plain_dir").mkdir()
    with pytest.raises(DataError, match="not a saved `datasets` dataset"):
        load_records(tmp_path / "plain_dir")


# ---- prompts --------------------------------------------------------------------------------------
def test_plain_and_chat_prompts(tok):
    cfg = DataConfig(max_prompt_len=16)
    texts, ids, counts = encode_prompts(["sort: 3 1 ="], tok, cfg)
    assert texts == ["sort: 3 1 ="] and ids == [ids_of(tok, "sort: 3 1 =")]
    assert counts == {"total": 1, "skipped": 0, "truncated": 0}

    chat = DataConfig(max_prompt_len=16, apply_chat_template=True)
    texts, ids, _ = encode_prompts(["sort: 3 1 ="], tok, chat)
    user, eos, assistant = tok.convert_tokens_to_ids(["<|user|>", "<|eos|>", "<|assistant|>"])
    assert texts == ["sort: 3 1 ="]  # the text stays as written in the data
    assert ids == [[user, *ids_of(tok, "sort: 3 1 ="), eos, assistant]]
    # a list of messages is rendered with the template
    msgs = [{"role": "system", "content": "a b"}, {"role": "user", "content": "sort: 2 ="}]
    texts, ids, _ = encode_prompts([msgs], tok, chat)
    assert texts == ["<|system|>a b<|eos|><|user|>sort: 2 =<|eos|><|assistant|>"]
    # data.chat_template overrides the tokenizer's
    override = DataConfig(apply_chat_template=True, chat_template="Q {{ messages[-1]['content'] }} A")
    assert encode_prompts(["b c"], tok, override)[1] == [ids_of(tok, "Q b c A")]


def test_prompt_errors_name_the_row(tok):
    cfg = DataConfig()
    with pytest.raises(DataError, match=r"prompt row 2 is empty"):
        encode_prompts(["a", "b", "  "], tok, cfg)
    with pytest.raises(DataError, match=r"prompt row 1: field 'prompt' must be a non-empty string"):
        encode_prompts(["a", 7], tok, cfg)
    with pytest.raises(DataError, match="data.apply_chat_template=true"):
        encode_prompts([[{"role": "user", "content": "a"}]], tok, cfg)
    no_template = build_word_tokenizer(["a"])
    no_template.chat_template = None
    with pytest.raises(DataError, match="tokenizer has no chat template; set data.chat_template"):
        encode_prompts(["a"], no_template, DataConfig(apply_chat_template=True))


def test_overlong_prompts(tok, caplog):
    prompts = ["a b c", "a b c d e f", "f e", "sort: 1 2 3 4 ="]
    skip = DataConfig(max_prompt_len=4, overlong_prompt="skip")
    with caplog.at_level(logging.WARNING):
        _, ids, counts = encode_prompts(prompts, tok, skip)
    assert counts == {"total": 4, "skipped": 2, "truncated": 0}
    assert ids[1] is None and ids[3] is None and ids[0] == ids_of(tok, "a b c")
    assert "2 skipped" in caplog.text

    trunc = DataConfig(max_prompt_len=4, overlong_prompt="truncate")
    _, ids, counts = encode_prompts(prompts, tok, trunc)
    assert counts["truncated"] == 2
    assert ids[1] == ids_of(tok, "c d e f")  # the last max_prompt_len tokens are kept
    assert ids[3] == ids_of(tok, "2 3 4 =")
    # with a chat template, truncation keeps the assistant header at the end
    chat = DataConfig(max_prompt_len=4, overlong_prompt="truncate", apply_chat_template=True)
    _, ids, _ = encode_prompts(["a b c d e f"], tok, chat)
    assert ids[0] == [*ids_of(tok, "e f"), *tok.convert_tokens_to_ids(["<|eos|>", "<|assistant|>"])]

    with pytest.raises(DataError, match=r"prompt row 1 has 6 tokens, more than data.max_prompt_len=4"):
        encode_prompts(prompts, tok, DataConfig(max_prompt_len=4, overlong_prompt="error"))
    with pytest.raises(DataError, match="no prompts left"):
        PromptSource([{"prompt": "a b c d e"}], tok, DataConfig(max_prompt_len=2))


def test_truncation_keeps_a_leading_bos():
    tok = build_word_tokenizer(["a", "b", "c", "d"])
    from tokenizers import processors

    tok._tokenizer.post_processor = processors.TemplateProcessing(
        single="<|bos|> $A", special_tokens=[("<|bos|>", tok.bos_token_id)]
    )
    _, ids, _ = encode_prompts(["a b c d"], tok, DataConfig(max_prompt_len=3, overlong_prompt="truncate"))
    assert ids == [[tok.bos_token_id, *ids_of(tok, "c d")]]


def test_prompt_source_order_epochs_and_resume(tok):
    records = datasets.Dataset.from_dict({"prompt": [f"sort: {i} =" for i in range(10)]})
    src = PromptSource(records, tok, DataConfig(), seed=5)
    assert len(src) == 10
    assert src.stats() == {
        "data/epoch": 0,
        "data/prompts": 10,
        "data/prompts_skipped": 0,
        "data/prompts_truncated": 0,
    }
    first = src.next(7)
    assert all(ids == ids_of(tok, text) for text, ids in first)
    rest = src.next(7)  # crosses into epoch 1
    epoch0 = [t for t, _ in first + rest[:3]]
    assert sorted(epoch0) == sorted(records["prompt"])  # each epoch visits every prompt once
    assert src.epoch == 1 and src.stats()["data/epoch"] == 1
    epoch1 = [t for t, _ in rest[3:] + src.next(6)]
    assert sorted(epoch1) == sorted(records["prompt"]) and epoch1 != epoch0  # reshuffled

    same = PromptSource(records, tok, DataConfig(), seed=5)
    assert [t for t, _ in same.next(10)] == epoch0  # deterministic from the seed
    other = PromptSource(records, tok, DataConfig(), seed=6)
    assert [t for t, _ in other.next(10)] != epoch0
    ordered = PromptSource(records, tok, DataConfig(), shuffle=False)
    assert [t for t, _ in ordered.next(10)] == records["prompt"]

    # resume: a fresh source loaded with a state continues exactly where the old one was
    a = PromptSource(records, tok, DataConfig(), seed=1)
    a.next(13)
    state = json.loads(json.dumps(a.state_dict()))  # survives a JSON checkpoint
    b = PromptSource(records, tok, DataConfig(), seed=999)
    b.load_state_dict(state)
    assert b.next(15) == a.next(15)
    smaller = PromptSource(records.select(range(5)), tok, DataConfig())
    with pytest.raises(DataError, match="checkpoint saw 10 prompts, the data now has 5"):
        smaller.load_state_dict(state)


def test_prompt_source_from_a_list_of_records(tok):
    src = PromptSource([{"prompt": "a b"}, {"prompt": "c"}], tok, DataConfig(), shuffle=False)
    assert src.next(3) == [("a b", ids_of(tok, "a b")), ("c", ids_of(tok, "c")), ("a b", ids_of(tok, "a b"))]
    with pytest.raises(DataError, match=r"record 1 has no field 'prompt' \(available fields: 'text'\)"):
        PromptSource([{"prompt": "a"}, {"text": "b"}], tok, DataConfig())
    trunc = PromptSource(
        [{"prompt": "a b c"}, {"prompt": "c"}, {"prompt": "d e f"}],
        tok,
        DataConfig(max_prompt_len=2, overlong_prompt="truncate"),
        shuffle=False,
    )
    assert trunc.next(3) == [
        ("a b c", ids_of(tok, "b c")),
        ("c", ids_of(tok, "c")),
        ("d e f", ids_of(tok, "e f")),
    ]
    assert trunc.stats()["data/prompts_truncated"] == 2 and trunc.stats()["data/prompts"] == 3
    skip = PromptSource(
        [{"prompt": "a b c"}, {"prompt": "c"}], tok, DataConfig(max_prompt_len=2), shuffle=False
    )
    assert skip.next(2) == [("c", ids_of(tok, "c"))] * 2
    assert skip.stats()["data/prompts_skipped"] == 1 and skip.num_total == 2


# ---- SFT and preference batches -------------------------------------------------------------------
def test_encode_sft(tok):
    records = [{"prompt": "sort: 3 1 =", "response": "1 3"}, {"prompt": "sort: 2 =", "response": "2"}]
    batch = encode_sft(records, tok, DataConfig())
    eos, pad = tok.eos_token_id, tok.pad_token_id
    row0 = ids_of(tok, "sort: 3 1 =") + ids_of(tok, "1 3") + [eos]
    row1 = ids_of(tok, "sort: 2 =") + ids_of(tok, "2") + [eos]
    assert batch["input_ids"].tolist() == [row0, row1 + [pad] * (len(row0) - len(row1))]
    assert batch["input_ids"].dtype == torch.long and batch["attention_mask"].dtype == torch.long
    assert batch["attention_mask"].tolist() == [[1] * 7, [1] * 5 + [0, 0]]
    assert batch["response_mask"].dtype == torch.float32
    assert batch["response_mask"].tolist() == [[0, 0, 0, 0, 1, 1, 1], [0, 0, 0, 1, 1, 0, 0]]
    assert batch.meta == {"prompt": ["sort: 3 1 =", "sort: 2 ="], "response": ["1 3", "2"]}

    # a response longer than max_response_len keeps its first tokens and loses its EOS
    cut = encode_sft([{"prompt": "a", "response": "b c d e"}], tok, DataConfig(max_response_len=3))
    assert cut["input_ids"].tolist() == [ids_of(tok, "a b c d")]
    exact = encode_sft([{"prompt": "a", "response": "b c"}], tok, DataConfig(max_response_len=3))
    assert exact["input_ids"].tolist() == [[*ids_of(tok, "a b c"), eos]]

    # overlong prompts follow data.overlong_prompt; other fields come from the config
    cfg = DataConfig(max_prompt_len=2, prompt_field="q", response_field="a")
    batch = encode_sft(datasets.Dataset.from_dict({"q": ["a b c", "d"], "a": ["e", "f"]}), tok, cfg)
    assert batch.meta["prompt"] == ["d"] and len(batch) == 1
    with pytest.raises(DataError, match=r"SFT record 1: field 'response' must be a non-empty string"):
        encode_sft([{"prompt": "a", "response": "b"}, {"prompt": "a", "response": ""}], tok, DataConfig())
    with pytest.raises(DataError, match=r"SFT prompt row 0 is empty"):
        encode_sft([{"prompt": "", "response": "b"}], tok, DataConfig())


def test_encode_sft_with_chat_template(tok):
    batch = encode_sft([{"prompt": "a b", "response": "c"}], tok, DataConfig(apply_chat_template=True))
    rendered = tok.apply_chat_template(
        [{"role": "user", "content": "a b"}, {"role": "assistant", "content": "c"}], tokenize=False
    )
    # prompt + response + EOS is exactly the template's own rendering of the conversation
    assert batch["input_ids"][0].tolist() == ids_of(tok, rendered)
    assert batch["response_mask"][0].tolist() == [0, 0, 0, 0, 0, 1, 1]


def test_encode_preferences(tok):
    records = [
        {"prompt": "sort: 2 1 =", "chosen": "1 2", "rejected": "2 1 1 1"},
        {"prompt": "sort: 3 =", "chosen": "3", "rejected": ""},
    ]
    batch = encode_preferences(records, tok, DataConfig())
    eos, pad = tok.eos_token_id, tok.pad_token_id
    assert set(batch.tensors) == {
        f"{s}_{k}" for s in ("chosen", "rejected") for k in ("input_ids", "attention_mask", "response_mask")
    }
    width = len(ids_of(tok, "sort: 2 1 = 2 1 1 1")) + 1
    assert all(v.shape == (2, width) for v in batch.tensors.values())  # one width for both sides
    assert batch["chosen_input_ids"][0].tolist() == [*ids_of(tok, "sort: 2 1 = 1 2"), eos, pad, pad]
    assert batch["rejected_input_ids"][0].tolist() == [*ids_of(tok, "sort: 2 1 = 2 1 1 1"), eos]
    assert batch["rejected_input_ids"][1].tolist() == [*ids_of(tok, "sort: 3 ="), eos] + [pad] * 5
    assert batch["rejected_response_mask"][1].tolist() == [0, 0, 0, 1, 0, 0, 0, 0, 0]
    assert batch["chosen_response_mask"][0].tolist() == [0, 0, 0, 0, 1, 1, 1, 0, 0]
    assert batch["chosen_attention_mask"][0].tolist() == [1] * 7 + [0, 0]
    assert batch.meta == {
        "prompt": ["sort: 2 1 =", "sort: 3 ="],
        "chosen": ["1 2", "3"],
        "rejected": ["2 1 1 1", ""],
    }
    with pytest.raises(DataError, match=r"preference record 0: field 'rejected' must be a string"):
        encode_preferences([{"prompt": "a", "chosen": "b", "rejected": None}], tok, DataConfig())
