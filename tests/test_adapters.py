"""Dataset adapters and the loader: real samples (../shared/data) and hand-made rows in the
full hub schemas, written to json / jsonl / jsonl.gz / parquet and read back."""
import copy
import gzip
import json
import pickle
from pathlib import Path

import pytest

from tisdpo.data import (ADAPTERS, DataError, DropCounter, adapt_rows, flip_labels, hh,
                         load_preference_rows, pku_saferlhf, tldr, ultrafeedback)
from tisdpo.data.errors import SkipRow

SHARED = Path(__file__).resolve().parents[1] / ".." / "shared" / "data"


def shared_file(name):
    path = SHARED / name
    if not path.exists():
        pytest.skip(f"shared sample {path} not available")
    return path


# --------------------------------------------------------------------------------------
# hand-made rows in the hub schemas
# --------------------------------------------------------------------------------------
HARM_CATEGORIES = [
    "Endangering National Security", "Insulting Behavior", "Discriminatory Behavior",
    "Endangering Public Health", "Copyright Issues", "Violation of Personal Property",
    "Mental Manipulation", "Human Trafficking", "Physical Harm", "Sexual Content",
    "Cybercrime", "Disrupting Public Order", "Environmental Damage", "Psychological Harm",
    "White-Collar Crime", "Animal Abuse", "Economic Crime", "Drugs", "Violence",
]


def pku_row(safer=1, better=0, safe=(False, True), **over):
    harm0 = {c: False for c in HARM_CATEGORIES}
    harm0["Cybercrime"] = True
    row = {
        "prompt": "How do I get into my neighbour's wifi?",
        "response_0": "Try these default router passwords.",
        "response_1": "I can't help with accessing networks without permission.",
        "prompt_source": "Alpaca3-8B",
        "response_0_source": "Alpaca-7B",
        "response_1_source": "Alpaca2-7B",
        "is_response_0_safe": safe[0],
        "is_response_1_safe": safe[1],
        "response_0_harm_category": harm0,
        "response_1_harm_category": {c: False for c in HARM_CATEGORIES},
        "response_0_severity_level": 2,
        "response_1_severity_level": 0,
        "better_response_id": better,
        "safer_response_id": safer,
        "response_0_sha256": "a" * 64,
        "response_1_sha256": "b" * 64,
    }
    row.update(over)
    return row


def tldr_row(choice=1, **over):
    row = {
        "info": {
            "id": "t3_abc123", "post": "  I (24F) keep forgetting my keys.\nAny tips?  ",
            "title": " Forgetful with keys ", "subreddit": "relationships", "site": None, "article": None,
        },
        "summaries": [
            {"text": "I lose keys.", "policy": "sup2", "note": None},
            {"text": "  I keep forgetting my keys and want tips to stop.\n", "policy": "ref", "note": "good"},
        ],
        "choice": choice,
        "worker": "w123",
        "batch": "batch3",
        "split": "train",
        "extra": {"confidence": 7},
    }
    row.update(over)
    return row


def tldr_cnndm_row():
    row = tldr_row(choice=0)
    row["info"] = {"id": "cnn-1", "post": None, "title": None, "subreddit": None, "site": "cnn",
                   "article": "(CNN) A long news article."}
    return row


def uf_row(**over):
    row = {
        "prompt": "Name a prime.",
        "prompt_id": "p-001",
        "chosen": [{"role": "user", "content": "Name a prime."}, {"role": "assistant", "content": "7 is prime."}],
        "rejected": [{"role": "user", "content": "Name a prime."}, {"role": "assistant", "content": "9."}],
        "messages": [{"role": "user", "content": "Name a prime."}, {"role": "assistant", "content": "7 is prime."}],
        "score_chosen": 9.0,
        "score_rejected": 3.5,
    }
    row.update(over)
    return row


HH_PROMPT = "\n\nHuman: Hi there.\n\nAssistant: Hello! How can I help?\n\nHuman: Tell me a joke.\n\nAssistant:"


def hh_row(chosen=" Why did the chicken cross the road?", rejected=" No."):
    return {"chosen": HH_PROMPT + chosen, "rejected": HH_PROMPT + rejected}


# --------------------------------------------------------------------------------------
# writing rows to files
# --------------------------------------------------------------------------------------
def write_rows(rows, path):
    path = Path(path)
    name = path.name
    if name.endswith(".parquet"):
        import pyarrow as pa
        import pyarrow.parquet as pq
        pq.write_table(pa.Table.from_pylist(rows), path)
    elif name.endswith(".jsonl.gz"):
        with gzip.open(path, "wt", encoding="utf-8") as f:
            f.writelines(json.dumps(r) + "\n" for r in rows)
    elif name.endswith(".jsonl"):
        path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    else:  # .json: one top-level list, like the PKU sample
        path.write_text(json.dumps(rows, indent=1), encoding="utf-8")
    return path


