"""A real pretrained model and real human labels, end to end on a CPU: SmolLM2-135M-Instruct learns what film critics
prefer (README, "A real model"). One command per seed runs step 1 -> step 2 -> step 3 (GAE PPO with the reward model),
GRPO with the reward model and DPO from the same step-1 output, judges every policy's greedy answers to prompts about
films none of them saw, and writes report.md and results.json:

    python scripts/film_critics.py --seed 1 --output-dir critics/seed1
    python scripts/film_critics.py --table critics/seed1 critics/seed2        # the README table, over seeds

Data: scripts/rt_reviews.py (critics' snippets; pairs are (fresh, rotten) about one film; 10% of the films held out).
Model: scripts/smollm2.py (the hub, or offline the PyPI wheel's GGUF). Judges: VADER, TextBlob and AFINN, lexicons
nobody here trained. Every stage runs with its chat template, in bf16 where the CPU has bf16 units (--dtype), with the
sizes of STAGES; a finished stage (its metrics.json) is not run again, so a second call only judges again.
"""

import argparse
import json
import os
import statistics
import subprocess
import sys
import time

import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
sys.path.insert(0, os.path.join(ROOT, "scripts"))
rt_reviews = __import__("rt_reviews")
ANSWER = 48  # tokens per answer, in step 3 and in the evals: a snippet is 20-200 characters
SAMPLES = 2  # sampled answers per held-out prompt, besides the greedy one
STAGES = {  # stage -> (script, flags besides the model, data and output); the sizes that fit a 2-core CPU
    "sft": ("sft.py", "--data_split 10,0,0 --max_seq_len 160 --learning_rate 3e-5 --max_steps 120 "
            "--per_device_train_batch_size 8 --num_warmup_steps 10"),
    "rm": ("reward.py", "--data_split 0,10,0 --max_seq_len 160 --learning_rate 2e-5 --max_steps 100 "
           "--per_device_train_batch_size 8 --num_warmup_steps 10"),
    "ppo": ("ppo.py", f"--data_split 0,0,10 --max_answer_seq_len {ANSWER} --per_device_generation_batch_size 16 "
            "--per_device_training_batch_size 8 --ppo_epochs 2 --actor_learning_rate 2e-5 --critic_learning_rate 5e-5 "
            "--max_steps 50 --kl_coef 0.05 --num_warmup_steps 3"),
    "grpo": ("ppo.py", f"--data_split 0,0,10 --max_answer_seq_len {ANSWER} --per_device_generation_batch_size 4 "
             "--n_samples_per_prompt 4 --per_device_training_batch_size 8 --ppo_epochs 2 --advantage_estimator grpo "
             "--actor_learning_rate 2e-5 --max_steps 30 --kl_coef 0.05 --num_warmup_steps 3"),
    "dpo": ("dpo.py", "--data_split 0,10,0 --max_seq_len 160 --learning_rate 5e-6 --max_steps 100 "
            "--per_device_train_batch_size 8 --beta 0.1 --num_warmup_steps 10"),
}  # fmt: skip


