"""rlhfkit.data: loading, format detection, tokenisation boundaries, truncation, reports and collation."""

from __future__ import annotations

import json
import logging

import datasets
import pytest
import torch

from rlhfkit.data import (
    LINE_COLUMN,
    PREFERENCE_FORMATS,
    PROMPT_FORMATS,
    SFT_FORMATS,
    DataFormat,
    PrepareReport,
    collate_groups,
    collate_sequences,
    detect_format,
    expand_to_pairs,
    load_rows,
    pack_batch,
    pad_batch,
    prepare_preferences,
    prepare_prompts,
    prepare_sft,
    row_number,
    split_implicit_prompt,
)
from rlhfkit.errors import DataError


def write_jsonl(path, rows):
    path.write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in rows), encoding="utf-8")
    return str(path)


def ds_of(rows):
    return datasets.Dataset.from_list(rows)


def text_ids(tok, text):
    return tok(text, add_special_tokens=False).input_ids


def one_line_error(excinfo) -> str:
    msg = str(excinfo.value)
    assert "\n" not in msg and "Traceback" not in msg
    return msg


def user(content):
    return {"role": "user", "content": content}


def assistant(content):
    return {"role": "assistant", "content": content}


# ------------------------------------------------------------------------------------- format detection


@pytest.mark.parametrize(
    "columns, expected",
    [
        (["prompt", "chosen", "rejected"], DataFormat.PREFERENCE_EXPLICIT),
        (["id", "chosen", "rejected", "margin"], DataFormat.PREFERENCE_IMPLICIT),
        (["prompt", "responses"], DataFormat.RANKED),
        (["prompt", "responses", "ranks"], DataFormat.RANKED),
        (["messages", "id"], DataFormat.SFT_MESSAGES),
        (["prompt", "completion"], DataFormat.SFT_PROMPT_COMPLETION),
        (["text", LINE_COLUMN], DataFormat.SFT_TEXT),
        (["prompt", "source"], DataFormat.PROMPT_ONLY),
    ],
)
def test_detect_format_every_layout(columns, expected):
    assert detect_format(columns) is expected


def test_detect_format_errors_list_expected_layouts_and_found_columns():
    with pytest.raises(DataError) as excinfo:
        detect_format(["question", "answer", LINE_COLUMN], allowed=PREFERENCE_FORMATS, source="data.jsonl")
    assert one_line_error(excinfo) == (
        "data.jsonl: cannot tell the data format: expected prompt/chosen/rejected, chosen/rejected or "
        "prompt/responses[/ranks]; found columns: question, answer (rename with --columns NEW=OLD, e.g. "
        "prompt=question)")
    # A recognised layout that the trainer cannot use is also an error, naming what was found.
    with pytest.raises(DataError) as excinfo:
        detect_format(["prompt", "completion"], allowed=PREFERENCE_FORMATS)
    msg = one_line_error(excinfo)
    assert "found columns: prompt, completion" in msg and "prompt/completion layout" in msg
    # Allowed layouts win over more specific ones: preference prompts can feed an RL trainer.
    assert detect_format(["prompt", "chosen", "rejected"], allowed=PROMPT_FORMATS) is DataFormat.PROMPT_ONLY
    assert detect_format(["messages"], allowed=SFT_FORMATS) is DataFormat.SFT_MESSAGES


# ------------------------------------------------------------------------------------------------ loading


def test_jsonl_loads_with_line_numbers_and_skips_blank_lines(tmp_path):
    path = write_jsonl(tmp_path / "train.jsonl", [{"text": "a"}, "", {"text": "b", "extra": 1}])
    ds = load_rows(path)
    assert ds["text"] == ["a", "b"]
    assert ds["extra"] == [None, 1]  # keys seen only in later rows are kept
    assert [row_number(ds, 0), row_number(ds, 1)] == [1, 3]


def test_jsonl_malformed_line_names_file_and_line(tmp_path):
    path = write_jsonl(tmp_path / "train.jsonl", [{"text": "a"}, {"text": "b"}, '{"text": "c",'])
    with pytest.raises(DataError) as excinfo:
        load_rows(path)
    msg = one_line_error(excinfo)
    assert msg.startswith(f"{path}, row 3: malformed JSON")
    assert excinfo.value.row == 3


