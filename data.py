"""Datasets, the prompt template, the 3-phase split and tokenisation: everything that must agree
across the three stages lives here, once.

Conventions (used by sft.py, reward.py and ppo.py):
- A row is {"prompt", "chosen", "rejected", "response"}: `prompt` is the formatted dialogue ending in "Assistant:",
  `chosen`/`rejected` the preferred and dispreferred responses (rejected is None for SFT-only sources), `response`
  the step-1 demonstration (defaults to chosen).
- Responses start with a space; the tokenizer's EOS is appended to every response.
- Mask convention: attention_mask is 1 on real tokens, 0 on padding; labels are -100 where no loss is taken.
  Training batches are right-padded, generation prompts left-padded; common.last_token_index works for both.
"""

import collections
import hashlib
import json
import math
import os
import re

import torch

import builtin
from common import UserError, barrier, cap_seq_len, print_rank0, rank, world_size

# DeepSpeed-Chat's "Human: ... Assistant:" dialogue form (Dahoas/rm-static's own layout).
PROMPT_TEMPLATE = "Human: {instruction}\n\nAssistant:"
IGNORE_INDEX = -100
CACHE_VERSION = 2  # bump when tokenisation changes so old caches are not reused
SPLIT_SEED = 0  # the 9:1 train/eval division of sources that ship only a train split


def format_prompt(instruction):
    return PROMPT_TEMPLATE.format(instruction=instruction.strip())


# --------------------------------------------------------------------------------------------
# Dialogues. A prompt is a list of messages [{"role": "system" | "user" | "assistant", "content"}] that
# ends in a user turn. Rows keep it in "messages"; "prompt" is it rendered in PROMPT_TEMPLATE's form
# ("Human: a\n\nAssistant: b\n\nHuman: c\n\nAssistant:", Anthropic's and Dahoas' layout), or with the
# tokenizer's own chat template when a stage runs with --chat_template (`apply_chat_template`).
TURN = re.compile(r"(?:^|\s)(Human|Assistant|USER|ASSISTANT):")
ROLES = {"Human": "user", "USER": "user", "Assistant": "assistant", "ASSISTANT": "assistant"}
NAMES = {"user": "Human", "assistant": "Assistant"}


def dialogue(text):
    """Messages of a prompt: "Human:"/"Assistant:" (or vicuna's "USER:"/"ASSISTANT:") turns, text before the
    first turn as a system message, the trailing empty "Assistant:" dropped; no markers = one user turn."""
    parts = TURN.split(text)
    if len(parts) == 1:
        return [{"role": "user", "content": text.strip()}]
    msgs = [{"role": "system", "content": parts[0].strip()}] if parts[0].strip() else []
    msgs += [{"role": ROLES[m], "content": c.strip()} for m, c in zip(parts[1::2], parts[2::2])]
    return msgs[:-1] if msgs[-1]["role"] == "assistant" and not msgs[-1]["content"] else msgs


def render_prompt(messages):
    """PROMPT_TEMPLATE's form of a dialogue (the default in all three steps)."""
    turns = [m["content"] if m["role"] == "system" else f"{NAMES[m['role']]}: {m['content']}" for m in messages]
    return "\n\n".join(turns) + "\n\nAssistant:"


def make_row(prompt, chosen, rejected=None):
    """A row from a source's prompt (an instruction or a dialogue) and responses; None (the example is
    dropped) when the prompt or chosen text is missing or the dialogue does not end with the user."""
    if not prompt or not chosen or not prompt.strip() or not chosen.strip():
        return None
    messages = dialogue(prompt)
    if messages[-1]["role"] != "user" or not messages[-1]["content"]:
        return None
    chosen = " " + chosen.strip()
    rejected = " " + rejected.strip() if rejected and rejected.strip() else None
    return dict(prompt=render_prompt(messages), messages=messages, chosen=chosen, rejected=rejected, response=chosen)