def run_stage(name, args, out):
    """One stage as a subprocess (its log beside its outputs); seconds it took, kept in its folder's seconds.json for a
    later call that finds the stage complete."""
    script, flags = STAGES[name]
    folder = os.path.join(out, name)
    if os.path.isfile(os.path.join(folder, "metrics.json")):
        return json.load(open(os.path.join(folder, "seconds.json")))["seconds"]
    data = {"sft": "sft", "rm": "pairs", "dpo": "pairs"}.get(name, "prompts")
    model = {"sft": args.model, "rm": os.path.join(out, "sft"), "dpo": os.path.join(out, "sft")}.get(name)
    models = ["--model_name_or_path", model] if model else ["--actor", os.path.join(out, "sft")]
    models += ["--reward", os.path.join(out, "rm")] if name in ("ppo", "grpo") else []
    cmd = [sys.executable, os.path.join(ROOT, script), *models, "--data_path", os.path.join(args.data, data)]
    cmd += [*flags.split(), "--chat_template", "--dtype", args.dtype, "--seed", str(args.seed), "--output_dir", folder]
    print(f"[critics] {name}: {' '.join(cmd)}", flush=True)
    t0 = time.time()
    os.makedirs(folder, exist_ok=True)
    with open(os.path.join(folder, "training.log"), "w") as log:
        if subprocess.call(cmd, stdout=log, stderr=subprocess.STDOUT, env=dict(os.environ, PYTHONUNBUFFERED="1")):
            sys.exit(f"[critics] {name} failed; see {os.path.join(folder, 'training.log')}")
    with open(os.path.join(folder, "seconds.json"), "w") as f:
        json.dump({"seconds": time.time() - t0}, f)
    return time.time() - t0


POLICIES = {"sft": "sft", "ppo": "ppo/actor", "grpo": "grpo/actor", "dpo": "dpo"}  # policy -> its folder in a run


@torch.no_grad()
def answers(out, name, prompts, tokenizer, samples=0, seed=0, batch=16):
    """Policy `name`'s answers to `prompts` (rendered): greedy when samples is 0, else `samples` answers per prompt
    drawn at temperature 1 with no top-k or top-p (the distribution step 3 trains). Each judged the way step 3 judges
    its eval answers (ppo.py's evaluate): the reward model's raw score at the last real token, the exact KL to the SFT
    policy summed over the response, tokens (EOS included), EOS rate. dpo.py generates only for data with a checker."""
    import data
    import models

    load = lambda folder: models.load_model(os.path.join(out, folder), tokenizer).eval()
    policy, sft, rows = load(POLICIES[name]), load("sft"), []
    reward = models.load_reward_model(os.path.join(out, "rm"), tokenizer)[0].eval()
    prompts, how = [p for p in prompts for _ in range(max(samples, 1))], {"do_sample": False}
    if samples:
        how = {"do_sample": True, "temperature": 1.0, "top_k": 0, "top_p": 1.0}
        torch.manual_seed(seed)
    for i in range(0, len(prompts), batch):
        b = data.collate_prompts(
            [data.encode_prompt(tokenizer, p) for p in prompts[i : i + batch]], tokenizer.pad_token_id
        )
        gen = policy.generate(**b, max_new_tokens=ANSWER, pad_token_id=tokenizer.pad_token_id,
                              eos_token_id=tokenizer.eos_token_id, **how)[:, b["input_ids"].shape[1] :]  # fmt: skip
        mask = models.response_mask(gen, tokenizer.eos_token_id)
        seq, attn = torch.cat([b["input_ids"], gen], 1), torch.cat([b["attention_mask"], mask], 1)
        tq = b["input_ids"].shape[1]  # query tokens
        logits = [models.response_logits(m, seq, attn, tq) for m in (policy, sft)]
        kl, scores = (models.kl_from_logits(*logits) * mask).sum(1), reward.score(seq, attn)
        has_eos = (gen == tokenizer.eos_token_id).any(1)
        for j in range(len(gen)):
            text = data.decode_answer(tokenizer, gen[j].tolist())
            rows.append({"response": text, "score": scores[j].item(), "kl": kl[j].item(),
                         "length": mask[j].sum().item(), "eos": bool(has_eos[j])})  # fmt: skip
    return rows


def distinct(texts, n):  # distinct-n: distinct n-grams over all n-grams of all answers (collapse shows here)
    grams = [tuple(t.split()[i : i + n]) for t in texts for i in range(len(t.split()) - n + 1)]
    return len(set(grams)) / max(len(grams), 1)