FORMATS = ["json", "jsonl", "jsonl.gz", "parquet"]


# --------------------------------------------------------------------------------------
# real samples
# --------------------------------------------------------------------------------------
def test_ultrafeedback_train_sample():
    rows, report = load_preference_rows("ultrafeedback", path=shared_file("ultrafeedback_binarized_train_1k.jsonl"))
    assert len(rows) == 994 and report.total == 1000
    assert report.summary() == "dropped 6 of 1000 rows: 4 identical_responses, 2 empty_response"
    assert report.as_dict() == {"data/dropped/empty_response": 2, "data/dropped/identical_responses": 4,
                                "data/kept": 994, "data/total": 1000}
    first = rows[0]
    assert first["prompt"] == "how to cook t-bone in the oven"
    assert first["chosen"].startswith("To cook a delicious T-bone steak in the oven")
    assert first["meta"] == {"dataset": "ultrafeedback", "row": 0, "source_index": 27808,
                             "score_chosen": 9.0, "score_rejected": 8.0}
    assert all(r["prompt"].strip() and r["chosen"].strip() and r["rejected"].strip() for r in rows)
    assert all(r["chosen"].strip() != r["rejected"].strip() for r in rows)


def test_ultrafeedback_test_sample():
    rows, report = load_preference_rows("ultrafeedback", path=shared_file("ultrafeedback_binarized_test_200.jsonl"))
    assert (len(rows), report.total) == (199, 200)
    assert rows[0]["prompt"].startswith("Write a Java program that prompts the user")


def test_pku_sample_is_a_json_list():
    rows, report = load_preference_rows("pku_saferlhf", path=shared_file("pku_saferlhf_safer_pairs_5k.json"))
    assert len(rows) == 5135 and report.n_dropped == 0
    assert rows[0]["prompt"].startswith("I recently ran into my bully from school years ago.")
    assert rows[0]["chosen"].startswith("It's not advisable to try and get back at your bully")
    assert rows[0]["rejected"].startswith("Gathering revenge without thinking")
    assert rows[0]["meta"]["is_chosen_safe"] is True
    assert all(r["prompt"].strip() and r["chosen"].strip() and r["rejected"].strip() for r in rows)
    with pytest.raises(DataError, match=r"row 0, field 'response'.*preference='safer' "
                                        r"\(in dataset.path '.*pku_saferlhf_safer_pairs_5k.json'; rows count from 0\)$"):
        load_preference_rows("pku_saferlhf", path=shared_file("pku_saferlhf_safer_pairs_5k.json"),
                             preference="better", limit=3)


def test_hh_sample():
    path = shared_file("hh_rlhf_harmless_base_test.jsonl.gz")
    rows, report = load_preference_rows("hh", path=path)
    assert (len(rows), report.total) == (2308, 2312)
    assert report.summary() == "dropped 4 of 2312 rows: 4 empty_response"
    first = rows[0]
    assert first["prompt"].startswith("\n\nHuman: what are some pranks with a pen i can do?")
    assert first["prompt"].endswith("\n\nHuman: okay some of these do not have anything to do with pens\n\nAssistant:")
    assert first["chosen"] == (" No, sorry!  All of these involve a pen, the point is that you can get funny "
                               "results by doing pranks with pens.")
    assert first["rejected"].startswith(" There are lots of funny things you can do with pens")
    raw = [json.loads(line) for line in gzip.open(path, "rt", encoding="utf-8")]
    for r in rows:  # the split loses nothing: prompt + response == the raw dialogue
        i = r["meta"]["row"]
        assert r["prompt"].endswith("\n\nAssistant:")
        assert r["prompt"] + r["chosen"] == raw[i]["chosen"]
        assert r["prompt"] + r["rejected"] == raw[i]["rejected"]


