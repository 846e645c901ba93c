"""Datasets, the prompt template, the 3-phase split and tokenisation: everything that must agree
across the three stages lives here, once.

Conventions (used by sft.py, reward.py and ppo.py):
- A row is {"prompt", "chosen", "rejected", "response"}: `prompt` is the formatted dialogue ending
  in "Assistant:", `chosen`/`rejected` the preferred and dispreferred responses (rejected is None for
  SFT-only sources), `response` the step-1 demonstration (defaults to chosen).
- Responses start with a space; the tokenizer's EOS is appended to every response.
- Mask convention: attention_mask is 1 on real tokens, 0 on padding; labels are -100 where no loss
  is taken. Training batches are right-padded, generation prompts left-padded; `last_token_index`
  works for both.
"""
import hashlib
import json
import math
import os
import random

import torch

from common import UserError, barrier, cap_seq_len, print_rank0, rank, world_size

# DeepSpeed-Chat's "Human: ... Assistant:" dialogue form (Dahoas/rm-static's own layout).
PROMPT_TEMPLATE = "Human: {instruction}\n\nAssistant:"
IGNORE_INDEX = -100
CACHE_VERSION = 1  # bump when tokenisation changes so old caches are not reused


def format_prompt(instruction):
    return PROMPT_TEMPLATE.format(instruction=instruction.strip())


# --------------------------------------------------------------------------------------------
# builtin:sort, the demo. "Human: sort: d b a c\n\nAssistant:" -> " a b c d".
# It is built to show why RLHF exists: the demonstrations (step 1) are imperfect in a systematic
# way -- on lists of SORT_LONG or more letters the demonstrator swaps the last two items most of
# the time -- plus some random noise, so imitation plateaus; the preference pairs (step 2) are
# right (correct answer chosen, a corrupted one rejected), so steps 2-3 can fix what step 1 copied.
SORT_LETTERS = "abcdefghijklmnop"
SORT_MIN, SORT_MAX, SORT_LONG = 3, 6, 5
SORT_P_SYSTEMATIC = 0.6  # chance a long-list demonstration has its last two items swapped
SORT_P_NOISE = 0.1  # chance any demonstration has two random adjacent items swapped
SORT_N_TRAIN, SORT_N_EVAL = 30000, 1000
SORT_DATA_SEED = 0  # the demo is a fixed dataset, like a hub one; --seed only drives the split
SPLIT_SEED = 0  # the 9:1 train/eval division of sources that ship only a train split


def _swap(items, i):
    items = list(items)
    items[i], items[i + 1] = items[i + 1], items[i]
    return items


def _corrupt(rng, answer):
    """A wrong answer of the kinds a careless labeller writes (never equal to `answer`): the last two
    items swapped (the demonstrators' systematic error), a random adjacent swap, a letter replaced by
    one not in the list (still sorted: without these the reward model learns "sorted" rather than
    "the input, sorted", and PPO exploits it), a letter dropped, or one added."""
    kind = rng.random()
    if kind < 0.3:
        out = _swap(answer, len(answer) - 2)
    elif kind < 0.45:
        out = _swap(answer, rng.randrange(len(answer) - 1))
    elif kind < 0.85:
        out = list(answer)
        out[rng.randrange(len(out))] = rng.choice([c for c in SORT_LETTERS if c not in answer])
        out.sort()
    elif kind < 0.925:
        out = list(answer)
        del out[rng.randrange(len(out))]
    else:
        out = list(answer)
        out.insert(rng.randrange(len(out) + 1), rng.choice(SORT_LETTERS))
    return out if out != answer else _swap(answer, 0)


def sort_row(rng, items):
    answer = sorted(items)
    demo = answer
    if len(items) >= SORT_LONG and rng.random() < SORT_P_SYSTEMATIC:
        demo = _swap(answer, len(answer) - 2)
    elif rng.random() < SORT_P_NOISE:
        demo = _swap(answer, rng.randrange(len(answer) - 1))
    return {"prompt": format_prompt("sort: " + " ".join(items)), "chosen": " " + " ".join(answer),
            "rejected": " " + " ".join(_corrupt(rng, answer)), "response": " " + " ".join(demo)}


