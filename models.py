"""How a model and its tokenizer load, once for every stage: a hub name, a local folder or tiny:<model_type>
(builtin.py), in fp32 with a generation config of our own, the tokenizer's EOS and PAD settled; and the reward model
(step 2; step 3's reward model and critic): a backbone + v_head, read at the last real token (DeepSpeed-Chat's
model_utils.py and reward_model.py)."""

import importlib
import inspect
import json
import math
import os

import torch
import torch.nn as nn
import torch.nn.functional as F

import builtin
import qlora
from common import UserError, full_state_dict, print_rank0, save_hf


def check_model_path(name, flag="--model_name_or_path"):  # tiny:<type>, a folder with config.json, or a hub name
    if name.startswith("tiny:"):
        try:
            builtin.tiny_config(name[5:])
        except ValueError as e:
            raise UserError(f"{flag} {name}: {e}") from None
    elif os.path.isdir(name):
        if not os.path.isfile(os.path.join(name, "config.json")):
            raise UserError(f"{flag} {name}: folder has no config.json (not a Hugging Face model folder)")
    elif os.path.exists(name) or name.startswith(("/", "./", "../")) or name.count("/") > 1:
        raise UserError(f"{flag} {name}: no such model folder")
    else:
        from transformers import AutoConfig

        try:
            AutoConfig.from_pretrained(name)
        except (OSError, ValueError) as e:
            why = f"not a local folder and not loadable from the Hugging Face Hub ({str(e).splitlines()[0][:160]})"
            raise UserError(f"{flag} {name}: {why}") from None


def resolve_model(name):
    return builtin.tiny_model_path(name[5:]) if name.startswith("tiny:") else name


def load_tokenizer(name, flag="--model_name_or_path", chat_template=False, eos_token=None, add_eos=False):
    """The model's tokenizer with a PAD distinct from EOS (added if missing): padding never hides a response's end.
    EOS is the token that ends a response: --eos_token (add_eos: added if missing), or with --chat_template the
    template's end of turn (<|im_end|>, <|eot_id|>: many tokenizers name another EOS), so that training, generation
    and scoring agree; the tokenizer saved with each stage's output carries it to the next."""
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(resolve_model(name))
    end = eos_token or (end_of_turn(tokenizer) if chat_template else None)
    if end is not None and end != tokenizer.eos_token:
        if tokenizer.convert_tokens_to_ids(end) in (None, tokenizer.unk_token_id) and add_eos:
            tokenizer.add_special_tokens({"additional_special_tokens": [end]})
        if tokenizer.convert_tokens_to_ids(end) in (None, tokenizer.unk_token_id):
            raise UserError(f"--eos_token {end}: not a token of {name}'s tokenizer")
        print_rank0(f"note: responses end with {end!r} (the tokenizer's EOS was {tokenizer.eos_token!r})")
        tokenizer.eos_token = end
    if tokenizer.eos_token_id is None:
        why = "its tokenizer has no EOS token, so responses cannot end; set eos_token in tokenizer_config.json"
        raise UserError(f"{flag} {name}: {why}")
    if tokenizer.pad_token_id is None or tokenizer.pad_token_id == tokenizer.eos_token_id:
        tokenizer.add_special_tokens({"pad_token": "<|pad|>"})
    return tokenizer


def end_of_turn(tokenizer):
    """The special token that closes an assistant turn in the tokenizer's chat template, or None."""
    turns = [{"role": "user", "content": "?"}, {"role": "assistant", "content": "MARK"}]
    try:
        text = tokenizer.apply_chat_template(turns, tokenize=False)
    except Exception:  # no template, or one that rejects this dialogue: the tokenizer's own EOS stays
        return None
    special = {i for i, t in tokenizer.added_tokens_decoder.items() if t.special}
    tail = tokenizer(text[text.rindex("MARK") + 4 :], add_special_tokens=False)["input_ids"]
    return next((tokenizer.convert_ids_to_tokens(i) for i in tail if i in special), None)


_DROPOUT_KEYS = ("dropout attention_dropout hidden_dropout activation_dropout resid_pdrop embd_pdrop attn_pdrop "
                 "resid_dropout embed_dropout summary_first_dropout").split()  # fmt: skip