def test_jsonl_non_utf8_and_non_object_lines(tmp_path):
    path = tmp_path / "bad.jsonl"
    path.write_bytes(b'{"text": "ok"}\n{"text": "caf\xe9"}\n')
    with pytest.raises(DataError) as excinfo:
        load_rows(str(path))
    assert one_line_error(excinfo) == f"{path}, row 2: not valid UTF-8"

    path = write_jsonl(tmp_path / "list.jsonl", [{"text": "ok"}, "[1, 2]"])
    with pytest.raises(DataError) as excinfo:
        load_rows(path)
    assert one_line_error(excinfo) == f"{path}, row 2: expected a JSON object, got a list"


def test_jsonl_inconsistent_types_name_column_and_row(tmp_path):
    path = write_jsonl(tmp_path / "mixed.jsonl", [{"prompt": "p", "chosen": "a", "rejected": "b"},
                                                 {"prompt": "p", "chosen": 5, "rejected": "b"}])
    with pytest.raises(DataError) as excinfo:
        load_rows(path)
    msg = one_line_error(excinfo)
    assert msg.startswith(f"{path}, row 2, field 'chosen': values of inconsistent types")
    assert "got a number" in msg


def test_inconsistent_types_name_the_earliest_bad_row_whatever_its_column(tmp_path):
    # 'chosen' goes wrong on row 4, 'rejected' already on row 2 (a later column): row 2 is what to fix first
    path = write_jsonl(tmp_path / "mixed.jsonl", [
        {"prompt": "p", "chosen": "a", "rejected": "b"},
        {"prompt": "p", "chosen": "a", "rejected": ["not", "a", "string"]},
        {"prompt": "p", "chosen": "a", "rejected": "b"},
        {"prompt": "p", "chosen": [{"role": "assistant", "content": "x"}], "rejected": "b"}])
    with pytest.raises(DataError) as excinfo:
        load_rows(path)
    msg = one_line_error(excinfo)
    assert msg.startswith(f"{path}, row 2, field 'rejected': values of inconsistent types: expected a string")
    assert msg.endswith("; also column 'chosen'")


def test_json_file_layouts_and_errors(tmp_path):
    (tmp_path / "list.json").write_text(json.dumps([{"text": "a"}, {"text": "b"}]))
    assert load_rows(str(tmp_path / "list.json"))["text"] == ["a", "b"]
    (tmp_path / "wrapped.json").write_text(json.dumps({"data": [{"text": "c"}]}))
    assert load_rows(str(tmp_path / "wrapped.json"))["text"] == ["c"]
    (tmp_path / "broken.json").write_text('[{"text": "a"},\n {"text": ]')
    with pytest.raises(DataError) as excinfo:
        load_rows(str(tmp_path / "broken.json"))
    assert one_line_error(excinfo).startswith(f"{tmp_path / 'broken.json'}: malformed JSON at line 2")
    (tmp_path / "scalars.json").write_text("[1]")
    with pytest.raises(DataError, match="row 1: expected a JSON object"):
        load_rows(str(tmp_path / "scalars.json"))


def test_missing_file_unsupported_suffix_and_hub_name(tmp_path):
    with pytest.raises(DataError) as excinfo:
        load_rows(str(tmp_path / "nope.jsonl"))
    assert one_line_error(excinfo) == f"{tmp_path / 'nope.jsonl'}: file not found"
    (tmp_path / "notes.md").write_text("hi")
    with pytest.raises(DataError, match="unsupported file type '.md'"):
        load_rows(str(tmp_path / "notes.md"))
    # No network in tests (conftest sets HF_DATASETS_OFFLINE): the hub path fails as one clean line.
    with pytest.raises(DataError) as excinfo:
        load_rows("someone/no-such-dataset-rlhfkit")
    assert one_line_error(excinfo).startswith("someone/no-such-dataset-rlhfkit: cannot load dataset:")