def sort_rows(n, rng, exclude=frozenset(), unique=False):
    """n demo rows with list lengths uniform in [SORT_MIN, SORT_MAX]; prompts in `exclude` are never
    drawn, and with unique=True none repeats (the eval split)."""
    rows, seen = [], set(exclude)
    while len(rows) < n:
        items = rng.sample(SORT_LETTERS, rng.randint(SORT_MIN, SORT_MAX))
        key = " ".join(items)
        if key in seen:
            continue
        if unique:
            seen.add(key)
        rows.append(sort_row(rng, items))
    return rows, seen


def sort_check(prompt, response):
    """Ground truth for builtin:sort: the response (EOS stripped) is the sorted list."""
    instruction = prompt.split("sort:", 1)[-1].split("\n", 1)[0]
    return response.strip().split() == sorted(instruction.split())


def load_sort(_path):
    rng = random.Random(SORT_DATA_SEED)
    evaluation, held_out = sort_rows(SORT_N_EVAL, rng, unique=True)
    train, _ = sort_rows(SORT_N_TRAIN, rng, exclude=held_out)  # eval prompts never appear in training
    return {"train": train, "eval": evaluation}


# --------------------------------------------------------------------------------------------
# Real sources. Each adapter maps one hub schema to our rows; `_load_hub` reads a hub name or a
# local folder holding that repository's files through the same adapter.
def _load_hub(path, name=None):
    import datasets
    try:
        return datasets.load_dataset(path, name) if name else datasets.load_dataset(path)
    except (ConnectionError, OSError) as e:
        if os.path.exists(path):
            raise UserError(f"--data_path {path}: could not read it as a dataset ({type(e).__name__}: {e})")
        raise UserError(f"--data_path {path}: not found locally and the Hugging Face Hub is unreachable; "
                        f"download the dataset repository and pass its folder, e.g. /data/{path}")


def _splits(ds, eval_names=("test", "validation", "eval")):
    """(train, eval) splits of a DatasetDict; a source with only `train` is divided 9:1."""
    if "train" not in ds:
        raise UserError(f"dataset has no 'train' split (has: {', '.join(ds)})")
    for name in eval_names:
        if name in ds:
            return ds["train"], ds[name]
    parts = ds["train"].train_test_split(test_size=0.1, seed=SPLIT_SEED)
    return parts["train"], parts["test"]


def _require(columns, needed, where):
    missing = [c for c in needed if c not in columns]
    if missing:
        raise UserError(f"{where}: missing column(s) {', '.join(missing)} (has: {', '.join(columns)})")


def _rows(split, fn, where, needed):
    _require(split.column_names, needed, where)
    return [r for r in (fn(x) for x in split) if r is not None]


def _row(prompt, chosen, rejected=None):
    chosen = " " + chosen.lstrip(" ")
    return {"prompt": prompt, "chosen": chosen,
            "rejected": None if rejected is None else " " + rejected.lstrip(" "), "response": chosen}


def load_rm_static(path):
    # Dahoas/rm-static: prompt ("\n\nHuman: ...\n\nAssistant:"), response, chosen, rejected.
    train, evaluation = _splits(_load_hub(path))
    fn = lambda x: _row(x["prompt"].strip(), x["chosen"], x["rejected"])  # noqa: E731
    need = ("prompt", "chosen", "rejected")
    return {"train": _rows(train, fn, path, need), "eval": _rows(evaluation, fn, path, need)}


def load_local_jsonfile(_path):
    # DeepSpeed-Chat's local/jsonfile: data/train.json and data/eval.json in the working directory,
    # each a JSON list (or JSON lines) of {"prompt", "chosen", "rejected"}; prompt is the raw request.
    out = {}
    for split, name in (("train", "data/train.json"), ("eval", "data/eval.json")):
        if not os.path.isfile(name):
            raise UserError(f"--data_path local/jsonfile: {os.path.abspath(name)} does not exist")
        with open(name) as f:
            text = f.read()
        try:
            records = json.loads(text)
        except json.JSONDecodeError:
            records = [json.loads(line) for line in text.splitlines() if line.strip()]
        if not records:
            raise UserError(f"{name}: no rows")
        _require(list(records[0]), ("prompt", "chosen"), name)
        out[split] = [_row(format_prompt(r["prompt"]), r["chosen"], r.get("rejected")) for r in records]
    return out


# name -> (loader, ground-truth checker or None). A --data_path is a key, or a folder ending in one.
SOURCES = {
    "builtin:sort": (load_sort, sort_check),
    "Dahoas/rm-static": (load_rm_static, None),
    "local/jsonfile": (load_local_jsonfile, None),
}


