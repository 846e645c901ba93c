"""Local copies of every supported hub dataset, laid out as its hub repository is (file names, folders,
formats, column schemas from the dataset cards), each with the rows our adapter must produce from it.

COPIES[name] = (files, expect): files(i) -> {relative path: [records]} for example i (records of every
example i are concatenated per file); expect(i) -> (prompt, chosen, rejected) or None when our adapter must
drop example i. N examples per copy."""

import gzip
import json
import os

N = 10
H = "\n\nHuman: "
A = "\n\nAssistant:"


def _one(prompt, chosen, rejected=None):
    return prompt, chosen, rejected


def _rm_static(i):
    prompt = f"{H}Hi {i}{A} Hello.{H}Question {i}?{A}"
    rec = {"prompt": prompt, "response": f" Answer {i}.", "chosen": f" Answer {i}.", "rejected": f" No {i}."}
    return {
        "data/train-00000-of-00001-2a1df75c6bce91ab.parquet": [rec],
        "data/test-00000-of-00001-8c7c51afc6d45980.parquet": [rec],
    }


RM_EXPECT = lambda i: _one(
    f"Human: Hi {i}\n\nAssistant: Hello.\n\nHuman: Question {i}?\n\nAssistant:", f" Answer {i}.", f" No {i}."
)


def _webgpt(i):
    score = [(1.0, -1.0), (-0.5, 0.5), (0.0, 0.0)][i % 3]  # a tie every third example: dropped
    rec = {
        "question": {"dataset": "eli5", "id": f"q{i}", "full_text": f"Why is {i} odd?"},
        "quotes_0": {"title": ["t"], "extract": ["e"]},
        "answer_0": f"Because [1] of {i} [2, 3].",
        "tokens_0": ["a"],
        "score_0": score[0],
        "quotes_1": {"title": ["t"], "extract": ["e"]},
        "answer_1": f"No idea [1] about {i}.",
        "tokens_1": ["b"],
        "score_1": score[1],
    }
    return {"default/train/0000.parquet": [rec]}


def _webgpt_expect(i):
    if i % 3 == 2:
        return None
    better, worse = f" Because of {i}.", f" No idea about {i}."
    return _one(f"Human: Why is {i} odd?\n\nAssistant:", *((better, worse) if i % 3 == 0 else (worse, better)))


def _shp(i):
    rec = {
        "post_id": f"p{i}",
        "domain": "askscience_train",
        "upvote_ratio": 0.9,
        "history": f"Why is the sky blue {i}?",
        "c_root_id_A": "a",
        "c_root_id_B": "b",
        "created_at_utc_A": 1,
        "created_at_utc_B": 2,
        "score_A": 5,
        "score_B": 3,
        "human_ref_A": f"Rayleigh {i}.",
        "human_ref_B": f"Magic {i}.",
        "labels": i % 2,
        "seconds_difference": 1.0,
        "score_ratio": 1.6,
    }
    return {"askscience/train.json": [rec], "askscience/validation.json": [rec], "askscience/test.json": [rec]}


def _shp_expect(i):
    a, b = f" Rayleigh {i}.", f" Magic {i}."
    return _one(f"Human: Why is the sky blue {i}?\n\nAssistant:", *((a, b) if i % 2 == 1 else (b, a)))


def _miracl(i):
    neg = [{"docid": "n", "title": "T", "text": f"不相关 {i}"}] if i % 2 == 0 else []  # no negative: an SFT-only row
    rec = {
        "query_id": str(i),
        "query": f"问题 {i}",
        "positive_passages": [{"docid": "p", "title": "T", "text": f"答案 {i}"}],
        "negative_passages": neg,
    }
    return {"data/train-00000-of-00001.parquet": [rec], "data/dev-00000-of-00001.parquet": [rec]}