def test_parquet_and_local_directory_via_datasets(tmp_path):
    rows = [{"prompt": "p1", "completion": "c1"}, {"prompt": "p2", "completion": "c2"}]
    ds_of(rows).to_parquet(str(tmp_path / "train.parquet"))
    ds = load_rows(str(tmp_path / "train.parquet"))
    assert ds["completion"] == ["c1", "c2"] and row_number(ds, 1) == 2

    folder = tmp_path / "folder"
    folder.mkdir()
    write_jsonl(folder / "train.jsonl", rows)
    write_jsonl(folder / "test.jsonl", rows[:1])
    assert load_rows(str(folder))["prompt"] == ["p1", "p2"]
    assert load_rows(str(folder), split="test")["prompt"] == ["p1"]
    with pytest.raises(DataError) as excinfo:
        load_rows(str(folder), split="validation")
    assert one_line_error(excinfo) == (f"{folder}: no split 'validation'; it has splits train, test "
                                       "(pick one with --dataset-split)")


# ----------------------------------------------------------------------------------- bad rows & reports


def test_missing_and_wrong_type_fields_name_row_and_field(tmp_path, tiny_tokenizer):
    path = write_jsonl(tmp_path / "pref.jsonl", [{"prompt": "q", "chosen": "a", "rejected": "b"}, "",
                                                 {"prompt": "q", "chosen": "a"}])
    with pytest.raises(DataError) as excinfo:
        prepare_preferences(load_rows(path), tiny_tokenizer, 64)
    assert one_line_error(excinfo) == f"{path}, row 3, field 'rejected': missing"

    path = write_jsonl(tmp_path / "num.jsonl", [{"prompt": "q", "chosen": 7, "rejected": 8}])
    with pytest.raises(DataError) as excinfo:
        prepare_preferences(load_rows(path), tiny_tokenizer, 64)
    assert one_line_error(excinfo).startswith(f"{path}, row 1, field 'chosen': expected a string or a list")


def test_skips_are_counted_with_first_row(tmp_path, tiny_tokenizer, caplog):
    rows = [
        {"prompt": "q1", "chosen": "good", "rejected": "bad"},
        {"prompt": "q2", "chosen": "  ", "rejected": "bad"},
        {"prompt": "q3", "chosen": "same", "rejected": "same"},
        {"prompt": "q4", "chosen": "ok", "rejected": "\n"},
        {"prompt": "q5", "chosen": "yes", "rejected": "no"},
    ]
    path = write_jsonl(tmp_path / "train.jsonl", rows)
    groups, report = prepare_preferences(load_rows(path), tiny_tokenizer, 64, source="train.jsonl")
    assert len(groups) == 2
    assert (report.total_rows, report.kept, report.truncated) == (5, 2, 0)
    assert report.skipped == {"empty response": 2, "chosen == rejected": 1}
    assert report.first_row == {"empty response": 2, "chosen == rejected": 3}
    assert report.summary("train.jsonl") == ("train.jsonl: 2/5 rows kept; skipped 2 empty response (first: row 2), "
                                             "1 chosen == rejected (first: row 3)")
    with caplog.at_level(logging.INFO, logger="rlhfkit"):
        report.log(logging.getLogger("rlhfkit"), "train.jsonl")
    assert caplog.records[-1].levelno == logging.WARNING

    sft, sft_report = prepare_sft(ds_of([{"prompt": "q", "completion": ""}, {"prompt": "q", "completion": "a"}]),
                                  tiny_tokenizer, 64)
    assert len(sft) == 1 and sft_report.skipped == {"empty response": 1} and sft_report.first_row["empty response"] == 1