def resolve_source(path):
    """The SOURCES key for a --data_path: the name itself, or a local folder whose path ends with it."""
    if path in SOURCES:
        return path
    norm = os.path.normpath(path)
    for key in SOURCES:
        if norm.endswith(os.sep + os.path.normpath(key)) and os.path.isdir(norm):
            return key
    known = ", ".join(SOURCES)
    raise UserError(f"--data_path {path}: unknown dataset (known: {known}; or a local folder ending in one of them)")


def checker_for(paths):
    """The ground-truth checker shared by all sources, or None when any source has none."""
    checks = {SOURCES[resolve_source(p)][1] for p in paths}
    return checks.pop() if len(checks) == 1 else None


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
    """Indices of `n` rows that belong to `phase` (1-3): a seeded permutation cut in proportion to
    `split`. Deterministic given the seed; the three phases are disjoint and cover all rows."""
    perm = torch.randperm(n, generator=torch.Generator().manual_seed(seed)).tolist()
    total = sum(split)
    bounds = [0]
    for p in split:
        bounds.append(bounds[-1] + p)
    lo, hi = (round(n * bounds[phase - 1] / total), round(n * bounds[phase] / total))
    return sorted(perm[lo:hi])


def phase_rows(paths, split, phase, seed, need_pairs=False):
    """{"train": rows, "eval": rows} of one phase, blended over every --data_path."""
    out = {"train": [], "eval": []}
    for path in paths:
        key = resolve_source(path)
        raw = SOURCES[key][0](path)
        for part in out:
            rows = raw[part]
            if need_pairs and rows and rows[0]["rejected"] is None:
                raise UserError(f"--data_path {path}: has no chosen/rejected pairs (needed for the reward model)")
            out[part] += [rows[i] for i in phase_indices(len(rows), split, phase, seed)]
    for part, rows in out.items():
        if not rows:
            raise UserError(f"--data_path {' '.join(paths)}: no {part} rows left for phase {phase} of --data_split")
    return out


# --------------------------------------------------------------------------------------------
# Tokenisation and collation.
def encode_pair(tokenizer, prompt, response, max_len, train_on_prompt=False):
    """input_ids and labels for prompt + response + EOS, truncated to max_len. Labels are -100 on the
    prompt (unless train_on_prompt), so the loss is on the response and its EOS only."""
    p = tokenizer(prompt, add_special_tokens=True)["input_ids"]
    r = tokenizer(response, add_special_tokens=False)["input_ids"] + [tokenizer.eos_token_id]
    ids = (p + r)[:max_len]
    labels = (p if train_on_prompt else [IGNORE_INDEX] * len(p)) + r
    return {"input_ids": ids, "labels": labels[:max_len]}


def encode_prompt(tokenizer, prompt, max_len):
    """Prompt ids for generation; an over-long prompt keeps its end (where "Assistant:" is)."""
    return tokenizer(prompt, add_special_tokens=True)["input_ids"][-max_len:]


def pad(seqs, value, left=False):
    """[B, T] tensor of lists padded to the longest; left padding for generation prompts."""
    width = max(len(s) for s in seqs)
    fill = lambda s: [value] * (width - len(s)) + list(s) if left else list(s) + [value] * (width - len(s))  # noqa: E731
    return torch.tensor([fill(s) for s in seqs], dtype=torch.long)


def collate_sft(batch, pad_id):
    ids = [b["input_ids"] for b in batch]
    return {"input_ids": pad(ids, pad_id), "labels": pad([b["labels"] for b in batch], IGNORE_INDEX),
            "attention_mask": pad([[1] * len(s) for s in ids], 0)}


def collate_pairs(batch, pad_id):
    """Chosen rows first, then rejected rows, in one right-padded batch: [2B, T]."""
    ids = [b["chosen_ids"] for b in batch] + [b["rejected_ids"] for b in batch]
    return {"input_ids": pad(ids, pad_id), "attention_mask": pad([[1] * len(s) for s in ids], 0)}


def collate_prompts(batch, pad_id):
    ids = [b["prompt_ids"] for b in batch]
    return {"input_ids": pad(ids, pad_id, left=True), "attention_mask": pad([[1] * len(s) for s in ids], 0, left=True)}