def judged(rows, judges, length=None, eos=None):
    """One policy's answers (rows with response, score, kl, and length and eos unless given) -> its metrics."""
    texts = [r["response"].strip() for r in rows]
    m = {f"{j}_positive": statistics.mean(judge(t) > 0 for t in texts) for j, judge in judges.items()}
    m.update({f"{j}_score": statistics.mean(judge(t) for t in texts) for j, judge in judges.items()})
    m.update(rm_score=statistics.mean(r["score"] for r in rows), kl=statistics.mean(r["kl"] for r in rows))
    m.update(length=length if length is not None else statistics.mean(r["length"] for r in rows))
    m.update(eos=eos if eos is not None else statistics.mean(r["eos"] for r in rows))
    return {**m, "distinct_1": distinct(texts, 1), "distinct_2": distinct(texts, 2), "answers": texts}


def evaluate(args, out):
    """Every policy's answers to the held-out films' prompts, judged. Greedy: step 3's eval records for SFT (PPO's
    start), PPO and GRPO, answers() for DPO. Sampled ("sampled"): answers() for all four, SAMPLES per prompt. Beside
    them the reward model's pairwise accuracy and the judges' on the held-out pairs. Returns results.json's dict."""
    import models

    judges, read = rt_reviews.judges(), lambda f: [json.loads(x) for x in open(f)]
    pairs = read(os.path.join(args.data, "pairs", "test.jsonl"))
    rm_metrics = json.load(open(os.path.join(out, "rm", "metrics.json")))
    res = {"rm_accuracy": rm_metrics["eval_accuracy"], "rm_accuracy_start": rm_metrics["eval_accuracy_start"]}
    for name, judge in judges.items():
        res[f"{name}_pair_accuracy"] = statistics.mean(judge(p["chosen"]) > judge(p["rejected"]) for p in pairs)
    for name, run, suffix in (("sft", "ppo", "_start"), ("ppo", "ppo", ""), ("grpo", "grpo", "")):
        m = json.load(open(os.path.join(out, run, "metrics.json")))
        rows = read(os.path.join(out, run, f"eval_generations{suffix}.jsonl"))
        res[name] = judged(rows, judges, m[f"eval_response_length{suffix}"], m[f"eval_eos_rate{suffix}"])
    prompts = [r["prompt"] for r in read(os.path.join(out, "ppo", "eval_generations_start.jsonl"))]  # as step 3
    tokenizer = models.load_tokenizer(os.path.join(out, "sft"), chat_template=True)  # rendered them: the template
    res["dpo"] = judged(answers(out, "dpo", prompts, tokenizer), judges)
    res["sampled"] = {p: judged(answers(out, p, prompts, tokenizer, SAMPLES, args.seed), judges) for p in POLICIES}
    res["prompts"] = [r["prompt"] for r in read(os.path.join(args.data, "prompts", "test.jsonl"))]  # step 3's order
    return res


JUDGES = ("vader", "textblob", "afinn")
ROWS = [f"{j}_{m}" for m in ("positive", "score") for j in JUDGES]
ROWS += ["rm_score", "kl", "length", "eos", "distinct_1", "distinct_2"]


POLICY_COLUMNS = "| metric | SFT | PPO | GRPO | DPO |\n| --- | --- | --- | --- | --- |"