def check_same_template(chat_template, models):
    """All three steps must render prompts alike: refuse a model whose args.json (written by step 1 or 2)
    records the other choice. models: {flag: path}."""
    for flag, path in models.items():
        try:
            with open(os.path.join(path, "args.json")) as f:
                used = json.load(f).get("chat_template", False)
        except (OSError, ValueError):
            continue  # not one of our outputs: nothing recorded
        if used != chat_template:
            how = "with" if used else "without"
            raise UserError(f"--chat_template: {flag} {path} was trained {how} it; use the same setting here")


def render_messages(messages, chat_tokenizer=None):
    """A dialogue as prompt text: PROMPT_TEMPLATE's form, or the tokenizer's chat template ending with its assistant
    header (a BOS it writes is removed when the tokenizer adds one itself, so it is never doubled)."""
    tok = chat_tokenizer
    if tok is None:
        return render_prompt(messages)
    if not tok.chat_template:
        why = f"has no chat template (drop the flag to use {PROMPT_TEMPLATE!r})"
        raise UserError(f"--chat_template: the tokenizer of {tok.name_or_path} {why}")
    prompt = tok.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    adds_bos = tok.bos_token is not None and tok("")["input_ids"][:1] == [tok.bos_token_id]
    return prompt[len(tok.bos_token) :] if adds_bos and prompt.startswith(tok.bos_token) else prompt


def apply_chat_template(rows, tokenizer):
    """Rows re-rendered with the tokenizer's chat template; responses lose their leading space."""
    strip = lambda t: None if t is None else t.strip()
    keys = ("chosen", "rejected", "response")
    return [{**r, "prompt": render_messages(r["messages"], tokenizer), **{k: strip(r[k]) for k in keys}} for r in rows]


# --------------------------------------------------------------------------------------------
# Sources: one adapter per hub schema, example -> (prompt, chosen, rejected) or None to drop it. A
# --data_path is a hub name, a local folder whose path ends with one and holds that repository's files
# (datasets infers splits from their names), or a .json/.jsonl/.parquet file (FILE_SOURCE). `files`
# names the repository files to read where inference would read the wrong ones, `hub` where the hub
# copy differs (script repositories: their parquet export). Schemas: each dataset's hub card; mapping:
# DeepSpeed-Chat, applications/DeepSpeed-Chat/dschat/utils/data/raw_datasets.py.
Source = collections.namedtuple("Source", "columns adapter files hub check load kind", defaults=(None,) * 5)
FILE_SOURCE = "file"
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
    row = lambda x: {**make_row(x["prompt"], x["chosen"], x["rejected"]), "response": " " + x["response"]}
    return {part: [row(x) for x in xs] for part, xs in builtin.sort_dataset().items()}


def _hc3(x):
    return x["question"], _first(x["human_answers"]), None


def _file(x):  # generic files: prompt with chosen (+ rejected) or response
    return x["prompt"], x.get("chosen") or x.get("response"), x.get("rejected")


MKQA = "hf://datasets/apple/mkqa@~parquet/mkqa/train/*.parquet"
WEB = {"train": "hf://datasets/openai/webgpt_comparisons@~parquet/default/train/*.parquet"}  # its parquet export
QG = {"train": "data/processed/train*.jsonl", "validation": "data/processed/validation*.jsonl"}  # lmqg's files
SOURCES = {
    "builtin:sort": Source((), None, check=builtin.sort_check, load=_sort, kind=builtin.sort_error_kind),
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
    FILE_SOURCE: Source(("prompt", "chosen|response"), _file),
}


def resolve_source(path):
    """The SOURCES key for a --data_path: the name itself, a local folder whose path ends with it, or a
    data file."""
    if path in SOURCES and path != FILE_SOURCE:
        return path
    norm = os.path.normpath(path)
    if os.path.isfile(norm) and norm.endswith(DATA_EXTENSIONS):
        return FILE_SOURCE
    for key in SOURCES:
        if norm.endswith(os.sep + os.path.normpath(key)) and os.path.isdir(norm):
            return key
    known = ", ".join(k for k in SOURCES if k != FILE_SOURCE)
    files = "/".join(DATA_EXTENSIONS)
    or_else = f"or a local folder ending in one of them, or a {files} file"
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
    files = {"train": path} if key == FILE_SOURCE else src.files if local else src.hub or src.files
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