def last_token_index(attention_mask):
    """Position of the last real token of each row: [B, T] -> [B]. Correct for left and right padding
    and for BOS == PAD (it reads the mask, never token ids). Where the reward model reads its score."""
    width = attention_mask.shape[1]
    return width - 1 - attention_mask.flip(1).long().argmax(1)


# --------------------------------------------------------------------------------------------
# Step 3's inputs: prompts, and text for the PPO-ptx language-model loss.
def build_prompts(args, tokenizer):
    """Phase-3 prompts (train, eval) as lists of token ids; prompts over --max_prompt_seq_len are dropped."""
    flag = "--max_prompt_seq_len + --max_answer_seq_len"
    limit = cap_seq_len(args.actor, args.max_prompt_seq_len + args.max_answer_seq_len, flag) - args.max_answer_seq_len
    if limit < 1:
        raise UserError(f"--max_answer_seq_len {args.max_answer_seq_len}: leaves no room for a prompt in the model's positions")
    rows = phase_rows(args.data_path, args.split, 3, args.seed)
    out = {}
    for part, part_rows in rows.items():
        ids = [tokenizer(r["prompt"])["input_ids"] for r in part_rows]
        keep = [i for i, x in enumerate(ids) if len(x) <= limit]
        if len(keep) < len(ids):
            print_rank0(f"data: dropped {len(ids) - len(keep)} {part} prompts longer than {limit} tokens")
        if not keep:
            raise UserError(f"--data_path {' '.join(args.data_path)}: no {part} prompts of at most {limit} tokens")
        out[part] = ([ids[i] for i in keep], [part_rows[i]["prompt"] for i in keep])
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
        texts = [r["prompt"] + r["chosen"] for r in phase_rows([name], args.split, 3, args.seed)["train"]]
    else:
        import datasets
        try:
            texts = datasets.load_dataset(name, args.unsupervised_dataset_config_name, split="train")["text"]
        except Exception as e:  # noqa: BLE001 -- any loading failure is a bad flag value
            raise UserError(f"--unsupervised_dataset_name {name}: cannot load ({type(e).__name__}: {str(e)[:120]})") from None
    ids = []
    for t in texts:
        ids += tokenizer(t, add_special_tokens=False)["input_ids"] + [tokenizer.eos_token_id]
    n = len(ids) // block
    if n == 0:
        raise UserError(f"--unsupervised_dataset_name {name}: fewer than {block} tokens of text")
    return torch.tensor(ids[:n * block]).view(n, block)


# --------------------------------------------------------------------------------------------
# Responses and sharding: shared by evaluation and PPO.
def cut_at_eos(tokens, eos_id):
    """Token list up to (not including) the first EOS."""
    return tokens[:tokens.index(eos_id)] if eos_id in tokens else tokens


def rank_batches(n, batch_size):
    """This rank's share of range(n) as lists of indices, `batch_size` at a time. Every rank gets the
    same number of batches, since ZeRO-3 ranks gather parameters together in each forward; a rank with
    nothing left gets [] (callers run a dummy item and drop its result)."""
    mine = list(range(rank(), n, world_size()))
    calls = math.ceil(math.ceil(n / world_size()) / batch_size)
    return [mine[c * batch_size:(c + 1) * batch_size] for c in range(calls)]


# --------------------------------------------------------------------------------------------
# The tokenised cache: a datasets folder keyed by a hash of the rows themselves plus everything
# else that changes the tokens (tokenizer, EOS, PAD, lengths, template), so edited files rebuild it.
def cache_key(rows, tokenizer, **settings):
    h = hashlib.sha256()
    for part in sorted(rows):
        for r in rows[part]:
            h.update(json.dumps(r, sort_keys=True).encode())
    h.update(json.dumps({"tokenizer": tokenizer.name_or_path, "vocab": len(tokenizer), "eos": tokenizer.eos_token_id,
                         "pad": tokenizer.pad_token_id, "bos": tokenizer.bos_token_id, "template": PROMPT_TEMPLATE,
                         "version": CACHE_VERSION, "settings": settings}, sort_keys=True, default=str).encode())
    return h.hexdigest()[:16]


def build_cached(name, rows, tokenizer, cache_dir, encode, **settings):
    """{"train": Dataset, "eval": Dataset} of encode(row) for every row, from cache_dir/<name>-<key>;
    rank 0 builds it while the other ranks wait, then all read it."""
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
