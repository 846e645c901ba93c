"""The film-critics recipe's judging (issue 24): the three lexicon judges read from their PyPI packages, distinct-n,
and the README table's cells and per-seed gains, each against values worked out by hand."""

import json
import os
import sys

import pytest

from conftest import ROOT

sys.path.insert(0, os.path.join(ROOT, "scripts"))
film_critics = __import__("film_critics")


def test_the_judges_and_how_each_reads_a_negation():
    try:
        judges = __import__("rt_reviews").judges()
    except OSError as e:  # urllib's URLError is an OSError
        pytest.skip(f"needs PyPI (network) for the judges' packages; CI reaches it: {e}")
    assert sorted(judges) == ["afinn", "textblob", "vader"]
    for judge in judges.values():
        assert judge("A delightful and entertaining ride.") > 0 and judge("A dull, lifeless mess.") < 0
        assert judge("The film is about a boy.") == 0
    # VADER and TextBlob turn a negated word around; AFINN sums word valences, so "not good" counts as good
    assert judges["vader"]("It's not a good movie.") < 0 and judges["textblob"]("It's not a good movie.") < 0
    assert judges["afinn"]("It's not a good movie.") == 3  # "good" +3; "not" has no valence
    assert judges["textblob"]("Not bad at all.") > 0 > judges["afinn"]("Not bad at all.")


def test_distinct_n_counts_distinct_grams_over_all_answers():
    texts = ["a fine film", "a fine mess", "a"]
    assert film_critics.distinct(texts, 1) == 4 / 7  # a, fine, film, mess over 7 words
    assert film_critics.distinct(texts, 2) == 3 / 4  # (a fine) twice, (fine film), (fine mess)
    assert film_critics.distinct([], 2) == 0


def test_judged_means_each_judge_and_record_over_the_answers():
    rows = [{"response": " good fun ", "score": 2.0, "kl": 1.0, "length": 3, "eos": True},
            {"response": "bad", "score": 0.0, "kl": 0.0, "length": 1, "eos": False}]  # fmt: skip
    judges = {"vader": lambda t: {"good fun": 1.0, "bad": -1.0}[t], "textblob": len, "afinn": lambda t: 0}
    m = film_critics.judged(rows, judges)
    assert m["vader_positive"] == 0.5 and m["textblob_positive"] == 1 and m["afinn_positive"] == 0
    assert m["vader_score"] == 0 and m["textblob_score"] == 5.5  # the answers are judged stripped
    assert (m["rm_score"], m["kl"], m["length"], m["eos"]) == (1, 0.5, 2, 0.5)
    assert m["distinct_1"] == 1 and m["distinct_2"] == 1 and m["answers"] == ["good fun", "bad"]
    assert film_critics.judged(rows, judges, length=7, eos=1)["length"] == 7  # step 3's own eval figures win


def test_the_table_is_mean_min_max_over_seeds_with_each_seeds_gains(tmp_path, capsys):
    def run(seed, sft_vader, ppo_vader):
        policy = lambda vader: {**dict.fromkeys(film_critics.ROWS, 1.0), "vader_positive": vader}
        res = {p: policy(sft_vader) for p in ("sft", "grpo", "dpo")}
        res["ppo"] = {**policy(ppo_vader), "length": 0.5, "distinct_2": 2.0}
        res["sampled"] = {p: policy(0.4) for p in film_critics.POLICIES}
        res.update(dict.fromkeys(["rm_accuracy"] + [f"{j}_pair_accuracy" for j in film_critics.JUDGES], 0.5))
        res["seconds"] = {"sft": 600.0, "eval": 60.0}
        folder = tmp_path / f"seed{seed}"
        folder.mkdir()
        (folder / "results.json").write_text(json.dumps(res))
        return str(folder)

    film_critics.table([run(1, 0.6, 0.9), os.path.join(run(2, 0.5, 0.7), "results.json")])
    out = capsys.readouterr().out.splitlines()
    assert out[0] == "greedy answers:" and out[1] == "| metric | SFT | PPO | GRPO | DPO |"
    assert out[3].startswith("| vader_positive | 0.550 [0.500, 0.600] | 0.800 [0.700, 0.900] | 0.550 [0.500, 0.600] |")
    sampled = out.index("sampled answers:")
    assert out[sampled + 3].startswith("| vader_positive | 0.400 [0.400, 0.400] | 0.400 [0.400, 0.400] |")
    assert out[-2].endswith(
        "seed1/results.json: 11 min; greedy PPO - SFT positive (points): vader +30.0, "
        "textblob +0.0, afinn +0.0; distinct-2 x2.00, length x0.50; sampled PPO - SFT positive "
        "(points): vader +0.0, textblob +0.0, afinn +0.0; distinct-2 x1.00, length x1.00"
    )
    assert "vader +20.0" in out[-1] and out[-1].startswith(str(tmp_path / "seed2" / "results.json"))
