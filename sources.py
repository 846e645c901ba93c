"""The data sources (DeepSpeed-Chat's raw_datasets.py): one adapter per hub schema, the table of them (SOURCES), and
reading a --data_path's train and eval splits: a hub name, a local copy of a hub repository, or a data file. An adapter
maps an example to (prompt, chosen, rejected) texts, or None to drop it; data.py makes them rows in the prompt template.
"""

import collections
import importlib.util
import os
import re

import builtin
from common import UserError

SPLIT_SEED = 0  # the 9:1 train/eval division of sources that ship only a train split


# Sources: one adapter per hub schema, example -> (prompt, chosen, rejected) or None to drop it. A
# --data_path is a hub name, a local folder whose path ends with one and holds that repository's files
# (datasets infers splits from their names), or a .json/.jsonl/.parquet file (FILE_SOURCE). `files`
# names the repository files to read where inference would read the wrong ones, `hub` where the hub
# copy differs (script repositories: their parquet export). Schemas: each dataset's hub card; mapping:
# DeepSpeed-Chat, applications/DeepSpeed-Chat/dschat/utils/data/raw_datasets.py.
Source = collections.namedtuple("Source", "columns adapter files hub check load kind", defaults=(None,) * 5)
FILE_SOURCE, SORT = "file", "builtin:sort"
DATA_EXTENSIONS = (".json", ".jsonl", ".parquet", ".json.gz", ".jsonl.gz")


def _triple(x):  # prompt, chosen, rejected columns as they are
    return x["prompt"], x["chosen"], x["rejected"]


def _after_assistant(text):  # yitingxie: responses carry the final "Assistant:" header
    return text.split("Assistant:")[-1]


def _yitingxie(x):  # the prompt lacks its final "Assistant:", which the responses carry
    return x["prompt"] + "Assistant:", _after_assistant(x["chosen"]), _after_assistant(x["rejected"])


def _uncite(text):  # WebGPT answers cite their browsing quotes as [1], [2, 3]: meaningless without them
    return re.sub(r"\s?\[\d+(?:,\s*\d+)*\]", "", text)


def _webgpt(x):  # the higher-scored answer is chosen; ties carry no preference and are dropped
    if x["score_0"] == x["score_1"]:
        return None
    better, worse = (x["answer_0"], x["answer_1"]) if x["score_0"] > x["score_1"] else (x["answer_1"], x["answer_0"])
    return x["question"]["full_text"], _uncite(better), _uncite(worse)


def _shp(x):  # labels == 1: human_ref_A preferred
    a, b = x["human_ref_A"], x["human_ref_B"]
    return (x["history"], a, b) if int(x["labels"]) == 1 else (x["history"], b, a)


def _first(items, key=None):
    return (items[0][key] if key else items[0]) if items else None


def _hh(x):  # whole dialogues: the prompt is everything up to the last "\n\nAssistant:"
    cut = x["chosen"].rfind("\n\nAssistant:") + len("\n\nAssistant:")
    if cut < len("\n\nAssistant:") or not x["rejected"].startswith(x["chosen"][:cut]):
        return None  # no assistant turn, or the two dialogues differ before their last answer
    return x["chosen"][:cut], x["chosen"][cut:], x["rejected"][cut:]


def _mkqa(lang):
    return lambda x: (x["queries"][lang], _first(x["answers"][lang], "text"), None)


def _miracl(x):
    return x["query"], _first(x["positive_passages"], "text"), _first(x["negative_passages"], "text")


def _sort():  # builtin:sort keeps its imperfect demonstrations as the step-1 responses
    row = lambda x: (x["prompt"], x["chosen"], x["rejected"], x["response"])
    return {part: (f"--data_path {SORT}", [row(x) for x in xs]) for part, xs in builtin.sort_dataset().items()}


def _hc3(x):
    return x["question"], _first(x["human_answers"]), None


def _file(x):  # generic files: prompt with chosen (+ rejected) or response
    return x["prompt"], x.get("chosen") or x.get("response"), x.get("rejected")