def load_model(name, tokenizer, auto_class="AutoModelForCausalLM", dropout=None, zero_stage=0, ds_cfg=None, quant=None):
    """The model in fp32 whatever its checkpoint's dtype (hub models ship bf16/fp16; DeepSpeed casts to --dtype, keeping
    fp32 master weights), embeddings fit to the tokenizer, dropouts set; ZeRO-3 shards it as it loads (zero.Init).
    Its generation config is ours alone: a hub repetition_penalty or no_repeat_ngram_size would make samples another
    policy than the log-probs. quant (type, dtype), e.g. ("nf4", "bf16"): linear layers in 4 bits (bitsandbytes)."""
    import transformers

    path = resolve_model(name)
    config = transformers.AutoConfig.from_pretrained(path)
    for key in _DROPOUT_KEYS if dropout is not None else []:
        if hasattr(config, key):
            setattr(config, key, dropout)
    sharded = None  # under ZeRO-3 the weights are sharded as they load, while this object lives
    if zero_stage == 3 and ds_cfg is not None:  # (imported here: transformers' deepspeed module imports DeepSpeed)
        sharded = importlib.import_module("transformers.integrations").HfDeepSpeedConfig(ds_cfg)
    kwargs = qlora.load_kwargs(*quant) if quant else {"dtype": torch.float32}
    model = getattr(transformers, auto_class).from_pretrained(path, config=config, **kwargs)
    if quant:
        qlora.prepare(model, getattr(transformers, auto_class), config)
    if len(tokenizer) > model.get_input_embeddings().num_embeddings:
        model.resize_token_embeddings(8 * math.ceil(len(tokenizer) / 8))
    model.config.pad_token_id, model.config.eos_token_id = tokenizer.pad_token_id, tokenizer.eos_token_id
    if model.can_generate():  # only these; generate() calls pass temperature, top_p, top_k themselves
        ids = dict(pad_token_id=tokenizer.pad_token_id, eos_token_id=tokenizer.eos_token_id)
        model.generation_config = transformers.GenerationConfig(bos_token_id=tokenizer.bos_token_id, **ids)
    del sharded
    return model


def cap_seq_len(name, max_seq_len, flag="--max_seq_len"):  # capped at the model's positions, with a note
    from transformers import AutoConfig

    config = AutoConfig.from_pretrained(resolve_model(name))
    keys = ("max_position_embeddings", "n_positions", "seq_length")
    limit = next((getattr(config, k) for k in keys if getattr(config, k, None)), None)
    if limit and max_seq_len > limit:
        print_rank0(f"note: {flag} {max_seq_len} capped at the model's {limit} positions")
        return limit
    return max_seq_len


# ----------------------------------------------------------------------------------------------------------------------
# The reward model (step 2; step 3's reward model and critic): a backbone + v_head, read at the last real token.
def position_inputs(model, attention_mask):
    """position_ids counted over real tokens (as `generate` does): left padding changes nothing. {} if not taken."""
    if "position_ids" not in inspect.signature(model.forward).parameters:
        return {}  # e.g. BLOOM: ALiBi reads the attention mask itself
    return {"position_ids": (attention_mask.long().cumsum(1) - 1).clamp(min=0)}


def response_mask(response, eos_id):
    """1 up to and including the first EOS, 0 after it: [B, Tr] -> [B, Tr]. The EOS is an action: the policy learns
    to stop."""
    is_eos = (response == eos_id).long()
    return ((is_eos.cumsum(1) - is_eos) == 0).long()


def response_logits(model, seq, attn, query_len):
    """Logits that predict each response token: [B, Tq + Tr, V] -> [B, Tr, V]. Position t predicts token t + 1, so the
    logits for response tokens Tq .. Tq + Tr - 1 sit at positions Tq - 1 .. Tq + Tr - 2. Positions are counted over
    real tokens, as generate() counts them: left padding changes nothing."""
    pos = position_inputs(getattr(model, "module", model), attn)  # a DeepSpeed engine's forward takes **kwargs
    return model(input_ids=seq, attention_mask=attn, use_cache=False, **pos).logits[:, query_len - 1 : -1]


def last_token_index(attention_mask):  # [B, T] -> [B]; from the mask, never token ids: any padding side, BOS == PAD
    """Where the reward model reads its score: the last real token of each row."""
    return attention_mask.shape[1] - 1 - attention_mask.flip(1).long().argmax(1)


def end_scores(values, attention_mask):
    """The sequence score: values at the last real token (the EOS of a finished answer). [B, T], [B, T] -> [B]."""
    return values.gather(1, last_token_index(attention_mask).unsqueeze(1)).squeeze(1)


class RewardModel(nn.Module):
    """Backbone (transformers AutoModel) + v_head: Linear(hidden, 1), init N(0, 1/sqrt(hidden+1))."""

    def __init__(self, backbone):
        super().__init__()
        self.backbone, self.config = backbone, backbone.config
        hidden = getattr(self.config, "word_embed_proj_dim", None) or self.config.hidden_size  # OPT projects its output
        self.v_head = nn.Linear(hidden, 1)
        nn.init.normal_(self.v_head.weight, std=1 / math.sqrt(hidden + 1))
        nn.init.zeros_(self.v_head.bias)
        # in the backbone's dtype: ZeRO-3 loads the backbone already cast to --dtype, and shards one dtype per model
        self.v_head.to(backbone.get_input_embeddings().weight.dtype)

    def forward(self, input_ids, attention_mask):  # per-token values [B, T], fp32
        pos = position_inputs(self.backbone, attention_mask)
        h = self.backbone(input_ids=input_ids, attention_mask=attention_mask, use_cache=False, **pos).last_hidden_state
        return self.v_head(h).squeeze(-1).float()  # [B, T, H] -> [B, T]

    def score(self, input_ids, attention_mask):
        return end_scores(self(input_ids, attention_mask), attention_mask)