def _hc3(i):
    rec = {"id": str(i), "question": f"什么是 {i}?", "human_answers": [f"人类 {i}"], "chatgpt_answers": [f"机器 {i}"]}
    other = {**rec, "question": "baike duplicate"}  # another config's file: must not be read
    return {"all.jsonl": [rec], "baike.jsonl": [other]}


def _mkqa(lang):
    def files(i):
        text = None if i == 3 else f"{lang}-answer {i}"  # an unanswerable query: a prompt for step 3 alone
        answers = {k: [{"type": "entity", "entity": "Q1", "text": text, "aliases": []}] for k in ("en", "zh_cn", "ja")}
        rec = {
            "example_id": str(i),
            "query": f"q {i}",
            "queries": {k: f"{k}-query {i}" for k in ("en", "zh_cn", "ja")},
            "answers": answers,
        }
        return {"mkqa.jsonl.gz": [rec]}

    return files


def _qg(i):
    rec = {
        "answer": "東京",
        "paragraph_question": "p",
        "question": f"首都は {i}?",
        "sentence": f"首都は東京 {i}。",
        "paragraph": "段落",
        "sentence_answer": "s",
        "paragraph_answer": "pa",
        "paragraph_sentence": "ps",
        "paragraph_id": str(i),
    }
    return {
        f"data/processed/train0{i % 2}.jsonl": [rec],
        "data/processed/validation00.jsonl": [rec],
        "data/processed/test00.jsonl": [rec],
    }


def _qag(i):
    rec = {
        "paragraph": f"段落 {i}",
        "questions": [f"質問 {i}", "二つ目"],
        "answers": ["a", "b"],
        "questions_answers": "qa",
        "paragraph_id": str(i),
    }
    return {
        "data/processed/train.jsonl": [rec],
        "data/processed/validation.jsonl": [rec],
        "data/processed/test.jsonl": [rec],
    }


def _hh(i):
    history = f"{H}Hi {i}{A} Hello.{H}Tell me {i}{A}"
    rec = {"chosen": f"{history} Sure {i}.", "rejected": f"{history} No."}
    if i == 4:  # the two dialogues differ before their last answer: dropped
        rec["rejected"] = f"{H}Other{A} No."
    red = {
        "transcript": "x",
        "min_harmlessness_score_transcript": 0.0,
        "num_params": "52B",
        "model_type": "rlhf",
        "rating": 1.0,
        "task_description": "t",
        "task_descripton_harmlessness_score": 0.0,
        "red_team_member_id": 1,
        "is_upworker": True,
        "tags": None,
    }
    return {
        "harmless-base/train.jsonl.gz": [rec],
        "harmless-base/test.jsonl.gz": [rec],
        "helpful-base/train.jsonl.gz": [rec],
        "helpful-base/test.jsonl.gz": [rec],
        "red-team-attempts/red_team_attempts.jsonl.gz": [red],
    }


def _hh_expect(i):
    if i == 4:
        return None
    return _one(f"Human: Hi {i}\n\nAssistant: Hello.\n\nHuman: Tell me {i}\n\nAssistant:", f" Sure {i}.", " No.")