def test_message_roles_outside_the_known_ones_are_kept_and_counted_once_per_row(tiny_tokenizer, caplog):
    def chat(user_role="user", assistant="Hello"):
        return [{"role": user_role, "content": "Hi"}, {"role": "assistant", "content": assistant}]

    rows = [{"messages": chat()}, {"messages": chat("usr")}, {"messages": chat("tool")},
            {"messages": [{"role": "usr", "content": "a"}, {"role": "Assistant", "content": "b"}]}]
    records, report = prepare_sft(ds_of(rows), tiny_tokenizer, 64, source="chat.jsonl")
    # kept as written (a template may know a role we do not); row 4, with no "assistant" turn, is skipped for that
    assert len(records) == 3 and report.skipped == {"no assistant turn": 1}
    assert report.noted == {"with a message role outside system/user/assistant/tool/developer/function/ipython": 2}
    assert report.summary().endswith("; 2 rows with a message role outside system/user/assistant/tool/developer/"
                                     "function/ipython (first: row 2, 'usr'; kept as written)")
    with caplog.at_level(logging.INFO, logger="rlhfkit"):
        report.log()
    assert caplog.records[-1].levelno == logging.WARNING
    # preference pairs: a row whose prompt carries the odd role twice counts once
    pairs = [{"prompt": chat("human")[:1], "chosen": chat()[1:], "rejected": chat(assistant="Go")[1:]},
             {"prompt": chat("usr")[:1] * 2, "chosen": chat()[1:], "rejected": chat(assistant="Go")[1:]}]
    _, pair_report = prepare_preferences(ds_of(pairs), tiny_tokenizer, 64)
    assert pair_report.noted == {"with a message role outside system/user/assistant/tool/developer/function/ipython": 2}
    assert pair_report.first_noted[next(iter(pair_report.noted))] == (1, "human")
    _, clean = prepare_sft(ds_of(rows[:1] + rows[2:3]), tiny_tokenizer, 64)
    assert clean.noted == {} and "role" not in clean.summary()


def test_all_rows_skipped_is_an_error(tiny_tokenizer):
    with pytest.raises(DataError) as excinfo:
        prepare_preferences(ds_of([{"prompt": "q", "chosen": "x", "rejected": "x"}]), tiny_tokenizer, 32,
                            source="t.jsonl")
    assert one_line_error(excinfo) == "t.jsonl: no usable rows (0/1 rows kept; skipped 1 chosen == rejected " \
                                      "(first: row 1))"


def test_report_summary_and_info_log(caplog):
    report = PrepareReport(total_rows=100, kept=98, truncated=3, max_length=128)
    report.skip("empty response", 7)
    report.skip("chosen == rejected", 9)
    assert report.summary("train.jsonl") == (
        "train.jsonl: 98/100 rows kept; skipped 1 empty response (first: row 7), 1 chosen == rejected "
        "(first: row 9); truncated 3 to max_length 128")
    clean = PrepareReport(total_rows=2, kept=2)
    with caplog.at_level(logging.INFO, logger="rlhfkit"):
        clean.log(None, "x.jsonl")
    assert caplog.records[-1].levelno == logging.INFO and caplog.records[-1].getMessage() == "x.jsonl: 2/2 rows kept"


# ------------------------------------------------------------------------------------------- truncation


def test_truncation_keeps_prompt_end_and_response_start(tiny_tokenizer):
    tok, eos = tiny_tokenizer, tiny_tokenizer.eos_token_id
    prompt = "one two three four five six seven eight nine ten"
    response = "the cat sat on the mat with a hat"
    p, r = tok(prompt).input_ids, text_ids(tok, response) + [eos]
    assert len(p) > 6 and len(r) > 6
    records, report = prepare_sft(ds_of([{"prompt": prompt, "completion": response}]), tok, 12)
    # Both too long: the prompt keeps max_length // 2 = 6 tokens (BOS and its last 5), the completion its first 6.
    assert p[0] == tok.bos_token_id
    assert records[0]["input_ids"] == p[:1] + p[-5:] + r[:6]
    assert records[0]["loss_mask"] == [0] * 6 + [1] * 6
    assert report.truncated == 1 and report.summary("s").endswith("truncated 1 to max_length 12")

    groups, report = prepare_preferences(ds_of([{"prompt": prompt, "chosen": response, "rejected": "no"}]), tok, 12)
    assert groups[0]["prompt_ids"] == p[:1] + p[-5:]
    assert groups[0]["responses"] == [r[:6], text_ids(tok, "no") + [eos]]
    assert report.truncated == 1

    # A short response leaves more room for the prompt (cut only as far as needed)...
    groups, _ = prepare_preferences(ds_of([{"prompt": prompt, "chosen": "yes", "rejected": "no"}]), tok, len(p))
    longest = max(len(x) for x in groups[0]["responses"])
    assert groups[0]["prompt_ids"] == p[:1] + p[-(len(p) - longest - 1):]
    # ...unless max_prompt_length is given explicitly.
    groups, _ = prepare_preferences(ds_of([{"prompt": prompt, "chosen": "yes", "rejected": "no"}]), tok, 64,
                                    max_prompt_length=3)
    assert groups[0]["prompt_ids"] == p[:1] + p[-2:]

    # Plain text keeps its start.
    records, _ = prepare_sft(ds_of([{"text": prompt}]), tok, 5)
    assert records[0]["input_ids"] == p[:5] and records[0]["loss_mask"] == [0, 1, 1, 1, 1]


