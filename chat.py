"""Talk to a trained model in the prompt format it was trained with (DeepSpeed-Chat's chat.py), or put several models'
answers side by side (its prompt_eval.py), with the reward model's score when one is given.

    python chat.py --path output/step3_ppo/actor                       # interactive: `clear` forgets, `quit` ends
    python chat.py --path output/step3_ppo/actor --prompt "sort: d b a c" --prompt "sort: q p"
    python chat.py --compare output/step1_sft output/step3_ppo/actor --reward output/step2_reward --prompts_file p.txt

The format comes from the model folder's args.json (written by every stage: `chat_template` true means the
tokenizer's chat template, else "Human: ...\\n\\nAssistant:"); --chat_template forces the template for other folders.
"""

import argparse
import json
import os
import sys

import torch

import common
import data
import models
from common import UserError


def parse_args(argv=None):
    fmt = argparse.ArgumentDefaultsHelpFormatter
    p = argparse.ArgumentParser(description="chat with a model, or compare models' answers", formatter_class=fmt)
    g = p.add_argument
    g("--path", default=None, help="the model to talk to (HF folder, hub name or tiny:<type>)")
    g("--compare", nargs="+", default=None, help="several models: each answers every prompt, side by side")
    g("--reward", default=None, help="a step-2 reward model that scores every answer")
    g("--prompt", action="append", default=[], help="answer this prompt and exit (repeatable)")
    g("--prompts_file", default=None, help="answer each non-empty line of this file and exit")
    g("--chat_template", action="store_true", help="the tokenizer's chat template (default: what args.json says)")
    g("--max_new_tokens", type=int, default=64, help="answer length cap")
    g("--do_sample", action="store_true", help="sample (default: greedy)")
    g("--temperature", type=float, default=1.0, help="sampling temperature")
    g("--top_p", type=float, default=1.0, help="nucleus sampling")
    g("--top_k", type=int, default=0, help="top-k sampling (0: off)")
    g("--seed", type=int, default=1234, help="sampling seed")
    args = p.parse_args(argv)
    if (args.path is None) == (args.compare is None):
        raise UserError("--path or --compare: give exactly one (one model to talk to, or several to compare)")
    for path in (args.compare or [args.path]) + ([args.reward] if args.reward else []):
        models.check_model_path(path, "--reward" if path == args.reward else "--compare" if args.compare else "--path")
    if args.prompts_file and not os.path.isfile(args.prompts_file):
        raise UserError(f"--prompts_file {args.prompts_file}: no such file")
    common.check_at_least_one(args, "max_new_tokens")
    return args


def uses_chat_template(path, forced):
    """What the model was trained with: args.json's chat_template (our outputs), else --chat_template."""
    try:
        with open(os.path.join(path, "args.json")) as f:
            return bool(json.load(f).get("chat_template", False)) or forced
    except (OSError, ValueError):
        return forced


def load_format(path, args, flag):
    """A folder's tokenizer and prompt format: (tokenizer, the tokenizer again if it renders its chat template, else
    None). A tokenizer without a template fails here, before the model loads."""
    chat = uses_chat_template(path, args.chat_template)
    tokenizer = models.load_tokenizer(path, flag, chat_template=chat)
    if chat:
        data.render_messages([{"role": "user", "content": "hi"}], tokenizer)
    return tokenizer, tokenizer if chat else None


