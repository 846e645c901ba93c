"""Datasets, the prompt template, the 3-phase split and tokenisation: everything that must agree
across the three stages lives here, once.

Conventions (used by sft.py, reward.py and ppo.py):
- A row is {"prompt", "chosen", "rejected", "response"}: `prompt` is the formatted dialogue ending in "Assistant:",
  `chosen`/`rejected` the preferred and dispreferred responses (rejected is None for SFT-only sources), `response`
  the step-1 demonstration (defaults to chosen).
- Responses start with a space; the tokenizer's EOS is appended to every response.
- Mask convention: attention_mask is 1 on real tokens, 0 on padding; labels are -100 where no loss is taken.
  Training batches are right-padded, generation prompts left-padded; models.last_token_index works for both.
"""

import hashlib
import json
import math
import os
import re

import torch

import sources
from common import UserError, barrier, local_rank, print_rank0, rank, world_size
from models import cap_seq_len

# DeepSpeed-Chat's "Human: ... Assistant:" dialogue form (Dahoas/rm-static's own layout).
PROMPT_TEMPLATE = "Human: {instruction}\n\nAssistant:"
IGNORE_INDEX = -100
CACHE_VERSION = 3  # bump when tokenisation changes so old caches are not reused


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
    """A row from a source's prompt (an instruction or a dialogue) and responses (None: a prompt-only row, which only
    step 3 uses); None (the example is dropped) when the prompt is missing or does not end with the user."""
    if not prompt or not prompt.strip():
        return None
    messages = dialogue(prompt)
    if messages[-1]["role"] != "user" or not messages[-1]["content"]:
        return None
    text = lambda t: " " + t.strip() if t and t.strip() else None
    chosen, rejected = text(chosen), text(chosen) and text(rejected)
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


def load_source(path):
    """{"train": rows, "eval": rows} of one --data_path, through its adapter (sources.py)."""
    out, dropped = {}, 0
    for part, (where, examples) in sources.read(path).items():
        rows = [make_row(*t[:3]) if t else None for t in examples]
        rows = [{**r, "response": " " + t[3]} if r and len(t) > 3 else r for r, t in zip(rows, examples)]
        out[part] = [r for r in rows if r]
        dropped += len(rows) - len(out[part])
        if not out[part]:
            raise UserError(f"{where}: no usable {part} rows (all {len(rows)} lack a prompt)")
    if dropped:
        print_rank0(f"data: {path}: dropped {dropped} examples without a usable prompt (or with tied scores)")
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


NEEDS = {"prompt": (), "response": ("response",), "pairs": ("chosen", "rejected")}  # what each step's rows must have


def phase_rows(paths, split, phase, seed, need="response", chat_tokenizer=None):
    """{"train": rows, "eval": rows} of one phase, blended over every --data_path, keeping the rows that have what
    `need` says (NEEDS: step 1 a response, step 2 pairs, step 3 a prompt; filtered after the split, so the phases stay
    disjoint); with chat_tokenizer rendered in its chat template (--chat_template)."""
    out = {"train": [], "eval": []}
    for path in paths:
        raw = load_source(path)
        for part in out:
            rows = [raw[part][i] for i in phase_indices(len(raw[part]), split, phase, seed)]
            kept = [r for r in rows if all(r[k] is not None for k in NEEDS[need])]
            if rows and not kept:
                what = "chosen/rejected pairs (needed for the reward model)" if need == "pairs" else "responses"
                raise UserError(f"--data_path {path}: its phase-{phase} {part} rows have no {what}")
            out[part] += kept
    for part, rows in out.items():
        if not rows:
            raise UserError(f"--data_path {' '.join(paths)}: no {part} rows left for phase {phase} of --data_split")
        if chat_tokenizer is not None:
            out[part] = apply_chat_template(rows, chat_tokenizer)
    return out


# --------------------------------------------------------------------------------------------
# Tokenisation and collation.
def encode_prompt(tokenizer, prompt, max_len=None):
    """Prompt ids with the tokenizer's specials (a BOS) but never ending in EOS: a post-processor that closes every
    text (BERT's [CLS] ... [SEP], with [SEP] as EOS) would end the dialogue before the answer. An over-long prompt
    keeps its end (where "Assistant:" is) and its BOS."""
    ids = tokenizer(prompt, add_special_tokens=True)["input_ids"]
    ids = ids[:-1] if ids and ids[-1] == tokenizer.eos_token_id else ids
    if max_len is None or len(ids) <= max_len:
        return ids
    bos = ids[:1] if ids[0] == tokenizer.bos_token_id else []
    return bos + ids[len(ids) - max_len + len(bos) :]


def encode_response(tokenizer, prompt_ids, prompt, response):
    """Response ids + EOS as they follow the prompt: tokenised in context, so that a SentencePiece tokenizer (Llama-2,
    Mistral) gives the first word its own "▁word" token (alone, " a" starts with a lone "▁" never seen in context);
    alone only if the prompt's tokens change at the boundary."""
    full = encode_prompt(tokenizer, prompt + response)
    fits = full[: len(prompt_ids)] == prompt_ids
    ids = full[len(prompt_ids) :] if fits else tokenizer(response, add_special_tokens=False)["input_ids"]
    return ids + [tokenizer.eos_token_id]


