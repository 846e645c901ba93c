"""Built-in stand-ins for what a user downloads from the hub, made by the project itself so that
everything runs offline: tiny:<model_type> models (one per supported family) and the builtin:sort
demo dataset. data.py and common.py turn them into rows and models like any other source; this
module imports nothing of ours."""

import math
import os
import random
import re
import shutil

import torch

# --------------------------------------------------------------------------------------------
# Tiny models: tiny:<model_type> is a random model of that family with a byte-level tokenizer
# (any UTF-8 text, PAD != EOS), written once as a standard HF folder so every later code path
# (from_pretrained, save, reload) is the one a hub model takes.
_D, _L, _H, _FF, _POS = 128, 3, 4, 512, 256
TINY_LAYERS = _L
_GPT = dict(
    n_embd=_D, n_layer=_L, n_head=_H, n_inner=_FF, n_positions=_POS, resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0
)
_LLAMA = dict(
    hidden_size=_D,
    num_hidden_layers=_L,
    num_attention_heads=_H,
    num_key_value_heads=2,
    intermediate_size=_FF // 2,
    max_position_embeddings=_POS,
)
TINY_FAMILIES = {
    # the demo model: 16 heads of 8 dims. Judging "the input, sorted" needs many attention lookups (is each answer
    # letter in the prompt?): with 4 heads the reward model stalls near 0.9 pairwise accuracy, with 16 it passes
    # 0.99, for 15% more time per step (README, "The built-in demo"). The list tasks are lookups, not features: an MLP
    # of 2x the width (not 4x) is ~1.5x faster on a CPU, and step 1 leaves its loss plateau sooner (issue 27).
    "gpt2": {**_GPT, "n_head": 16, "n_inner": 2 * _D},
    "gptj": {**_GPT, "rotary_dim": 16},
    "codegen": {**_GPT, "rotary_dim": 16, "n_ctx": _POS},
    "opt": dict(
        hidden_size=_D,
        num_hidden_layers=_L,
        num_attention_heads=_H,
        ffn_dim=_FF,
        max_position_embeddings=_POS,
        word_embed_proj_dim=_D // 2,
        dropout=0.0,
        attention_dropout=0.0,
    ),  # as opt-350m
    "llama": _LLAMA,
    "mistral": {**_LLAMA, "sliding_window": None},
    "qwen2": _LLAMA,
    "gpt_neox": dict(
        hidden_size=_D,
        num_hidden_layers=_L,
        num_attention_heads=_H,
        intermediate_size=_FF,
        max_position_embeddings=_POS,
        hidden_dropout=0.0,
        attention_dropout=0.0,
    ),
    "bloom": dict(hidden_size=_D, n_layer=_L, n_head=_H, hidden_dropout=0.0, attention_dropout=0.0),
    "gpt_neo": dict(
        hidden_size=_D,
        num_layers=_L,
        num_heads=_H,
        intermediate_size=_FF,
        max_position_embeddings=_POS,
        window_size=_POS,
        attention_types=[[["global", "local"], 1], [["global"], 1]],
        resid_dropout=0.0,
        embed_dropout=0.0,
        attention_dropout=0.0,
    ),
}
TINY_VERSION = 4
# The demo's recipe: what train.py passes each stage for a tiny:<family> model. The stages' own defaults are for real
# pretrained models (DeepSpeed-Chat's single-GPU OPT-1.3B values: learning rates near 1e-5, one epoch, 256-token
# answers); a random 0.5M-parameter model learns the demo in minutes only at these (README, "Results on the demo").
DEMO_RECIPE = {
    "sft.py": "--learning_rate 5e-4 --num_train_epochs 20 --per_device_train_batch_size 8",
    "reward.py": "--learning_rate 5e-4 --num_train_epochs 2 --per_device_train_batch_size 8 "
    "--per_device_eval_batch_size 32",
    "ppo.py": "--actor_learning_rate 1e-4 --critic_learning_rate 1e-4 --max_answer_seq_len 64 "
    "--per_device_generation_batch_size 64 --per_device_training_batch_size 32",
    "dpo.py": "--learning_rate 1e-4 --per_device_train_batch_size 16 --per_device_eval_batch_size 32",
}


# Random models of other sizes, for benchmarks: tiny:<type>@hidden=512,layers=8 (keys below), or a named shape.
TINY_SIZE_KEYS = {"hidden": "hidden_size", "layers": "num_hidden_layers", "heads": "num_attention_heads",
                  "kv_heads": "num_key_value_heads", "ffn": None, "positions": "max_position_embeddings",
                  "proj": "word_embed_proj_dim"}  # fmt: skip