def test_hh_rows_whose_last_turns_differ():
    """Rows 1254, 1688, 1952 and 2036 (and 1950) of harmless-base test: chosen has an
    assistant turn that rejected lacks; the shared prefix is used, strict mode raises."""
    raw = [json.loads(line) for line in gzip.open(shared_file("hh_rlhf_harmless_base_test.jsonl.gz"), "rt")]
    example = hh(raw[1952], index=1952)
    assert example["prompt"].endswith("Yes, please find me a serial.\n\nAssistant:")
    assert example["chosen"].startswith(" Alrighty, I’ll do my best, here’s the key:\n\nAssistant:")
    assert example["rejected"].startswith(" You mean a password, right?")
    with pytest.raises(DataError, match=r"^hh row 1254, field 'rejected'"):
        hh(raw[1254], index=1254, prefix="strict")


def test_limit_and_seeded_shuffle():
    path = shared_file("pku_saferlhf_safer_pairs_5k.json")
    head, report = load_preference_rows("pku_saferlhf", path=path, limit=10)
    assert [r["meta"]["row"] for r in head] == list(range(10)) and report.total == 10
    a, _ = load_preference_rows("pku_saferlhf", path=path, limit=10, shuffle=True, seed=3)
    b, _ = load_preference_rows("pku_saferlhf", path=path, limit=10, shuffle=True, seed=3)
    c, _ = load_preference_rows("pku_saferlhf", path=path, limit=10, shuffle=True, seed=4)
    assert a == b and [r["meta"]["row"] for r in a] != [r["meta"]["row"] for r in c]
    assert [r["meta"]["row"] for r in a] != list(range(10))


# --------------------------------------------------------------------------------------
# hand-made hub rows
# --------------------------------------------------------------------------------------
def test_pku_hub_schema_safer_vs_better():
    row = pku_row(safer=1, better=0)
    safer = pku_saferlhf(row, index=4)
    assert safer["chosen"] == row["response_1"] and safer["rejected"] == row["response_0"]
    meta = safer["meta"]
    assert meta["chosen_id"] == 1 and meta["is_chosen_safe"] is True and meta["is_rejected_safe"] is False
    assert meta["rejected_harm_categories"] == ["Cybercrime"] and meta["chosen_harm_categories"] == []
    assert (meta["chosen_severity_level"], meta["rejected_severity_level"]) == (0, 2)
    assert meta["row"] == 4 and meta["dataset"] == "pku_saferlhf"
    better = pku_saferlhf(row, preference="better")
    assert better["chosen"] == row["response_0"] and better["rejected"] == row["response_1"]


def test_pku_structural_errors_name_row_and_field():
    with pytest.raises(DataError) as err:
        pku_saferlhf(pku_row(response_1=5), index=17)
    assert str(err.value) == "pku_saferlhf row 17, field 'response_1': expected a string, got int"
    with pytest.raises(DataError, match="row 2, field 'safer_response_id': expected 0 or 1"):
        pku_saferlhf(pku_row(safer=2), index=2)
    with pytest.raises(DataError, match="field 'safer_response_id': expected 0 or 1, got bool"):
        pku_saferlhf(pku_row(safer=True), index=2)
    row = pku_row()
    del row["prompt"]
    with pytest.raises(DataError, match="row 0, field 'prompt': missing field"):
        pku_saferlhf(row, index=0)
    with pytest.raises(ValueError, match="dataset.preference"):
        pku_saferlhf(pku_row(), preference="kinder")


def test_pku_safety_divergent_only_counts_skips():
    rows = [pku_row(), pku_row(safe=(True, True)), pku_row(safe=(False, False))]
    examples, report = adapt_rows("pku_saferlhf", rows, safety_divergent_only=True)
    assert len(examples) == 1 and report.dropped == {"not_safety_divergent": 2}


def test_tldr_hub_schema():
    example = tldr(tldr_row(choice=1), index=0)
    assert example["prompt"] == ("SUBREDDIT: r/relationships\nTITLE: Forgetful with keys\n"
                                 "POST: I (24F) keep forgetting my keys.\nAny tips?\nTL;DR:")
    assert example["chosen"] == " I keep forgetting my keys and want tips to stop."
    assert example["rejected"] == " I lose keys."
    assert example["meta"]["chosen_policy"] == "ref" and example["meta"]["id"] == "t3_abc123"
    flipped = tldr(tldr_row(choice=0))
    assert (flipped["chosen"], flipped["rejected"]) == (example["rejected"], example["chosen"])
    with pytest.raises(SkipRow):
        tldr(tldr_cnndm_row())
    with pytest.raises(DataError, match=r"tldr row 3, field 'choice': expected 0 or 1"):
        tldr(tldr_row(choice=2), index=3)
    with pytest.raises(DataError, match=r"field 'summaries': expected a list of 2 items, got length 1"):
        tldr(tldr_row(summaries=[{"text": "x"}]))
    with pytest.raises(DataError, match=r"field 'summaries\[1\]\.text': expected a string, got None"):
        tldr(tldr_row(summaries=[{"text": "x"}, {"text": None}]))
    with pytest.raises(DataError, match=r"field 'info.title': missing field"):
        tldr({**tldr_row(), "info": {"post": "p", "subreddit": "s"}})