def report(res, seconds):
    lines = ["# SmolLM2-135M learns what film critics prefer", "", "| stage | seconds |", "| --- | --- |"]
    lines += [f"| {k} | {v:.0f} |" for k, v in seconds.items()]
    rm = f"Reward model, held-out pairs: {res['rm_accuracy']:.3f} (from {res['rm_accuracy_start']:.3f}); "
    lines += ["", rm + ", ".join(f"{j} {res[f'{j}_pair_accuracy']:.3f}" for j in JUDGES) + " on them."]
    for title, part in (("Greedy answers", res), (f"Sampled answers ({SAMPLES} per prompt)", res["sampled"])):
        lines += ["", f"{title}:", "", POLICY_COLUMNS]
        lines += [f"| {k} | " + " | ".join(f"{part[p][k]:.3f}" for p in POLICIES) + " |" for k in ROWS]
    lines += ["", "| film prompt (greedy answers) | SFT | PPO | GRPO | DPO |", "| --- | --- | --- | --- | --- |"]
    for i in range(0, len(res["prompts"]), max(1, len(res["prompts"]) // 10))[:10]:
        cells = [res[p]["answers"][i].replace("|", "/") for p in POLICIES]
        lines.append(f"| {res['prompts'][i]} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def gains(part):
    """PPO against SFT in issue 24's terms: judge-positive gains in points, distinct-2 and length ratios."""
    sft, ppo = part["sft"], part["ppo"]
    points = ", ".join(f"{j} {100 * (ppo[f'{j}_positive'] - sft[f'{j}_positive']):+.1f}" for j in JUDGES)
    d2, length = ppo["distinct_2"] / sft["distinct_2"], ppo["length"] / sft["length"]
    return f"PPO - SFT positive (points): {points}; distinct-2 x{d2:.2f}, length x{length:.2f}"


def table(paths):
    """README's tables: each metric as mean [min, max] over the seeds' results.json (a run's folder or the file), for
    the greedy and the sampled answers, then each seed's gains() and minutes."""
    files = [p if p.endswith(".json") else os.path.join(p, "results.json") for p in paths]
    runs = [json.load(open(f)) for f in files]
    cell = lambda vals: f"{statistics.mean(vals):.3f} [{min(vals):.3f}, {max(vals):.3f}]"
    lines = []
    for title, part in (("greedy", lambda r: r), ("sampled", lambda r: r["sampled"])):
        lines += [f"{title} answers:", POLICY_COLUMNS]
        lines += [f"| {k} | " + " | ".join(cell([part(r)[p][k] for r in runs]) for p in POLICIES) + " |" for k in ROWS]
    lines += ["| pairwise accuracy | held-out pairs |", "| --- | --- |"]
    accuracies = ["rm_accuracy"] + [f"{j}_pair_accuracy" for j in JUDGES]
    lines += [f"| {k} | {cell([r[k] for r in runs])} |" for k in accuracies]
    for f, r in zip(files, runs):
        minutes = sum(r["seconds"].values()) / 60
        lines.append(f"{f}: {minutes:.0f} min; greedy {gains(r)}; sampled {gains(r['sampled'])}")
    print("\n".join(lines))


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--seed", type=int, default=1, help="every stage's --seed")
    p.add_argument("--output-dir", default="critics", help="one folder per stage, report.md, results.json")
    p.add_argument("--model", default="output/smollm2", help="SmolLM2's folder (made by scripts/smollm2.py if missing)")
    p.add_argument("--data", default="output/rt", help="the data folders (made by scripts/rt_reviews.py if missing)")
    p.add_argument("--dtype", default="bf16", choices=["bf16", "fp32"], help="training dtype (bf16: AVX512-BF16 CPUs)")
    p.add_argument("--table", nargs="+", default=None, help="print README's table from these runs' results.json")
    args = p.parse_args(argv)
    if args.table:
        return table(args.table)
    if not os.path.isfile(os.path.join(args.model, "config.json")):
        subprocess.check_call([sys.executable, os.path.join(ROOT, "scripts", "smollm2.py"), args.model])
    if not os.path.isfile(os.path.join(args.data, "prompts", "test.jsonl")):
        rt_reviews.build(args.data)
    seconds = {name: run_stage(name, args, args.output_dir) for name in STAGES}
    t0 = time.time()
    res = evaluate(args, args.output_dir)
    seconds["eval"] = time.time() - t0
    with open(os.path.join(args.output_dir, "results.json"), "w") as f:
        json.dump({**res, "seconds": seconds}, f, indent=1)
    with open(os.path.join(args.output_dir, "report.md"), "w") as f:
        f.write(report(res, seconds))
    print(report(res, seconds))


if __name__ == "__main__":
    main()