def load_source(path):
    """{"train": rows, "eval": rows} of one --data_path, through its adapter."""
    key = resolve_source(path)
    src = SOURCES[key]
    if src.load:
        return src.load()
    out, dropped = {}, 0
    ds, files = _load_dataset(path, key, src)
    for part, (name, split) in zip(("train", "eval"), _splits(ds, path)):
        where = f"--data_path {path}" + (f" ({files[name]})" if name in files and files[name] != path else "")
        missing = [c for c in src.columns if not any(a in split.column_names for a in c.split("|"))]
        if missing:
            raise UserError(f"{where}: missing column(s) {', '.join(missing)} (has: {', '.join(split.column_names)})")
        rows = [make_row(*t) if t else None for t in map(src.adapter, split)]
        out[part] = [r for r in rows if r]
        dropped += len(rows) - len(out[part])
        if not out[part]:
            raise UserError(f"{where}: no usable {part} rows (all {len(rows)} lack a prompt or a response)")
    if dropped:
        print_rank0(f"data: {path}: dropped {dropped} examples without a usable prompt/response (or tied scores)")
    return out


# --------------------------------------------------------------------------------------------
# The 3-phase split: phase 1 SFT, phase 2 reward model, phase 3 PPO (DeepSpeed-Chat's --data_split).
def parse_split(text):
    try:
        parts = [float(x) for x in text.split(",")]
    except ValueError:
        parts = []
    if len(parts) != 3 or any(p < 0 for p in parts) or sum(parts) <= 0:
        raise UserError(f"--data_split {text!r}: expected three non-negative numbers such as 2,4,4")
    return parts


def phase_indices(n, split, phase, seed):
    """Indices of `n` rows in `phase` (1-3): a seeded permutation cut in proportion to `split` (disjoint, complete)."""
    perm = torch.randperm(n, generator=torch.Generator().manual_seed(seed)).tolist()
    total = sum(split)
    bounds = [0]
    for p in split:
        bounds.append(bounds[-1] + p)
    lo, hi = (round(n * bounds[phase - 1] / total), round(n * bounds[phase] / total))
    return sorted(perm[lo:hi])


def phase_rows(paths, split, phase, seed, need_pairs=False, chat_tokenizer=None):
    """{"train": rows, "eval": rows} of one phase, blended over every --data_path; with need_pairs only rows
    with a rejected response; with chat_tokenizer rendered in its chat template (--chat_template)."""
    out = {"train": [], "eval": []}
    for path in paths:
        raw = load_source(path)
        for part in out:
            rows = [r for r in raw[part] if r["rejected"] is not None] if need_pairs else raw[part]
            if not rows:
                raise UserError(f"--data_path {path}: has no chosen/rejected pairs (needed for the reward model)")
            out[part] += [rows[i] for i in phase_indices(len(rows), split, phase, seed)]
    for part, rows in out.items():
        if not rows:
            raise UserError(f"--data_path {' '.join(paths)}: no {part} rows left for phase {phase} of --data_split")
        if chat_tokenizer is not None:
            out[part] = apply_chat_template(rows, chat_tokenizer)
    return out


# --------------------------------------------------------------------------------------------
# Tokenisation and collation.
def encode_pair(tokenizer, prompt, response, max_len, train_on_prompt=False):
    """input_ids and labels for prompt + response + EOS, truncated to max_len. Labels are -100 on the
    prompt (unless train_on_prompt), so the loss is on the response and its EOS only."""
    p = encode_prompt(tokenizer, prompt)
    r = tokenizer(response, add_special_tokens=False)["input_ids"] + [tokenizer.eos_token_id]
    ids = (p + r)[:max_len]
    labels = (p if train_on_prompt else [IGNORE_INDEX] * len(p)) + r
    return {"input_ids": ids, "labels": labels[:max_len]}