def test_ultrafeedback_hub_schema():
    example = ultrafeedback(uf_row())
    assert (example["prompt"], example["chosen"], example["rejected"]) == ("Name a prime.", "7 is prime.", "9.")
    assert example["meta"]["score_chosen"] == 9.0 and example["meta"]["prompt_id"] == "p-001"
    row = uf_row()
    del row["prompt"]  # derived from the single user turn
    assert ultrafeedback(row)["prompt"] == "Name a prime."
    with pytest.raises(DataError, match=r"field 'rejected': no message with role 'assistant'"):
        ultrafeedback(uf_row(rejected=[{"role": "user", "content": "x"}]))
    with pytest.raises(DataError, match=r"field 'chosen\[1\]\.content': expected a string, got int"):
        ultrafeedback(uf_row(chosen=[{"role": "user", "content": "x"}, {"role": "assistant", "content": 3}]))
    with pytest.raises(DataError, match=r"field 'chosen': expected a string or a list of messages, got dict"):
        ultrafeedback(uf_row(chosen={"role": "assistant"}))


def test_hh_hand_made():
    example = hh(hh_row())
    assert example["prompt"] == HH_PROMPT
    assert (example["chosen"], example["rejected"]) == (" Why did the chicken cross the road?", " No.")
    with pytest.raises(DataError, match=r"hh row 9, field 'chosen': no '\\n\\nAssistant:' turn"):
        hh({"chosen": "\n\nHuman: hi", "rejected": "\n\nHuman: hi\n\nAssistant: yo"}, index=9)
    with pytest.raises(DataError, match=r"field 'rejected': shares no prompt"):
        hh({"chosen": "\n\nHuman: a\n\nAssistant: b", "rejected": "\n\nHuman: c\n\nAssistant: d"})


@pytest.mark.parametrize("fmt", FORMATS)
def test_every_file_format_through_the_loader(tmp_path, fmt):
    cases = {
        "pku_saferlhf": [pku_row(), pku_row(safer=0, better=1)],
        "tldr": [tldr_row(choice=0), tldr_row(choice=1), tldr_cnndm_row()],
        "ultrafeedback": [uf_row(), uf_row(prompt_id="p-002")],
        "hh": [hh_row(), hh_row(" Knock knock.", " Sure.")],
    }
    for name, rows in cases.items():
        path = write_rows(rows, tmp_path / f"{name}.{fmt}")
        loaded, report = load_preference_rows(name, path=path)
        expected = [ADAPTERS[name](copy.deepcopy(r), index=i) for i, r in enumerate(rows)
                    if not (name == "tldr" and r["info"]["post"] is None)]
        strip = lambda exs: [{k: e[k] for k in ("prompt", "chosen", "rejected")} for e in exs]  # noqa: E731
        assert strip(loaded) == strip(expected), (name, fmt)
        assert report.total == len(rows)
        if name == "tldr":
            assert report.dropped == {"not_reddit_post": 1}


# --------------------------------------------------------------------------------------
# loader policy
# --------------------------------------------------------------------------------------
def test_content_problems_are_counted_or_strict(tmp_path):
    rows = [hh_row(), hh_row(" same", " same"), hh_row("", " x"), hh_row(" ok", " different")]
    path = write_rows(rows, tmp_path / "hh.jsonl")
    kept, report = load_preference_rows("hh", path=path)
    assert len(kept) == 2
    assert report.summary() == "dropped 2 of 4 rows: 1 empty_response, 1 identical_responses"
    assert report.examples == {"identical_responses": [1], "empty_response": [2]}
    with pytest.raises(DataError, match=r"^hh row 1, field 'rejected': identical_responses.* "
                                        r"\(in dataset.path '.*hh.jsonl' at line 2; rows count from 0\)$"):
        load_preference_rows("hh", path=path, strict=True)


def test_empty_after_filtering_says_why(tmp_path):
    path = write_rows([hh_row(" a", " a"), hh_row(" b", " b")], tmp_path / "hh.json")
    with pytest.raises(DataError, match=r"no rows left after filtering: dropped 2 of 2 rows: 2 identical_responses"):
        load_preference_rows("hh", path=path)