# -------------------------------------------------------------------------------------- preference data


def test_hh_rlhf_implicit_prompt_split(tiny_tokenizer):
    tok, eos = tiny_tokenizer, tiny_tokenizer.eos_token_id
    chosen = "\n\nHuman: hi\n\nAssistant: good"
    rejected = "\n\nHuman: hi\n\nAssistant: bad"
    assert split_implicit_prompt(chosen, rejected) == ("\n\nHuman: hi\n\nAssistant:", " good", " bad")
    multi = ("\n\nHuman: a\n\nAssistant: b\n\nHuman: c\n\nAssistant: yes", "\n\nHuman: a\n\nAssistant: b\n\nHuman: c"
             "\n\nAssistant: yeah")
    assert split_implicit_prompt(*multi)[0] == "\n\nHuman: a\n\nAssistant: b\n\nHuman: c\n\nAssistant:"
    # Without the marker the cut falls on the last whitespace, never inside a word.
    assert split_implicit_prompt("The cat sat", "The car sat") == ("The", " cat sat", " car sat")
    # Chat lists: the shared leading messages are the prompt.
    assert split_implicit_prompt([user("q"), assistant("a")], [user("q"), assistant("b")]) == (
        [user("q")], [assistant("a")], [assistant("b")])

    groups, _ = prepare_preferences(ds_of([{"chosen": chosen, "rejected": rejected}]), tok, 64)
    g = groups[0]
    assert g["prompt_ids"] == tok("\n\nHuman: hi\n\nAssistant:").input_ids
    assert g["prompt_ids"][0] == tok.bos_token_id
    assert g["responses"] == [text_ids(tok, " good") + [eos], text_ids(tok, " bad") + [eos]]
    assert g["ranks"] == [0, 1] and g["margin"] == 0.0


def test_ultrafeedback_and_trl_conversational_layouts_agree(tiny_tokenizer):
    tok = tiny_tokenizer
    ultrafeedback = {"prompt": "What is 2+2?",
                     "chosen": [user("What is 2+2?"), assistant("four")],
                     "rejected": [user("What is 2+2?"), assistant("five")],
                     "score_chosen": 9.0}
    trl = {"prompt": [user("What is 2+2?")], "chosen": [assistant("four")], "rejected": [assistant("five")]}
    (uf_group,), _ = prepare_preferences(ds_of([ultrafeedback]), tok, 64)
    (trl_group,), _ = prepare_preferences(ds_of([trl]), tok, 64)
    assert uf_group == trl_group
    prompt_text = tok.apply_chat_template([user("What is 2+2?")], tokenize=False, add_generation_prompt=True)
    assert uf_group["prompt_ids"] == text_ids(tok, prompt_text)
    assert [tok.decode(r) for r in uf_group["responses"]] == ["four<|eos|>", "five<|eos|>"]
    assert uf_group["prompt_ids"].count(tok.bos_token_id) == 1  # the template's BOS only


def test_ultrafeedback_mismatched_history_is_an_error(tiny_tokenizer):
    row = {"prompt": "q", "chosen": [user("q"), assistant("a")], "rejected": [user("other"), assistant("b")]}
    with pytest.raises(DataError) as excinfo:
        prepare_preferences(ds_of([row]), tiny_tokenizer, 64, source="uf")
    assert one_line_error(excinfo).startswith("uf, row 1, field 'rejected': the conversation differs")