class Chatter:
    """One model, its tokenizer and prompt format: answer(messages) -> (text, whether it ended with EOS)."""

    def __init__(self, path, args, device):
        self.path, self.args, self.device = path, args, device
        self.tokenizer, self.chat = load_format(path, args, "--compare" if args.compare else "--path")
        self.model = models.load_model(path, self.tokenizer).to(device).eval()

    @torch.no_grad()
    def answer(self, messages):
        a, tok = self.args, self.tokenizer
        prompt = data.render_messages(messages, self.chat)
        ids = torch.tensor([data.encode_prompt(tok, prompt)], device=self.device)
        kw = dict(temperature=a.temperature, top_p=a.top_p, top_k=a.top_k) if a.do_sample else {}
        out = self.model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=a.max_new_tokens,
                                  do_sample=a.do_sample, pad_token_id=tok.pad_token_id, eos_token_id=tok.eos_token_id,
                                  **kw)  # fmt: skip
        response = out[0, ids.shape[1] :].tolist()
        text = data.decode_answer(tok, response).strip()
        return text, tok.eos_token_id in response


class Scorer:
    """A step-2 reward model's score of an answer, read at its EOS as step 3 reads it (at its last token if it never
    ended): the dialogue rendered and tokenised the way the reward model was trained, whatever model answered."""

    def __init__(self, path, args, device):
        self.tokenizer, self.chat = load_format(path, args, "--reward")
        self.model, self.device = models.load_reward_model(path, self.tokenizer)[0].to(device).eval(), device

    @torch.no_grad()
    def __call__(self, messages, text, ended):
        tok, prompt = self.tokenizer, data.render_messages(messages, self.chat)
        ids = data.encode_prompt(tok, prompt)
        ids += data.encode_response(tok, ids, prompt, text if self.chat else " " + text)[: None if ended else -1]
        return self.model.score(torch.tensor([ids], device=self.device), torch.ones(1, len(ids), device=self.device))


def read_prompts(args):
    prompts = list(args.prompt)
    if args.prompts_file:
        prompts += [line.strip() for line in open(args.prompts_file) if line.strip()]
    return prompts


def compare(chatters, prompts, scorer):
    """Every model answers every prompt (one turn each); a block per prompt, with the reward model's scores."""
    width = max(len(c.path) for c in chatters)
    for prompt in prompts:
        print(f"prompt: {prompt}")
        for c in chatters:
            messages = [{"role": "user", "content": prompt}]
            text, ended = c.answer(messages)
            score = f"   score {scorer(messages, text, ended).item():+.3f}" if scorer else ""
            print(f"  {c.path:<{width}}  -> {text!r}{score}")
        print()


def talk(chatter, lines):
    """A multi-turn dialogue over `lines` (stdin): each answer joins the history; `clear` forgets it, `quit` ends."""
    messages = []
    for line in lines:
        line = line.strip()
        if line in ("quit", "exit"):
            break
        if line == "clear":
            messages = []
            print("(history cleared)")
            continue
        if not line:
            continue
        messages.append({"role": "user", "content": line})
        text, _ = chatter.answer(messages)
        messages.append({"role": "assistant", "content": text})
        print(f"Assistant: {text}\n", flush=True)


def stdin_lines():
    while True:
        try:
            line = input("Human: ")
        except EOFError:
            print()
            return
        if not sys.stdin.isatty():  # piped: show what was read, so the transcript reads as a dialogue
            print(line)
        yield line


def main(argv=None):
    args = parse_args(argv)
    torch.manual_seed(args.seed)
    device = torch.device("cuda") if torch.cuda.is_available() else torch.device("cpu")
    chatters = [Chatter(path, args, device) for path in args.compare or [args.path]]
    scorer = Scorer(args.reward, args, device) if args.reward else None
    prompts = read_prompts(args)
    if args.compare:
        compare(chatters, prompts or list(stdin_lines()), scorer)
    elif prompts:
        for prompt in prompts:  # each on its own: no shared history
            print(f"Human: {prompt}")
            talk(chatters[0], [prompt])
    else:
        print(f"chat with {args.path} ({'chat template' if chatters[0].chat else data.PROMPT_TEMPLATE!r}); "
              f"`clear` forgets the dialogue, `quit` or Ctrl-D ends")  # fmt: skip
        talk(chatters[0], stdin_lines())


if __name__ == "__main__":
    common.run_cli(main)