MKQA = "hf://datasets/apple/mkqa@~parquet/mkqa/train/*.parquet"
WEB = {"train": "hf://datasets/openai/webgpt_comparisons@~parquet/default/train/*.parquet"}  # its parquet export
QG = {"train": "data/processed/train*.jsonl", "validation": "data/processed/validation*.jsonl"}  # lmqg's files
SOURCES = {
    SORT: Source((), None, check=builtin.sort_check, load=_sort, kind=builtin.sort_error_kind),
    "Dahoas/rm-static": Source(("prompt", "chosen", "rejected"), _triple),
    "Dahoas/full-hh-rlhf": Source(("prompt", "chosen", "rejected"), _triple),
    "Dahoas/synthetic-instruct-gptj-pairwise": Source(("prompt", "chosen", "rejected"), _triple),
    "yitingxie/rlhf-reward-datasets": Source(("prompt", "chosen", "rejected"), _yitingxie),
    "openai/webgpt_comparisons": Source(("question", "answer_0", "answer_1", "score_0", "score_1"), _webgpt, hub=WEB),
    "stanfordnlp/SHP": Source(("history", "human_ref_A", "human_ref_B", "labels"), _shp),
    "pvduy/sharegpt_alpaca_oa_vicuna_format": Source(("prompt", "label"), lambda x: (x["prompt"], x["label"], None)),
    "wangrui6/Zhihu-KOL": Source(("INSTRUCTION", "RESPONSE"), lambda x: (x["INSTRUCTION"], x["RESPONSE"], None)),
    "Cohere/miracl-zh-queries-22-12": Source(("query", "positive_passages", "negative_passages"), _miracl),
    "Cohere/miracl-ja-queries-22-12": Source(("query", "positive_passages", "negative_passages"), _miracl),
    "Hello-SimpleAI/HC3-Chinese": Source(("question", "human_answers"), _hc3, {"train": "all.jsonl"}),
    "mkqa-Chinese": Source(("queries", "answers"), _mkqa("zh_cn"), hub={"train": MKQA}),
    "mkqa-Japanese": Source(("queries", "answers"), _mkqa("ja"), hub={"train": MKQA}),
    "lmqg/qg_jaquad": Source(("question", "sentence"), lambda x: (x["question"], x["sentence"], None), files=QG),
    "lmqg/qag_jaquad": Source(("questions", "paragraph"), lambda x: (_first(x["questions"]), x["paragraph"], None), QG),
    # DeepSpeed-Chat's own: data/train.json and data/eval.json in the working directory
    "local/jsonfile": Source(("prompt", "chosen"), _file, files={"train": "data/train.json", "eval": "data/eval.json"}),
    "Anthropic/hh-rlhf": Source(("chosen", "rejected"), _hh, {"train": "*/train.jsonl.gz", "test": "*/test.jsonl.gz"}),
    FILE_SOURCE: Source(("prompt",), _file),
}


def resolve_source(path):
    """The SOURCES key for a --data_path: the name itself, a local folder whose path ends with it, a data file, or a
    folder of data files named for their splits (train.jsonl and test.jsonl, ...: its own held-out rows)."""
    if path in SOURCES and path != FILE_SOURCE:
        return path
    norm = os.path.normpath(path)
    if os.path.isfile(norm) and norm.endswith(DATA_EXTENSIONS):
        return FILE_SOURCE
    for key in SOURCES:
        if norm.endswith(os.sep + os.path.normpath(key)) and os.path.isdir(norm):
            return key
    if os.path.isdir(norm) and any(f.startswith("train") and f.endswith(DATA_EXTENSIONS) for f in os.listdir(norm)):
        return FILE_SOURCE
    known = ", ".join(k for k in SOURCES if k != FILE_SOURCE)
    files = "/".join(DATA_EXTENSIONS)
    or_else = f"or a local folder ending in one of them, or a {files} file, or a folder of train/test files"
    raise UserError(f"--data_path {path}: unknown dataset (known: {known}; {or_else})")


def checker_for(paths):
    """The ground-truth checker shared by all sources, or None when any source has none."""
    checks = {SOURCES[resolve_source(p)].check for p in paths}
    return checks.pop() if len(checks) == 1 else None


def error_kind_for(paths):
    """The sources' shared classifier of rejected answers, (prompt, chosen, rejected) -> kind, or None."""
    kinds = {SOURCES[resolve_source(p)].kind for p in paths}
    return kinds.pop() if len(kinds) == 1 else None