def test_ranked_with_and_without_ranks_and_margin(tiny_tokenizer):
    tok = tiny_tokenizer
    rows = [
        {"prompt": "q", "responses": ["best", "mid", "worst"], "ranks": None, "margin": None},
        {"prompt": "q", "responses": ["a", "b", "c", "d"], "ranks": [3, 1, 1, 2], "margin": 1.5},
        {"prompt": "q", "responses": ["a", "b"], "ranks": [1, 1], "margin": 0.0},
        {"prompt": "q", "responses": ["only"], "ranks": None, "margin": None},
    ]
    groups, report = prepare_preferences(ds_of(rows), tok, 64)
    assert [g["ranks"] for g in groups] == [[0, 1, 2], [2, 0, 0, 1]]  # dense ranks, ties shared
    assert [g["margin"] for g in groups] == [0.0, 1.5]
    assert groups[0]["responses"][2] == text_ids(tok, "worst") + [tok.eos_token_id]
    assert report.skipped == {"no strict preference": 1, "fewer than 2 responses": 1}
    assert report.first_row == {"no strict preference": 3, "fewer than 2 responses": 4}

    bad = [{"prompt": "q", "responses": ["a", "b"], "ranks": [1, 2, 3]}]
    with pytest.raises(DataError) as excinfo:
        prepare_preferences(ds_of(bad), tok, 64, source="r.jsonl")
    assert one_line_error(excinfo).startswith("r.jsonl, row 1, field 'ranks': expected a list of 2 numbers")


def test_expand_to_pairs():
    group = {"prompt_ids": [1, 5], "responses": [[10], [11], [12], [13]], "ranks": [0, 1, 2, 3], "margin": 0.5}
    pairs = expand_to_pairs([group])
    assert len(pairs) == 4 * 3 // 2
    assert [p["responses"] for p in pairs[:3]] == [[[10], [11]], [[10], [12]], [[10], [13]]]
    assert all(p["ranks"] == [0, 1] and p["prompt_ids"] == [1, 5] and p["margin"] == 0.5 for p in pairs)
    tied = dict(group, ranks=[0, 0, 1, 1])
    assert len(expand_to_pairs([tied])) == 4  # ties make no pair
    reverse = dict(group, ranks=[3, 2, 1, 0])
    assert expand_to_pairs([reverse])[0]["responses"] == [[11], [10]]


# ---------------------------------------------------------------------------------------------------- SFT


def masked_runs(tok, ids, mask):
    """Decode each contiguous run of loss-masked tokens."""
    runs, current = [], []
    for t, m in zip(ids, mask):
        if m:
            current.append(t)
        elif current:
            runs.append(current)
            current = []
    if current:
        runs.append(current)
    return [tok.decode(r) for r in runs]


def test_sft_messages_mask_covers_exactly_the_assistant_turns(tiny_tokenizer):
    tok = tiny_tokenizer
    messages = [{"role": "system", "content": "Be brief."}, user("hello there"), assistant("hi, how can I help?"),
                user("what is the capital"), assistant("Paris is the capital.")]
    (record,), report = prepare_sft(ds_of([{"messages": messages}]), tok, 256)
    ids, mask = record["input_ids"], record["loss_mask"]
    assert masked_runs(tok, ids, mask) == ["hi, how can I help?<|eos|>", "Paris is the capital.<|eos|>"]
    assert ids[0] == tok.bos_token_id and mask[0] == 0
    # The chunks concatenate to the template's rendering (minus the text after the final EOS).
    full = tok.apply_chat_template(messages, tokenize=False)
    assert tok.decode(ids) == full[: full.rindex("<|eos|>") + len("<|eos|>")]
    assert report.kept == 1

    (everything,), _ = prepare_sft(ds_of([{"messages": messages}]), tok, 256, completion_only_loss=False)
    assert everything["input_ids"] == ids and everything["loss_mask"] == [0] + [1] * (len(ids) - 1)