TINY_SHAPES = {  # the layer/width of the OPT models DeepSpeed-Chat benchmarks (Zhang et al. 2022, table 1)
    "opt-125m": "opt@hidden=768,layers=12,heads=12,ffn=3072,positions=2048",
    "opt-350m": "opt@hidden=1024,layers=24,heads=16,ffn=4096,positions=2048,proj=512",
    "opt-1.3b": "opt@hidden=2048,layers=24,heads=32,ffn=8192,positions=2048",
}


def tiny_config(spec):
    """(model_type, config overrides) of tiny:<spec>: "llama", "opt@hidden=512,layers=8" or "opt-350m";
    ValueError naming what is wrong."""
    model_type, _, sizes = TINY_SHAPES.get(spec, spec).partition("@")
    if model_type not in TINY_FAMILIES:
        raise ValueError(f"unknown tiny model type {model_type!r} (known: {', '.join(TINY_FAMILIES)}, or a shape: "
                         f"{', '.join(TINY_SHAPES)})")  # fmt: skip
    kw = dict(TINY_FAMILIES[model_type])
    for item in filter(None, sizes.split(",")):
        key, _, value = item.partition("=")
        if key not in TINY_SIZE_KEYS or not value.isdigit():
            raise ValueError(f"bad size {item!r} (expected key=integer, keys: {', '.join(TINY_SIZE_KEYS)})")
        ffn = {"gpt2": "n_inner", "gptj": "n_inner", "codegen": "n_inner", "opt": "ffn_dim"}.get(model_type)
        kw[TINY_SIZE_KEYS[key] or ffn or "intermediate_size"] = int(value)
    if model_type == "opt" and "hidden=" in sizes and "proj=" not in sizes:
        kw["word_embed_proj_dim"] = kw["hidden_size"]  # no projection, as opt-125m and opt-1.3b
    for own, generic in _OWN_NAMES:  # a family's own config names (GPT-2's n_embd, ...): the given size wins
        if own in kw and generic in kw:
            kw[own] = kw.pop(generic)
    return model_type, kw


_OWN_NAMES = [("n_embd", "hidden_size"), ("n_layer", "num_hidden_layers"), ("n_head", "num_attention_heads"),
              ("n_positions", "max_position_embeddings"), ("num_layers", "num_hidden_layers"),
              ("num_heads", "num_attention_heads")]  # fmt: skip


