"""List tasks other than the built-in sort, written as the three local JSONL files a user would bring, to check that
the defaults generalise beyond the task they were tuned on. Each has a ground-truth checker and a demonstrator with a
systematic error on long lists, like builtin:sort; the preference pairs are right.

    python scripts/list_tasks.py reverse data/reverse        # writes demos.jsonl, pairs.jsonl, prompts.jsonl
    python train.py --output-dir out/reverse \
        --step1-args "--data_path data/reverse/demos.jsonl --data_split 10,0,0" \
        --step2-args "--data_path data/reverse/pairs.jsonl --data_split 0,10,0" \
        --step3-args "--data_path data/reverse/prompts.jsonl --data_split 0,0,10"
    python scripts/sweep.py --task reverse --seeds 1 2 3   # the same, scored by the task's checker

Tasks: reverse ("reverse: c a d" -> "d a c"; on 5+ items the demonstrator swaps the last two items 60% of the
time) and rotate ("rotate: c a d" -> "a d c", first item moved to the end; on 5+ items it swaps the two items before
the moved one 60% of the time). No prompt occurs in two files or twice in prompts.jsonl, so the held-out
tenth of prompts.jsonl (step 3's eval split) is never trained on.
"""

import collections
import json
import os
import random
import re
import sys

LETTERS = "abcdefghijklmnopqrstuvwxyz"
MIN_LEN, MAX_LEN, LONG = 3, 6, 5
P_SYSTEMATIC, P_NOISE = 0.6, 0.1
SIZES = {"demos": 6000, "pairs": 12000, "prompts": 12000}


def _swap(items, i):
    items = list(items)
    items[i], items[i + 1] = items[i + 1], items[i]
    return items


def _items(name, prompt):
    found = re.search(name + r":((?: [a-z])+)", prompt)
    return None if found is None else found.group(1).split()


Task = collections.namedtuple("Task", "name answer demo_error")
TASK_LIST = [
    Task("reverse", lambda xs: xs[::-1], lambda answer: _swap(answer, len(answer) - 2)),
    Task("rotate", lambda xs: xs[1:] + xs[:1], lambda answer: answer[:-3] + [answer[-2], answer[-3], answer[-1]]),
]


class ListTask:
    """A task with its checker (prompt, response) -> bool and `systematic(prompt)`: the lists on which the
    demonstrator makes its systematic error."""

    def __init__(self, task):
        self.task = task

    def check(self, prompt, response):
        items = _items(self.task.name, prompt)
        return items is not None and response.strip().split() == self.task.answer(items)

    def systematic(self, prompt):
        return len(_items(self.task.name, prompt) or []) >= LONG


TASKS = {t.name: ListTask(t) for t in TASK_LIST}


def corrupt(rng, answer):
    """A wrong answer: last two swapped, a random adjacent swap, a letter replaced by one not in the list, a letter
    dropped or one added (the kinds builtin:sort's pairs have)."""
    kind = rng.random()
    out = list(answer)
    if kind < 0.3:
        out = _swap(answer, len(answer) - 2)
    elif kind < 0.45:
        out = _swap(answer, rng.randrange(len(answer) - 1))
    elif kind < 0.85:
        out[rng.randrange(len(out))] = rng.choice([c for c in LETTERS if c not in answer])
    elif kind < 0.925:
        del out[rng.randrange(len(out))]
    else:
        out.insert(rng.randrange(len(out) + 1), rng.choice(LETTERS))
    return out if out != answer else _swap(answer, 0)


def rows(task, seed=0):
    """{file: rows} for the three files, from disjoint prompts."""
    rng, seen, out = random.Random(seed), set(), {}
    for part, n in SIZES.items():
        out[part] = []
        while len(out[part]) < n:
            items = rng.sample(LETTERS, rng.randint(MIN_LEN, MAX_LEN))
            if " ".join(items) in seen:
                continue
            seen.add(" ".join(items))
            answer = task.answer(items)
            prompt = f"{task.name}: {' '.join(items)}"
            if part == "demos":
                demo = answer
                if len(items) >= LONG and rng.random() < P_SYSTEMATIC:
                    demo = task.demo_error(answer)
                elif rng.random() < P_NOISE:
                    demo = _swap(answer, rng.randrange(len(answer) - 1))
                out[part].append({"prompt": prompt, "response": " ".join(demo)})
            elif part == "pairs":
                out[part].append(
                    {"prompt": prompt, "chosen": " ".join(answer), "rejected": " ".join(corrupt(rng, answer))}
                )
            else:  # step 3 needs only the prompt; the reference answer lets step 3 count reward hacking
                out[part].append({"prompt": prompt, "chosen": " ".join(answer)})
    return out


def write_task(name, folder):
    """Write the three files (once; they are always the same) and return {file: path}."""
    os.makedirs(folder, exist_ok=True)
    paths = {part: os.path.join(folder, f"{part}.jsonl") for part in SIZES}
    if not all(os.path.isfile(p) for p in paths.values()):
        for part, part_rows in rows(TASKS[name].task).items():
            with open(paths[part] + ".tmp", "w") as f:
                f.writelines(json.dumps(r) + "\n" for r in part_rows)
            os.replace(paths[part] + ".tmp", paths[part])
    return paths


if __name__ == "__main__":
    if len(sys.argv) != 3 or sys.argv[1] not in TASKS:
        sys.exit(f"usage: python scripts/list_tasks.py {{{','.join(TASKS)}}} FOLDER")
    for part, path in write_task(sys.argv[1], sys.argv[2]).items():
        print(f"{path}: {SIZES[part]} rows")
