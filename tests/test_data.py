import random

import pytest

import builtin
import data
import models
import sources
from common import UserError


@pytest.fixture(scope="module")
def tok():
    return models.load_tokenizer("tiny:gpt2")


def test_tiny_tokenizer_round_trips_text_and_pad_differs_from_eos(tok):
    text = "Human: sort: d b a c\n\nAssistant: é ✓"
    assert tok.decode(tok(text)["input_ids"]) == text
    assert tok.pad_token_id is not None and tok.eos_token_id is not None
    assert tok.pad_token_id != tok.eos_token_id


def encode(tok, prompt, response, max_len, train_on_prompt=False):  # one response: its row, or None
    out = data.encode_row(tok, prompt, [response], max_len, train_on_prompt)
    return out and out[0][0]


def test_encode_row_masks_prompt_and_keeps_eos(tok):
    enc = encode(tok, "Human: hi\n\nAssistant:", " yo", max_len=64)
    p = tok("Human: hi\n\nAssistant:")["input_ids"]
    r = tok(" yo", add_special_tokens=False)["input_ids"]
    assert enc["input_ids"] == p + r + [tok.eos_token_id]
    assert enc["labels"] == [-100] * len(p) + r + [tok.eos_token_id]
    with_prompt = encode(tok, "Human: hi\n\nAssistant:", " yo", max_len=64, train_on_prompt=True)
    assert with_prompt["labels"] == with_prompt["input_ids"]
    short = encode(tok, "Human: hi\n\nAssistant:", " yo", max_len=len(p) + 1)  # the prompt gives way, not the EOS
    assert short["input_ids"] == p[-(len(p) + 1 - len(r) - 1) :] + r + [tok.eos_token_id]


def test_collate_sft_pads_labels_with_ignore_index(tok):
    a = encode(tok, "Human: a\n\nAssistant:", " b", 64)
    b = encode(tok, "Human: longer prompt\n\nAssistant:", " longer answer", 64)
    batch = data.collate_sft([a, b], tok.pad_token_id)
    n = len(a["input_ids"])
    assert batch["input_ids"].shape == batch["labels"].shape == batch["attention_mask"].shape
    assert (batch["labels"][0, n:] == -100).all() and (batch["input_ids"][0, n:] == tok.pad_token_id).all()
    assert batch["attention_mask"][0].sum().item() == n and batch["attention_mask"][1].all()


def test_phase_split_is_deterministic_disjoint_and_complete():
    parts = [data.phase_indices(1000, [2, 4, 4], ph, seed=7) for ph in (1, 2, 3)]
    assert [len(p) for p in parts] == [200, 400, 400]
    assert set(parts[0]) | set(parts[1]) | set(parts[2]) == set(range(1000))
    assert (
        not (set(parts[0]) & set(parts[1]))
        and not (set(parts[1]) & set(parts[2]))
        and not (set(parts[0]) & set(parts[2]))
    )
    assert parts[2] == data.phase_indices(1000, [2, 4, 4], 3, seed=7)
    assert parts[2] != data.phase_indices(1000, [2, 4, 4], 3, seed=8)
    assert data.phase_indices(10, [1, 0, 0], 2, seed=1) == []


@pytest.mark.parametrize("bad", ["2,4", "a,b,c", "1,-1,2", "0,0,0", ""])
def test_malformed_data_split_is_refused(bad):
    with pytest.raises(UserError, match="--data_split"):
        data.parse_split(bad)


def test_sort_checker():
    prompt = data.format_prompt("sort: d b a c")
    assert builtin.sort_check(prompt, " a b c d")
    assert builtin.sort_check(prompt, "a b c d  ")
    assert not builtin.sort_check(prompt, " a b d c")
    assert not builtin.sort_check(prompt, " a b c")
    assert not builtin.sort_check(prompt, " a b c d e")