def test_sft_prompt_completion_and_text_masks(tiny_tokenizer):
    tok, eos = tiny_tokenizer, tiny_tokenizer.eos_token_id
    rows = [{"prompt": "Question: two plus two?", "completion": " four"}]
    (record,), _ = prepare_sft(ds_of(rows), tok, 64)
    p, c = tok(rows[0]["prompt"]).input_ids, text_ids(tok, " four") + [eos]
    assert record == {"input_ids": p + c, "loss_mask": [0] * len(p) + [1] * len(c)}

    (text,), _ = prepare_sft(ds_of([{"text": "the sea is blue"}]), tok, 64)
    assert text["input_ids"] == tok("the sea is blue").input_ids + [eos]
    assert text["loss_mask"] == [0] + [1] * (len(text["input_ids"]) - 1)

    # Position 0 is never trained on, whatever the layout or flag.
    conv = [{"messages": [assistant("I start."), user("ok"), assistant("done")]}]
    for data in (rows, [{"text": "x"}], conv):
        for flag in (True, False):
            records, _ = prepare_sft(ds_of(data), tok, 64, completion_only_loss=flag)
            assert all(r["loss_mask"][0] == 0 and len(r["loss_mask"]) == len(r["input_ids"]) for r in records)


def test_sft_missing_chat_template_falls_back_with_warning(tiny_tokenizer, caplog):
    import copy

    tok = copy.deepcopy(tiny_tokenizer)
    tok.chat_template = None
    messages = [user("hi"), assistant("yo")]
    with caplog.at_level(logging.WARNING, logger="rlhfkit"):
        (record,), _ = prepare_sft(ds_of([{"messages": messages}]), tok, 64, source="chat.jsonl")
    assert masked_runs(tok, record["input_ids"], record["loss_mask"]) == ["yo<|eos|>"]
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert warnings == ["chat.jsonl: the tokenizer has no chat template; using rlhfkit's default template"]


def test_prefix_unstable_chat_template_is_an_error(tiny_tokenizer):
    import copy

    tok = copy.deepcopy(tiny_tokenizer)
    tok.chat_template = ("{% for m in messages %}{{ m['content'] }}{% endfor %}"
                         "{% if add_generation_prompt %}[answer]{% endif %}")
    with pytest.raises(DataError) as excinfo:
        prepare_preferences(ds_of([{"prompt": [user("q")], "chosen": [assistant("a")],
                                    "rejected": [assistant("b")]}]), tok, 64, source="c.jsonl")
    assert "c.jsonl, row 1, field 'chosen': chat template is not prefix-stable" in one_line_error(excinfo)


def test_prepare_prompts(tiny_tokenizer):
    tok = tiny_tokenizer
    rows = [{"prompt": "tell me a story", "chosen": "x", "rejected": "y"},
            {"prompt": [user("hi")], "chosen": "x", "rejected": "y"}, {"prompt": " ", "chosen": "x", "rejected": "y"}]
    # Mixed string / list prompts cannot share one Arrow column, so build the two datasets separately.
    strings, report = prepare_prompts(ds_of([rows[0], rows[2]]), tok, 64)
    assert strings == [{"prompt": "tell me a story", "prompt_ids": tok("tell me a story").input_ids,
                        "raw_prompt": "tell me a story", "columns": {"chosen": "x", "rejected": "y"}}]
    assert report.skipped == {"empty prompt": 1} and report.first_row == {"empty prompt": 2}
    (chat,), _ = prepare_prompts(ds_of([rows[1]]), tok, 64)
    assert chat["prompt"] == "<|bos|><|user|>\nhi\n<|assistant|>\n"
    assert chat["prompt_ids"] == text_ids(tok, chat["prompt"])
    assert chat["raw_prompt"] == [user("hi")] and chat["columns"] == {"chosen": "x", "rejected": "y"}
    (short,), report = prepare_prompts(ds_of([rows[0]]), tok, 3)
    full = tok("tell me a story").input_ids
    assert short["prompt_ids"] == full[:1] + full[-2:] and full[0] == tok.bos_token_id and report.truncated == 1
    assert short["prompt"] == tok.decode(short["prompt_ids"])


# ------------------------------------------------------------------------------------------------ collate