def encode_prompt(tokenizer, prompt, max_len=None):
    """Prompt ids with the tokenizer's specials (a BOS) but never ending in EOS: a post-processor that closes every
    text (BERT's [CLS] ... [SEP], with [SEP] as EOS) would end the dialogue before the answer. An over-long prompt
    keeps its end (where "Assistant:" is)."""
    ids = tokenizer(prompt, add_special_tokens=True)["input_ids"]
    return (ids[:-1] if ids and ids[-1] == tokenizer.eos_token_id else ids)[-(max_len or len(ids)) :]


def pad(seqs, value, left=False):
    """[B, T] tensor of lists padded to the longest; left padding for generation prompts."""
    width = max(len(s) for s in seqs)
    fill = lambda s: [value] * (width - len(s)) + list(s) if left else list(s) + [value] * (width - len(s))
    return torch.tensor([fill(s) for s in seqs], dtype=torch.long)


def collate_sft(batch, pad_id):
    ids = [b["input_ids"] for b in batch]
    labels = pad([b["labels"] for b in batch], IGNORE_INDEX)
    return {"input_ids": pad(ids, pad_id), "labels": labels, "attention_mask": pad([[1] * len(s) for s in ids], 0)}


def collate_pairs(batch, pad_id):
    """Chosen rows first, then rejected rows, in one right-padded batch: [2B, T] (plus each pair's kind of
    error, [B] strings, where the source classifies them)."""
    ids = [b["chosen_ids"] for b in batch] + [b["rejected_ids"] for b in batch]
    out = {"input_ids": pad(ids, pad_id), "attention_mask": pad([[1] * len(s) for s in ids], 0)}
    if "kind" in batch[0]:
        out["kind"] = [b["kind"] for b in batch]
    return out


def collate_prompts(prompts, pad_id):
    """Token-id lists of prompts as one left-padded batch for generation: [B, Tq]."""
    return {"input_ids": pad(prompts, pad_id, True), "attention_mask": pad([[1] * len(s) for s in prompts], 0, True)}


# --------------------------------------------------------------------------------------------
# Step 3's inputs: prompts, and text for the PPO-ptx language-model loss.
def build_prompts(args, tokenizer):
    """Phase-3 prompts, (train, eval), each {"ids": token ids, "texts": rendered prompts, "references": reference
    answers, "instructions": the last user turn as written}; prompts over --max_prompt_seq_len are dropped."""
    flag = "--max_prompt_seq_len + --max_answer_seq_len"
    limit = cap_seq_len(args.actor, args.max_prompt_seq_len + args.max_answer_seq_len, flag) - args.max_answer_seq_len
    if limit < 1:
        raise UserError(f"--max_answer_seq_len {args.max_answer_seq_len}: leaves no room for a prompt in the model")
    chat = tokenizer if args.chat_template else None
    rows = phase_rows(args.data_path, args.split, 3, args.seed, chat_tokenizer=chat)
    out = {}
    for part, part_rows in rows.items():
        ids = [tokenizer(r["prompt"])["input_ids"] for r in part_rows]
        keep = [i for i, x in enumerate(ids) if len(x) <= limit]
        if len(keep) < len(ids):
            print_rank0(f"data: dropped {len(ids) - len(keep)} {part} prompts longer than {limit} tokens")
        if not keep:
            what = f"no {part} prompt of --data_path {' '.join(args.data_path)} fits in {limit} tokens"
            raise UserError(f"--max_prompt_seq_len {args.max_prompt_seq_len}: {what}")
        kept = [part_rows[i] for i in keep]
        out[part] = {"ids": [ids[i] for i in keep], "texts": [r["prompt"] for r in kept]}
        out[part].update(
            references=[r["chosen"] for r in kept], instructions=[r["messages"][-1]["content"] for r in kept]
        )
    return out["train"], out["eval"]