COPIES = {
    "Dahoas/rm-static": (_rm_static, RM_EXPECT),
    "Dahoas/full-hh-rlhf": (_rm_static, RM_EXPECT),
    "Dahoas/synthetic-instruct-gptj-pairwise": (
        lambda i: {
            "data/train-00000-of-00001-1e5d57b93c448e7a.parquet": [
                {"prompt": f"Write the number {i}.", "chosen": f"{i}", "rejected": "none"}
            ]
        },
        lambda i: _one(f"Human: Write the number {i}.\n\nAssistant:", f" {i}", " none"),
    ),
    "yitingxie/rlhf-reward-datasets": (
        lambda i: {
            f"data/{s}-00000-of-00001.parquet": [
                {
                    "prompt": f"{H}Hi{A} Hey.{H}Is {i} even?\n\n",
                    "chosen": f"Assistant: Yes {i}.",
                    "rejected": f"Assistant: No {i}.",
                }
            ]
            for s in ("train", "test")
        },
        lambda i: _one(f"Human: Hi\n\nAssistant: Hey.\n\nHuman: Is {i} even?\n\nAssistant:", f" Yes {i}.", f" No {i}."),
    ),
    "openai/webgpt_comparisons": (_webgpt, _webgpt_expect),
    "stanfordnlp/SHP": (_shp, _shp_expect),
    "pvduy/sharegpt_alpaca_oa_vicuna_format": (
        lambda i: {
            f"data/{s}-00000-of-00001-23ed8d98fe776723.parquet": [
                {"prompt": f"USER: Name colour {i}. ASSISTANT:", "label": f"Blue {i}."}
            ]
            for s in ("train", "test")
        },
        lambda i: _one(f"Human: Name colour {i}.\n\nAssistant:", f" Blue {i}."),
    ),
    "wangrui6/Zhihu-KOL": (
        lambda i: {
            "data/train-00000-of-00005-a1278ede4e8c5cdb.parquet": [
                {"INSTRUCTION": f"如何学习 {i}?", "RESPONSE": f"多练习 {i}。", "SOURCE": "Zhihu", "METADATA": "{}"}
            ]
        },
        lambda i: _one(f"Human: 如何学习 {i}?\n\nAssistant:", f" 多练习 {i}。"),
    ),
    "Cohere/miracl-zh-queries-22-12": (
        _miracl,
        lambda i: _one(f"Human: 问题 {i}\n\nAssistant:", f" 答案 {i}", f" 不相关 {i}" if i % 2 == 0 else None),
    ),
    "Cohere/miracl-ja-queries-22-12": (
        _miracl,
        lambda i: _one(f"Human: 问题 {i}\n\nAssistant:", f" 答案 {i}", f" 不相关 {i}" if i % 2 == 0 else None),
    ),
    "Hello-SimpleAI/HC3-Chinese": (_hc3, lambda i: _one(f"Human: 什么是 {i}?\n\nAssistant:", f" 人类 {i}")),
    "mkqa-Chinese": (
        _mkqa("zh_cn"),
        lambda i: _one(f"Human: zh_cn-query {i}\n\nAssistant:", None if i == 3 else f" zh_cn-answer {i}"),
    ),
    "mkqa-Japanese": (
        _mkqa("ja"),
        lambda i: _one(f"Human: ja-query {i}\n\nAssistant:", None if i == 3 else f" ja-answer {i}"),
    ),
    "lmqg/qg_jaquad": (_qg, lambda i: _one(f"Human: 首都は {i}?\n\nAssistant:", f" 首都は東京 {i}。")),
    "lmqg/qag_jaquad": (_qag, lambda i: _one(f"Human: 質問 {i}\n\nAssistant:", f" 段落 {i}")),
    "Anthropic/hh-rlhf": (_hh, _hh_expect),
}


def write_records(path, records):
    import datasets

    os.makedirs(os.path.dirname(path), exist_ok=True)
    if path.endswith(".parquet"):
        datasets.Dataset.from_list(records).to_parquet(path)
        return
    text = "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in records)
    if path.endswith(".gz"):
        with gzip.open(path, "wt", encoding="utf-8") as f:
            f.write(text)
    else:
        with open(path, "w", encoding="utf-8") as f:
            f.write(text)


def write_copy(name, root, n=N):
    """Write the local copy of `name` under root/<name> and return that folder."""
    files, _ = COPIES[name]
    per_file = {}
    for i in range(n):
        for rel, recs in files(i).items():
            per_file.setdefault(rel, []).extend(recs)
    folder = os.path.join(root, name)
    for rel, recs in per_file.items():
        write_records(os.path.join(folder, rel), recs)
    return folder


def expected(name, n=N):
    """Set of (prompt, chosen, rejected) our adapter must produce from the copy's examples."""
    return {e for e in (COPIES[name][1](i) for i in range(n)) if e is not None}