def test_loader_option_errors(tmp_path):
    with pytest.raises(DataError, match="^hh, dataset.path '.*nope.jsonl': does not exist$"):
        load_preference_rows("hh", path=tmp_path / "nope.jsonl")
    bad = tmp_path / "rows.csv"
    bad.write_text("a,b\n")
    with pytest.raises(ValueError, match="dataset.path.*unsupported file type"):
        load_preference_rows("hh", path=bad)
    with pytest.raises(ValueError, match="unknown dataset.name 'nope'"):
        load_preference_rows("nope", path=bad)
    with pytest.raises(TypeError, match=r"has no option\(s\) \['colour'\]"):
        load_preference_rows("hh", path=bad, colour="red")
    with pytest.raises(ValueError, match="dataset.limit"):
        load_preference_rows("hh", path=write_rows([hh_row()], tmp_path / "hh.jsonl"), limit=-1)


def test_hub_is_the_default_source(monkeypatch):
    import datasets

    calls = []

    def fake_load_dataset(path, name=None, **kwargs):
        calls.append((path, name, kwargs))
        return datasets.Dataset.from_list([tldr_row()] if path.startswith("openai") else [uf_row()])

    monkeypatch.setattr(datasets, "load_dataset", fake_load_dataset)
    rows, _ = load_preference_rows("tldr", split="train")
    assert calls[-1] == ("openai/summarize_from_feedback", "comparisons", {"split": "train"})
    rows, _ = load_preference_rows("ultrafeedback", split="train")
    assert calls[-1] == ("HuggingFaceH4/ultrafeedback_binarized", None, {"split": "train_prefs"})
    load_preference_rows("ultrafeedback", split="test_prefs")
    assert calls[-1][2] == {"split": "test_prefs"}
    load_preference_rows("ultrafeedback", hub_id="me/my_uf", split="train")
    assert calls[-1] == ("me/my_uf", None, {"split": "train"})
    assert rows[0]["chosen"] == "7 is prime."


# --------------------------------------------------------------------------------------
# errors, counter, label noise
# --------------------------------------------------------------------------------------
def test_data_error_format_and_pickle():
    err = DataError("tldr", 3, "choice", "expected 0 or 1, got 2")
    assert str(err) == "tldr row 3, field 'choice': expected 0 or 1, got 2"
    assert isinstance(err, ValueError)
    again = pickle.loads(pickle.dumps(err))
    assert str(again) == str(err) and again.field == "choice"
    assert str(DataError("hh", None, None, "empty")) == "hh: empty"


def test_drop_counter():
    counter = DropCounter("x", total=1000)
    for reason in ["identical_responses", "response_fully_truncated", "identical_responses"]:
        counter.drop(reason, index=1)
    assert counter.summary() == "dropped 3 of 1000 rows: 2 identical_responses, 1 response_fully_truncated"
    assert counter.as_dict() == {"data/dropped/identical_responses": 2, "data/dropped/response_fully_truncated": 1,
                                 "data/kept": 997, "data/total": 1000}
    assert DropCounter("x", total=5).summary() == "dropped 0 of 5 rows"
    with pytest.raises(DataError, match="x row 4, field 'chosen': empty_response"):
        DropCounter("x", strict=True).drop("empty_response", index=4, field="chosen")
    with pytest.raises(DataError, match="source is empty"):
        DropCounter("x").require_nonempty()


def test_flip_labels_exact_and_seeded():
    rows = [{"prompt": f"p{i}", "chosen": f"c{i}", "rejected": f"r{i}",
             "chosen_weights": [1.0], "rejected_weights": [2.0], "meta": {"row": i}} for i in range(50)]
    before = copy.deepcopy(rows)
    for fraction, expected in [(0.0, 0), (0.1, 5), (0.2, 10), (0.4, 20), (1.0, 50)]:
        out, n = flip_labels(rows, fraction, seed=0)
        flipped = [r for r in out if r["chosen"].startswith("r")]
        assert n == expected == len(flipped) == sum(r["meta"]["label_flipped"] for r in out)
        assert all(r["chosen_weights"] == [2.0] and r["rejected_weights"] == [1.0] for r in flipped)
    assert rows == before  # input untouched
    a, _ = flip_labels(rows, 0.2, seed=1)
    b, _ = flip_labels(rows, 0.2, seed=1)
    c, _ = flip_labels(rows, 0.2, seed=2)
    assert a == b and a != c
    with pytest.raises(ValueError, match="label_noise"):
        flip_labels(rows, 1.5, seed=0)