def build_ptx(args, tokenizer):
    """PPO-ptx data: the unsupervised texts cut into blocks of prompt + answer length: [N, L]."""
    name = args.unsupervised_dataset_name
    block = cap_seq_len(args.actor, args.max_prompt_seq_len + args.max_answer_seq_len, "PPO-ptx block length")
    try:
        key = resolve_source(name)
    except UserError:
        key = None
    if key is not None:  # one of our sources: its phase-3 train prompts and chosen responses as text
        chat = tokenizer if args.chat_template else None
        texts = [r["prompt"] + r["chosen"] for r in phase_rows([name], args.split, 3, args.seed, False, chat)["train"]]
    else:
        import datasets

        try:
            texts = datasets.load_dataset(name, args.unsupervised_dataset_config_name, split="train")["text"]
        except Exception as e:  # any loading failure is a bad flag value
            why = f"{type(e).__name__}: {str(e)[:120]}"
            raise UserError(f"--unsupervised_dataset_name {name}: cannot load ({why})") from None
    ids = []
    for t in texts:
        ids += tokenizer(t, add_special_tokens=False)["input_ids"] + [tokenizer.eos_token_id]
    n = len(ids) // block
    if n == 0:
        raise UserError(f"--unsupervised_dataset_name {name}: fewer than {block} tokens of text")
    return torch.tensor(ids[: n * block]).view(n, block)


# --------------------------------------------------------------------------------------------
# Responses and sharding: shared by evaluation and PPO.
def cut_at_eos(tokens, eos_id):
    """Token list up to (not including) the first EOS."""
    return tokens[: tokens.index(eos_id)] if eos_id in tokens else tokens


def rank_batches(n, batch_size):
    """This rank's share of range(n), `batch_size` indices at a time. Every rank gets the same number of batches (ZeRO-3
    ranks gather parameters together in each forward); a rank with nothing left gets [] (callers run a dummy item)."""
    mine = list(range(rank(), n, world_size()))
    calls = math.ceil(math.ceil(n / world_size()) / batch_size)
    return [mine[c * batch_size : (c + 1) * batch_size] for c in range(calls)]


# --------------------------------------------------------------------------------------------
# The tokenised cache: a datasets folder keyed by a hash of the rows plus all else that changes the tokens (tokenizer,
# EOS, PAD, lengths, template), so edited files rebuild it.
def cache_key(rows, tokenizer, **settings):
    h = hashlib.sha256()
    for part in sorted(rows):
        for r in rows[part]:
            h.update(json.dumps(r, sort_keys=True).encode())
    ids = {"eos": tokenizer.eos_token_id, "pad": tokenizer.pad_token_id, "bos": tokenizer.bos_token_id}
    key = {"tokenizer": tokenizer.name_or_path, "vocab": len(tokenizer), **ids, "template": PROMPT_TEMPLATE}
    h.update(json.dumps({**key, "version": CACHE_VERSION, "settings": settings}, sort_keys=True, default=str).encode())
    return h.hexdigest()[:16]


def build_cached(name, rows, tokenizer, cache_dir, encode, **settings):
    """{"train", "eval"} Datasets of encode(row) for every row, from cache_dir/<name>-<key>; rank 0 builds it."""
    import datasets

    folder = os.path.join(cache_dir, f"{name}-{cache_key(rows, tokenizer, **settings)}")
    if rank() == 0 and not os.path.isdir(folder):
        tmp = f"{folder}.tmp{os.getpid()}"
        parts = {k: datasets.Dataset.from_list([encode(r) for r in v]) for k, v in rows.items()}
        datasets.DatasetDict(parts).save_to_disk(tmp)
        if not os.path.exists(folder):  # another job may have built it meanwhile
            os.replace(tmp, folder)
        print_rank0(f"data: cached {name} at {folder}")
    barrier()
    out = datasets.load_from_disk(folder)
    return {k: out[k] for k in out}
