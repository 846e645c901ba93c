"""Tokenizers that are not ours, built with the `tokenizers` library on a few hundred demo lines, each paired with a
tiny llama of a matching vocabulary and saved as an HF folder (what a user brings):

- wordpiece: BERT-style, lower-cases, no leading-space tokens, [CLS] ... [SEP] around every text, [PAD] = 0, and no
  EOS until the user sets one (here: eos_token = [SEP], as a user would);
- sentencepiece: Llama-style (Metaspace "▁", BPE), <unk> 0, <s> 1 added in front of every text, </s> 2, no PAD;
- gpt2: byte-level BPE with <|endoftext|> as EOS, BOS and PAD at once, as many GPT-2 derivatives ship."""

import os

import builtin

KINDS = ("wordpiece", "sentencepiece", "gpt2")


def demo_lines(n=400):
    """Prompts and answers of builtin:sort in the default template (the texts the stages will tokenise)."""
    rows = builtin.sort_dataset()["train"][:n]
    return [f"Human: {r['prompt']}\n\nAssistant: {r['chosen']}" for r in rows]


def build_tokenizer(kind):
    from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    lines = demo_lines()
    if kind == "wordpiece":
        specials = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]
        tok = Tokenizer(models.WordPiece(unk_token="[UNK]"))
        tok.normalizer = normalizers.BertNormalizer(lowercase=True)
        tok.pre_tokenizer = pre_tokenizers.BertPreTokenizer()
        tok.train_from_iterator(lines, trainers.WordPieceTrainer(vocab_size=120, special_tokens=specials))
        tok.post_processor = processors.TemplateProcessing(
            single="[CLS] $A [SEP]", pair="[CLS] $A [SEP] $B [SEP]", special_tokens=[("[CLS]", 2), ("[SEP]", 3)]
        )
        tok.decoder = decoders.WordPiece()
        names = dict(unk_token="[UNK]", pad_token="[PAD]", cls_token="[CLS]", sep_token="[SEP]", mask_token="[MASK]")
        return PreTrainedTokenizerFast(tokenizer_object=tok, **names), "[SEP]"
    if kind == "sentencepiece":
        tok = Tokenizer(models.BPE(unk_token="<unk>", fuse_unk=True, byte_fallback=False))
        tok.pre_tokenizer = pre_tokenizers.Metaspace(replacement="▁", prepend_scheme="first")
        tok.train_from_iterator(lines, trainers.BpeTrainer(vocab_size=150, special_tokens=["<unk>", "<s>", "</s>"]))
        tok.post_processor = processors.TemplateProcessing(single="<s> $A", special_tokens=[("<s>", 1)])
        tok.decoder = decoders.Metaspace(replacement="▁", prepend_scheme="first")
        names = dict(unk_token="<unk>", bos_token="<s>", eos_token="</s>")
        return PreTrainedTokenizerFast(tokenizer_object=tok, **names), None
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    alphabet = pre_tokenizers.ByteLevel.alphabet()
    trainer = trainers.BpeTrainer(vocab_size=300, special_tokens=["<|endoftext|>"], initial_alphabet=alphabet)
    tok.train_from_iterator(lines, trainer)
    tok.decoder = decoders.ByteLevel()
    end = "<|endoftext|>"
    return PreTrainedTokenizerFast(tokenizer_object=tok, bos_token=end, eos_token=end, pad_token=end), None


def build_model_folder(kind, root):
    """An HF folder: a tiny random llama whose vocabulary fits the tokenizer, and the tokenizer (EOS set if needed)."""
    from transformers import AutoConfig, AutoModelForCausalLM

    path = os.path.join(root, f"tiny-llama-{kind}")
    if os.path.isfile(os.path.join(path, "config.json")):
        return path
    tokenizer, eos = build_tokenizer(kind)
    if eos is not None:  # the user's one setting: which token ends a response
        tokenizer.eos_token = eos
    model_type, kw = builtin.tiny_config("llama")
    ids = dict(
        pad_token_id=tokenizer.pad_token_id, bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id
    )
    config = AutoConfig.for_model(model_type, vocab_size=len(tokenizer), **kw, **ids)
    AutoModelForCausalLM.from_config(config).save_pretrained(path)
    tokenizer.save_pretrained(path)
    return path


def chatml_folder(root):
    """A tiny llama whose tokenizer names <|endoftext|> its EOS while its ChatML template closes turns with <|im_end|>
    (Qwen2.5 base, SmolLM2 before its instruct tokenizer config)."""
    from transformers import AutoModelForCausalLM

    path = os.path.join(root, "chatml")
    if not os.path.isdir(path):
        tok = builtin.byte_tokenizer()
        tok.add_special_tokens({"additional_special_tokens": ["<|im_start|>", "<|im_end|>"]})
        turn = "<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n"
        tok.chat_template = "{% for m in messages %}" + turn + "{% endfor %}"
        tok.chat_template += "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
        model = AutoModelForCausalLM.from_pretrained(builtin.tiny_model_path("llama"))
        model.resize_token_embeddings(len(tok))
        model.save_pretrained(path)
        tok.save_pretrained(path)
    return path