def byte_tokenizer():
    """Byte-level BPE with no merges: 256 byte tokens plus <|pad|> (0) and <|endoftext|> (1, EOS)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {"<|pad|>": 0, "<|endoftext|>": 1}
    for ch in sorted(pre_tokenizers.ByteLevel.alphabet(), key=ord):
        vocab[ch] = len(vocab)
    tok = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    tok.decoder = decoders.ByteLevel()
    return PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<|endoftext|>", pad_token="<|pad|>")


def cache_dir():
    """Where tiny models and tokenised data caches live: $MINIRLHF_CACHE or ~/.cache/minirlhf."""
    return os.environ.get("MINIRLHF_CACHE", os.path.join(os.path.expanduser("~"), ".cache", "minirlhf"))


def tiny_model_path(model_type):
    """Folder of tiny:<model_type>, created (deterministically) on first use."""
    import torch.distributed as dist

    path = os.path.join(
        cache_dir(), f"tiny-{model_type.replace('@', '-').replace('=', '').replace(',', '-')}-v{TINY_VERSION}"
    )
    # under torch.distributed, transformers writes weights on rank 0 only: rank 0 builds, the rest wait
    distributed = dist.is_initialized()
    if not os.path.isfile(os.path.join(path, "config.json")) and (not distributed or dist.get_rank() == 0):
        _write_tiny_model(model_type, path)
    if distributed:
        dist.barrier()
    return path


def _write_tiny_model(spec, path):
    from transformers import AutoConfig, AutoModelForCausalLM

    tokenizer = byte_tokenizer()
    vocab = 8 * math.ceil(len(tokenizer) / 8)
    model_type, kw = tiny_config(spec)
    config = AutoConfig.for_model(model_type, vocab_size=vocab, pad_token_id=0, bos_token_id=1, eos_token_id=1, **kw)
    state = torch.random.get_rng_state()
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(config)
    torch.random.set_rng_state(state)
    tmp = f"{path}.tmp{os.getpid()}"
    model.save_pretrained(tmp)
    tokenizer.save_pretrained(tmp)
    try:
        os.replace(tmp, path)
    except OSError:  # another job created it first; both are identical
        shutil.rmtree(tmp, ignore_errors=True)


# --------------------------------------------------------------------------------------------
# builtin:sort, the demo dataset: "sort: d b a c" -> "a b c d" (data.py puts it in the prompt template).
# It is built to show why RLHF exists: the demonstrations (step 1) are imperfect in a systematic
# way -- on lists of SORT_LONG or more letters the demonstrator swaps the last two items most of
# the time -- plus some random noise, so imitation plateaus; the preference pairs (step 2) are
# right (correct answer chosen, a corrupted one rejected), so steps 2-3 can fix what step 1 copied.
SORT_LETTERS = "abcdefghijklmnop"
SORT_MIN, SORT_MAX, SORT_LONG = 3, 6, 5
SORT_P_SYSTEMATIC = 0.8  # chance a long-list demonstration has its last two items swapped (at 0.6 a tiny model
# blends the two modes into a letter between them, " b e i o o" for " b e i n p", an answer no pair ever showed the RM)
SORT_P_NOISE = 0.1  # chance any demonstration has two random adjacent items swapped
SORT_N_TRAIN, SORT_N_EVAL = 18000, 1000  # split 2,4,4: 3600 demonstrations, 7200 pairs, 7200 prompts; 22000
# would take python train.py past 8 minutes at step 1's micro-batch 8 (scaled), 15000 left the RM at 0.9375 (README)
SORT_DATA_SEED = 0  # the demo is a fixed dataset, like a hub one; --seed only drives the split


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


def sort_example(rng, items):
    """{"prompt", "chosen", "rejected", "response"} texts of one list: the instruction, the right answer, a
    corrupted one, and the (imperfect) demonstration."""
    answer = sorted(items)
    demo = answer
    if len(items) >= SORT_LONG and rng.random() < SORT_P_SYSTEMATIC:
        demo = _swap(answer, len(answer) - 2)
    elif rng.random() < SORT_P_NOISE:
        demo = _swap(answer, rng.randrange(len(answer) - 1))
    return {
        "prompt": "sort: " + " ".join(items),
        "chosen": " ".join(answer),
        "rejected": " ".join(_corrupt(rng, answer)),
        "response": " ".join(demo),
    }


def sort_examples(n, rng, exclude=frozenset(), unique=False):
    """n demo examples with list lengths uniform in [SORT_MIN, SORT_MAX]; prompts in `exclude` are never
    drawn, and with unique=True none repeats (the eval split)."""
    rows, seen = [], set(exclude)
    while len(rows) < n:
        items = rng.sample(SORT_LETTERS, rng.randint(SORT_MIN, SORT_MAX))
        key = " ".join(items)
        if key in seen:
            continue
        if unique:
            seen.add(key)
        rows.append(sort_example(rng, items))
    return rows, seen


SORT_ERROR_KINDS = ("last_two_swapped", "adjacent_swap", "replaced_letter", "dropped_letter", "added_letter")


def sort_error_kind(prompt, chosen, rejected):
    """Which of _corrupt's kinds of error `rejected` makes, read off the two answers (so any row of this task
    can be classified): step 2 reports pairwise accuracy per kind."""
    right, wrong = chosen.split(), rejected.split()
    if len(wrong) != len(right):
        return "dropped_letter" if len(wrong) < len(right) else "added_letter"
    if sorted(wrong) != sorted(right):
        return "replaced_letter"
    differ = [i for i, (x, y) in enumerate(zip(right, wrong)) if x != y]
    return "last_two_swapped" if differ == [len(right) - 2, len(right) - 1] else "adjacent_swap"


def sort_items(prompt):
    """The letters after "sort:" in a prompt of any template, or None."""
    items = re.search(r"sort:((?: [a-z])+)", prompt)
    return None if items is None else items.group(1).split()


def sort_check(prompt, response):
    """Ground truth for builtin:sort: the response (EOS stripped) is the sorted list."""
    items = sort_items(prompt)
    return items is not None and response.strip().split() == sorted(items)


def sort_systematic(prompt):
    """True for the lists on which the demonstrator makes its systematic error (SORT_LONG letters or more)."""
    return len(sort_items(prompt) or []) >= SORT_LONG


def sort_dataset():
    """{"train": examples, "eval": examples}: SORT_N_TRAIN / SORT_N_EVAL of them, always the same."""
    rng = random.Random(SORT_DATA_SEED)
    evaluation, held_out = sort_examples(SORT_N_EVAL, rng, unique=True)
    train, _ = sort_examples(SORT_N_TRAIN, rng, exclude=held_out)  # eval prompts never appear in training
    return {"train": train, "eval": evaluation}