def encode_row(tokenizer, prompt, responses, max_len, train_on_prompt=False):
    """[{"input_ids", "labels"}] of prompt + each response + EOS, one prompt for all (a pair shares its context), and
    whether the prompt was cut; labels -100 on the prompt unless train_on_prompt. A row too long for max_len keeps its
    responses whole with their EOS (where the reward model reads its score, where the policy learns to stop) and the
    end of its prompt (cutting from the right, as DeepSpeed-Chat does, loses a long answer's EOS and makes a pair with
    a long prompt identical); it is dropped (None) when that leaves the prompt less than a quarter of max_len."""
    p = encode_prompt(tokenizer, prompt)
    rs = [encode_response(tokenizer, p, prompt, r) for r in responses]
    room = max_len - max(len(r) for r in rs)
    if room < min(len(p), max_len // 4 or 1):
        return None
    cut, p = len(p) > room, encode_prompt(tokenizer, prompt, room)
    head = p if train_on_prompt else [IGNORE_INDEX] * len(p)
    return [{"input_ids": p + r, "labels": head + r} for r in rs], cut


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


def prompt_batch(prompts, idx, pad_id):
    """Prompts idx of a build_prompts split: token ids left-padded for generation, and their instructions."""
    batch = collate_prompts([prompts["ids"][i] for i in idx], pad_id)
    return {**batch, "instructions": [prompts["instructions"][i] for i in idx]}


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
    rows = phase_rows(args.data_path, args.split, 3, args.seed, need="prompt", chat_tokenizer=chat)
    out = {}
    for part, part_rows in rows.items():
        ids = [encode_prompt(tokenizer, r["prompt"]) for r in part_rows]
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
        key = sources.resolve_source(name)
    except UserError:
        key = None
    if key is not None:  # one of our sources: its phase-3 train prompts and chosen responses as text
        chat = tokenizer if args.chat_template else None
        texts = [
            r["prompt"] + r["chosen"] for r in phase_rows([name], args.split, 3, args.seed, "response", chat)["train"]
        ]
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
def decode_answer(tokenizer, tokens):
    """A generated response's text: its tokens (a list) up to, not including, the first EOS; special tokens dropped."""
    eos = tokenizer.eos_token_id
    return tokenizer.decode(tokens[: tokens.index(eos)] if eos in tokens else tokens, skip_special_tokens=True)


def rank_batches(n, batch_size):
    """This rank's share of range(n), `batch_size` indices at a time. Every rank gets the same number of batches (ZeRO-3
    ranks gather parameters together in each forward); a rank with nothing left gets [] (callers run a dummy item)."""
    mine = list(range(rank(), n, world_size()))
    calls = math.ceil(math.ceil(n / world_size()) / batch_size)
    return [mine[c * batch_size : (c + 1) * batch_size] for c in range(calls)]


def eval_batches(dataset, batch_size, collate):
    """This rank's share of an eval set, each row once (a DistributedSampler repeats rows to even the ranks out, which
    biases the metrics): (batch, n real rows); a rank with none left gets a dummy batch (n = 0), so that ZeRO-3 ranks
    still forward together."""
    for idx in rank_batches(len(dataset), batch_size):
        yield collate([dataset[i] for i in idx or [0]]), len(idx)


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
    """{"train", "eval"} Datasets of encode(row) for every row (None: dropped; a "cut" key: its prompt was cut), from
    cache_dir/<name>-<key>, built by each node's first rank (others wait: a node may not share the filesystem)."""
    import datasets

    folder = os.path.join(cache_dir, f"{name}-{cache_key(rows, tokenizer, **settings)}")
    if local_rank() == 0 and not os.path.isdir(folder):
        tmp, parts, counts = f"{folder}.tmp{os.getpid()}", {}, {}
        for part, part_rows in rows.items():
            parts[part] = [e for e in map(encode, part_rows) if e is not None]
            counts[part] = [len(part_rows) - len(parts[part]), sum(e.pop("cut", False) for e in parts[part])]
        if all(parts.values()):
            datasets.DatasetDict({k: datasets.Dataset.from_list(v) for k, v in parts.items()}).save_to_disk(tmp)
        os.makedirs(tmp, exist_ok=True)
        with open(os.path.join(tmp, "counts.json"), "w") as f:
            json.dump({part: [*counts[part], len(rows[part])] for part in rows}, f)
        if not os.path.exists(folder):  # another job may have built it meanwhile
            os.replace(tmp, folder)
        print_rank0(f"data: cached {name} at {folder}")
    barrier()
    for part, (dropped, cut, n) in json.load(open(os.path.join(folder, "counts.json"))).items():
        if dropped == n:
            why = f"every {part} row's response + EOS leaves its prompt less than a quarter of it"
            raise UserError(f"--max_seq_len {settings.get('max_seq_len')}: no {name} row fits ({why})")
        if dropped or cut:
            what = f"{dropped} dropped (response + EOS leaves the prompt < max_len / 4), {cut} prompts cut to their end"
            print_rank0(f"data: {name} {part}: {what}, of {n} rows")
    out = datasets.load_from_disk(folder)
    return {k: out[k] for k in out}