def test_pad_and_pack_agree():
    seqs = [[5, 6, 7], [8, 9], [10, 11, 12, 13]]
    masks = [[1, 0, 1], [0, 1], [0, 0, 1, 1]]  # position 0 of the first is forced to 0
    padded = pad_batch(seqs, masks, pad_token_id=0)
    packed = pack_batch(seqs, masks)
    assert padded["input_ids"].tolist() == [[5, 6, 7, 0], [8, 9, 0, 0], [10, 11, 12, 13]]
    assert padded["attention_mask"].tolist() == [[1, 1, 1, 0], [1, 1, 0, 0], [1, 1, 1, 1]]
    assert padded["loss_mask"].tolist() == [[0, 0, 1, 0], [0, 1, 0, 0], [0, 0, 1, 1]]
    assert padded["last_index"].tolist() == [2, 1, 3]
    assert "attention_mask" not in packed
    assert packed["input_ids"].tolist() == [[5, 6, 7, 8, 9, 10, 11, 12, 13]]
    assert packed["position_ids"].tolist() == [[0, 1, 2, 0, 1, 0, 1, 2, 3]]
    assert packed["sequence_index"].tolist() == [[0, 0, 0, 1, 1, 2, 2, 2, 2]]
    assert packed["last_index"].tolist() == [2, 4, 8]
    # Same tokens and loss tokens either way.
    real = padded["attention_mask"].bool()
    assert padded["input_ids"][real].tolist() == packed["input_ids"][0].tolist()
    assert padded["loss_mask"][real].tolist() == packed["loss_mask"][0].tolist()
    for b, seq in enumerate(seqs):
        assert packed["input_ids"][0, packed["last_index"][b]] == seq[-1]
        assert padded["input_ids"][b, padded["last_index"][b]] == seq[-1]
    assert (padded["num_tokens"], padded["num_loss_tokens"]) == (9, 4)
    assert (packed["num_tokens"], packed["num_loss_tokens"], packed["num_sequences"]) == (9, 4, 3)


def test_collate_groups_layout():
    groups = [{"prompt_ids": [1, 2], "responses": [[3, 4], [5]], "ranks": [0, 1], "margin": 0.5},
              {"prompt_ids": [1], "responses": [[6], [7, 8], [9]], "ranks": [1, 0, 0], "margin": 0.0}]
    batch = collate_groups(groups, pad_token_id=0, packed=False)
    assert batch["input_ids"].tolist() == [[1, 2, 3, 4], [1, 2, 5, 0], [1, 6, 0, 0], [1, 7, 8, 0], [1, 9, 0, 0]]
    assert batch["loss_mask"].tolist() == [[0, 0, 1, 1], [0, 0, 1, 0], [0, 1, 0, 0], [0, 1, 1, 0], [0, 1, 0, 0]]
    assert batch["group_index"].tolist() == [0, 0, 1, 1, 1]
    assert batch["ranks"].tolist() == [0.0, 1.0, 1.0, 0.0, 0.0]
    assert batch["margins"].tolist() == [0.5, 0.0] and batch["num_groups"] == 2
    packed = collate_groups(groups, pad_token_id=0, packed=True)
    assert packed["input_ids"].tolist() == [[1, 2, 3, 4, 1, 2, 5, 1, 6, 1, 7, 8, 1, 9]]
    assert packed["last_index"].tolist() == [3, 6, 8, 11, 13]
    assert packed["group_index"].tolist() == [0, 0, 1, 1, 1]


def test_packed_forward_matches_padded_on_tiny_model(tiny_model_dir, tiny_tokenizer):
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir).eval()
    rows = [{"prompt": "what is the sea", "completion": "blue water"}, {"prompt": "hi", "completion": "hello"}]
    records, _ = prepare_sft(ds_of(rows), tiny_tokenizer, 64)
    padded = collate_sequences(records, tiny_tokenizer.pad_token_id, packed=False)
    packed = collate_sequences(records, tiny_tokenizer.pad_token_id, packed=True)
    with torch.no_grad():
        pad_logits = model(input_ids=padded["input_ids"], attention_mask=padded["attention_mask"],
                           use_cache=False).logits
        pack_logits = model(input_ids=packed["input_ids"], position_ids=packed["position_ids"],
                            use_cache=False).logits
    real = padded["attention_mask"].bool()
    assert torch.allclose(pad_logits[real], pack_logits[0], atol=1e-4)