def _load_dataset(path, key, src):
    """({split: Dataset}, {split: file pattern}) of a source: a local folder, file or (local/jsonfile) the
    working directory, or the hub. Named files load one split at a time, so each split's columns are
    checked, and named, on their own."""
    import datasets

    datasets.disable_progress_bars()
    local = key in ("local/jsonfile", FILE_SOURCE) or os.path.isdir(path)
    files = src.files if local else src.hub or src.files
    if key == FILE_SOURCE:  # a file (divided 9:1), or a folder of split-named files (datasets reads their splits)
        files = {"train": path} if os.path.isfile(path) else None
    if files and not local:
        files = {s: f if f.startswith("hf://") else f"hf://datasets/{key}/{f}" for s, f in files.items()}
    elif files and key != FILE_SOURCE:
        files = {s: os.path.join("." if key == "local/jsonfile" else path, f) for s, f in files.items()}
    try:
        if files:
            builder = lambda f: "parquet" if f.endswith(".parquet") else "json"
            return {s: datasets.load_dataset(builder(f), data_files={s: f}, split=s) for s, f in files.items()}, files
        return dict(datasets.load_dataset(path)), {}
    except FileNotFoundError as e:
        raise UserError(f"--data_path {path}: {str(e).splitlines()[0]}") from None
    except RuntimeError as e:  # "Dataset scripts are no longer supported": a script-only hub repository
        if "scripts are no longer supported" not in str(e):
            raise
        hint = "download its parquet export (revision refs/convert/parquet) and pass that folder"
        raise UserError(f"--data_path {path}: {e}; {hint}") from None
    except datasets.exceptions.DatasetGenerationError as e:
        cause = str(e.__cause__ or e).splitlines()[0]
        raise UserError(f"--data_path {path}: cannot read its files ({cause})") from None
    except (ConnectionError, OSError) as e:
        if local:
            raise UserError(f"--data_path {path}: could not read it as a dataset ({type(e).__name__}: {e})") from None
        hint = f"download the dataset repository and pass its folder, e.g. /data/{key}"
        raise UserError(
            f"--data_path {path}: not found locally and the Hugging Face Hub is unreachable; {hint}"
        ) from None


def _splits(ds, path):
    """[(name, train), (name, eval)] of {split: Dataset}; a source with only `train` is divided 9:1, the
    same way every time."""
    if "train" not in ds:
        raise UserError(f"--data_path {path}: no 'train' split (has: {', '.join(ds)})")
    for name in ("test", "validation", "eval", "dev"):
        if name in ds:
            return [("train", ds["train"]), (name, ds[name])]
    parts = ds["train"].train_test_split(test_size=0.1, seed=SPLIT_SEED)
    return [("train", parts["train"]), ("train", parts["test"])]


def read(path):
    """{"train": (where, examples), "eval": ...} of one --data_path: its adapter's outputs, (prompt, chosen, rejected)
    or (..., demonstration) or None, and where they come from (the flag and file, for error lines)."""
    key = resolve_source(path)
    src = SOURCES[key]
    if src.load:
        return src.load()
    ds, files, out = *_load_dataset(path, key, src), {}
    for part, (name, split) in zip(("train", "eval"), _splits(ds, path)):
        where = f"--data_path {path}" + (f" ({files[name]})" if name in files and files[name] != path else "")
        missing = [c for c in src.columns if not any(a in split.column_names for a in c.split("|"))]
        if missing:
            raise UserError(f"{where}: missing column(s) {', '.join(missing)} (has: {', '.join(split.column_names)})")
        out[part] = (where, list(map(src.adapter, split)))
    return out


def reward_function(spec, data_paths):
    """--reward_fn: "checker" (the dataset's ground truth as 1.0 / 0.0) or "path/to/file.py:function", a function of
    (prompts: list[str] instructions, responses: list[str] without EOS) -> list[float]."""
    if spec == "checker":
        if (check := checker_for(data_paths)) is None:
            raise UserError(f"--reward_fn checker: --data_path {' '.join(data_paths)} has no ground-truth checker")
        return lambda prompts, responses: [float(check(p, r)) for p, r in zip(prompts, responses)]
    path, _, name = spec.rpartition(":")
    if not os.path.isfile(path):
        raise UserError(f"--reward_fn {spec}: no such file {path!r} (expected checker or path/to/file.py:function)")
    module = importlib.util.module_from_spec(importlib.util.spec_from_file_location("reward_fn", path))
    module.__spec__.loader.exec_module(module)
    if not callable(getattr(module, name, None)):
        raise UserError(f"--reward_fn {spec}: {path} has no function {name!r}")
    return getattr(module, name)