def load_reward_model(name, tokenizer, dropout=None, zero_stage=0, ds_cfg=None, quant=None, standardise=False):
    """(RewardModel, {"score_mean", "score_std"} or None) from a step-2 folder, or any LM with a fresh v_head.
    standardise: fold (score - score_mean) / score_std into v_head, for step 3's critic under --normalize_reward, as
    OpenRLHF's critic standardises its values. Left raw (a std of 14.5 on a list task), the critic's first values are
    off by several rewards and the final tokens' advantages point the wrong way (a right answer scored +5 raw, 0
    standardised: A = 0 - 5 < 0) until it has re-learned its scale (README, "Where the defaults stop")."""
    from safetensors import safe_open
    from transformers.utils import logging as hf_logging

    verbosity = hf_logging.get_verbosity()
    hf_logging.set_verbosity_error()  # v_head.* are "unexpected" to AutoModel: we load them below
    try:
        model = RewardModel(load_model(name, tokenizer, "AutoModel", dropout, zero_stage, ds_cfg, quant))
    finally:
        hf_logging.set_verbosity(verbosity)
    folder = resolve_model(name)
    index = os.path.join(folder, "model.safetensors.index.json")  # sharded: find the file holding v_head
    files = [json.load(open(index))["weight_map"].get("v_head.weight")] if os.path.isfile(index) else []
    files = files or ["model.safetensors"]
    for file in (f for f in files if f and os.path.isfile(os.path.join(folder, f))):
        with safe_open(os.path.join(folder, file), "pt") as f:
            if "v_head.weight" in f.keys():
                model.v_head.load_state_dict({k: f.get_tensor(f"v_head.{k}") for k in ("weight", "bias")})
    stats = {k: getattr(model.config, k, None) for k in ("score_mean", "score_std")}
    if standardise and stats["score_mean"] is not None:
        std = max(stats["score_std"], 1e-6)  # as ppo.shape_scores divides the rewards
        with torch.no_grad():
            model.v_head.weight.div_(std)
            model.v_head.bias.sub_(stats["score_mean"]).div_(std)
    return model, (stats if stats["score_mean"] is not None else None)


def save_reward_model(model, tokenizer, output_dir, json_files, stats=None):
    """HF folder of the backbone whose weights also hold v_head.*; collective under ZeRO-3."""
    sd = full_state_dict(model)
    if sd is not None:
        sd = {k.removeprefix("backbone."): v for k, v in sd.items()}
        model.backbone.config.architectures = [type(model.backbone).__name__]
        for k, v in (stats or {}).items():
            setattr(model.backbone.config, k, v)
    save_hf(model.backbone, tokenizer, output_dir, json_files, sd, gathered=True)


# ----------------------------------------------------------------------------------------------------------------------
# What a causal LM's logits say, in fp32 one sequence at a time: the log-probs, entropy and KL that steps 3 and DPO
# compute.
def by_row(fn, *tensors):
    """fn over one batch row at a time, stacked: the fp32 log-softmax of a [T, V] row, never of the whole [B, T, V]
    batch (64 x 320 tokens of a 128k vocabulary is 10 GB in fp32)."""
    return torch.stack([fn(*row) for row in zip(*tensors)])


def logprobs_from_logits(logits, labels, temperature=1.0):
    """log pi(label) under softmax(logits / temperature), in fp32: logits [B, T, V], labels [B, T] -> [B, T]."""
    logp = lambda x, y: F.log_softmax(x.float() / temperature, -1).gather(-1, y.unsqueeze(-1)).squeeze(-1)
    return by_row(logp, logits, labels)


def entropy_from_logits(logits, temperature=1.0):
    """Entropy of softmax(logits / temperature) at each position: [B, T, V] -> [B, T]."""
    entropy = lambda x: (lambda logp: -(logp.exp() * logp).sum(-1))(F.log_softmax(x.float() / temperature, -1))
    return by_row(entropy, logits)


def kl_from_logits(logits, ref_logits, temperature=1.0):
    """Exact KL(pi || pi_ref) of the next-token distributions at each position (>= 0): [B, T, V] x 2 -> [B, T]."""
    logp = lambda x: F.log_softmax(x.float() / temperature, -1)
    return by_row(lambda x, y: (logp(x).exp() * (logp(x) - logp(y))).sum(-1), logits, ref_logits)