def test_sort_demo_pairs_are_right_and_demonstrations_imperfect():
    rows, _ = builtin.sort_examples(3000, random.Random(0))
    assert all(builtin.sort_check(r["prompt"], r["chosen"]) for r in rows)
    assert not any(builtin.sort_check(r["prompt"], r["rejected"]) for r in rows)
    long_rows = [r for r in rows if len(r["chosen"].split()) >= builtin.SORT_LONG]
    short_rows = [r for r in rows if len(r["chosen"].split()) < builtin.SORT_LONG]
    wrong = lambda rs: sum(not builtin.sort_check(r["prompt"], r["response"]) for r in rs) / len(rs)
    assert (
        abs(wrong(long_rows) - (builtin.SORT_P_SYSTEMATIC + (1 - builtin.SORT_P_SYSTEMATIC) * builtin.SORT_P_NOISE))
        < 0.05
    )
    assert abs(wrong(short_rows) - builtin.SORT_P_NOISE) < 0.03


def test_sort_eval_prompts_never_appear_in_training():
    raw = data.load_source("builtin:sort")
    assert not {r["prompt"] for r in raw["train"]} & {r["prompt"] for r in raw["eval"]}


def test_unknown_data_path_is_refused():
    with pytest.raises(UserError, match="--data_path nope/nothing: unknown dataset"):
        sources.resolve_source("nope/nothing")


def test_local_folder_ending_in_hub_name_resolves(tmp_path):
    folder = tmp_path / "Dahoas" / "rm-static"
    folder.mkdir(parents=True)
    assert sources.resolve_source(str(folder)) == "Dahoas/rm-static"


def test_rm_static_local_copy_loads_through_its_adapter(tmp_path):
    import datasets

    folder = tmp_path / "Dahoas" / "rm-static" / "data"
    folder.mkdir(parents=True)
    row = {
        "prompt": "\n\nHuman: How are you?\n\nAssistant:",
        "response": " Fine.",
        "chosen": " Fine.",
        "rejected": " Go away.",
    }
    datasets.Dataset.from_list([row] * 10).to_parquet(str(folder / "train-00000-of-00001.parquet"))
    datasets.Dataset.from_list([row] * 4).to_parquet(str(folder / "test-00000-of-00001.parquet"))
    rows = data.phase_rows([str(folder.parent)], [1, 0, 0], 1, seed=1)
    assert len(rows["train"]) == 10 and len(rows["eval"]) == 4
    assert rows["train"][0] == {
        "prompt": "Human: How are you?\n\nAssistant:",
        "chosen": " Fine.",
        "rejected": " Go away.",
        "response": " Fine.",
        "messages": [{"role": "user", "content": "How are you?"}],
    }


def test_local_jsonfile_missing_column_names_the_file(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "data").mkdir()
    (tmp_path / "data" / "train.json").write_text('[{"prompt": "hi", "rejected": "no"}]')
    (tmp_path / "data" / "eval.json").write_text('[{"prompt": "hi", "chosen": "yes", "rejected": "no"}]')
    with pytest.raises(
        UserError, match=r"--data_path local/jsonfile \(./data/train.json\): missing column\(s\) chosen"
    ):
        data.phase_rows(["local/jsonfile"], [1, 1, 1], 1, seed=1)


@pytest.mark.parametrize("left", [False, True])
def test_last_token_index_left_and_right_padding(left):
    seqs = [[5, 6, 7], [5], [5, 6, 7, 8, 9]]
    mask = data.pad([[1] * len(s) for s in seqs], 0, left=left)
    idx = models.last_token_index(mask)
    expected = [4, 4, 4] if left else [2, 0, 4]
    assert idx.tolist() == expected


def test_last_token_index_ignores_token_ids_when_bos_equals_pad():
    pad_id = 1
    ids = data.pad([[1, 9, 9, 2], [1, 9]], pad_id)  # BOS == PAD == 1 at the start of every row
    mask = data.pad([[1] * 4, [1] * 2], 0)
    assert models.last_token_index(mask).tolist() == [3, 1]
    assert ids[1, models.last_token_index(mask)[1]].item() == 9
