"""Datasets as people have them: saved Dataset / DatasetDict folders, named splits, folders of files, column
maps (GSM8K's question/answer), the prompt format (auto / chat / raw) and BOS kept when a prompt is cut."""

from __future__ import annotations

import json

import datasets
import pytest

from rlhfkit.data import (
    choose_split,
    load_rows,
    parse_column_map,
    prepare_preferences,
    prepare_prompts,
    prepare_sft,
    resolve_prompt_format,
)
from rlhfkit.errors import ConfigError, DataError

# A template of the tokenizer's own (not rlhfkit's fallback), with BOS in its text and a newline after each
# turn's EOS, as Qwen / Gemma / Phi-3 templates have.
OWN_TEMPLATE = ("{{ bos_token }}{% for m in messages %}<|{{ m['role'] }}|>{{ m['content'] }}{{ eos_token }}\n"
                "{% endfor %}{% if add_generation_prompt %}<|assistant|>{% endif %}")
PREFS = [{"prompt": f"What is {i} plus {i}?", "chosen": f"It is {2 * i}.", "rejected": "No idea."} for i in range(6)]
SFT = [{"prompt": f"Say {w}.", "completion": f"{w}!"} for w in ("yes", "no", "maybe", "hello")]


def one_line(excinfo) -> str:
    msg = str(excinfo.value)
    assert "\n" not in msg
    return msg


@pytest.fixture(scope="module")
def own_tokenizer(tiny_model_dir):
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(tiny_model_dir)
    tok.chat_template = OWN_TEMPLATE
    return tok


@pytest.fixture(scope="module")
def ultrafeedback_dir(tmp_path_factory):
    """A DatasetDict saved to disk with UltraFeedback-binarized's four split names."""
    root = tmp_path_factory.mktemp("uf") / "uf"
    prefs, sft = datasets.Dataset.from_list(PREFS), datasets.Dataset.from_list(SFT)
    datasets.DatasetDict({"train_prefs": prefs, "test_prefs": prefs.select(range(2)), "train_sft": sft,
                          "test_sft": sft.select(range(1))}).save_to_disk(str(root))
    return root


# ------------------------------------------------------------------------------------------ layouts


def test_saved_dataset_folder_loads(tmp_path):
    datasets.Dataset.from_list(PREFS).save_to_disk(str(tmp_path / "saved"))
    ds = load_rows(str(tmp_path / "saved"))
    assert ds["prompt"] == [r["prompt"] for r in PREFS]
    assert len(load_rows(str(tmp_path / "saved"), split="train")) == 6  # an old config's default still works
    with pytest.raises(DataError) as excinfo:
        load_rows(str(tmp_path / "saved"), split="test")
    assert one_line(excinfo) == (f"{tmp_path / 'saved'}: no split 'test'; it is a single split (train): drop "
                                 "--dataset-split")


def test_saved_dataset_dict_picks_named_split_and_never_merges(ultrafeedback_dir):
    src = str(ultrafeedback_dir)
    assert load_rows(src, split="train_sft")["prompt"] == [r["prompt"] for r in SFT]
    assert len(load_rows(src, split="test_prefs")) == 2
    with pytest.raises(DataError) as excinfo:
        load_rows(src)
    names = "train_prefs, test_prefs, train_sft, test_sft"  # in the order the DatasetDict has them
    assert one_line(excinfo) == f"{src}: has splits {names}: pick one with --dataset-split"
    with pytest.raises(DataError) as excinfo:
        load_rows(src, purpose="eval")
    assert one_line(excinfo) == f"{src}: has splits {names}: pick one with --eval-split"
    with pytest.raises(DataError) as excinfo:
        load_rows(src, split="train")
    assert one_line(excinfo) == f"{src}: no split 'train'; it has splits {names} (pick one with --dataset-split)"


def test_split_rule():
    assert choose_split(["train_prefs", "test_prefs"], None, "d") == "train_prefs"
    assert choose_split(["train_prefs", "test_prefs"], None, "d", purpose="eval") == "test_prefs"
    assert choose_split(["sft_train", "sft_validation"], None, "d", purpose="eval") == "sft_validation"
    assert choose_split(["only"], None, "d", purpose="eval") == "only"
    assert choose_split(["training", "train"], None, "d") == "train"  # "training" is not a train_* name
    with pytest.raises(DataError, match="has splits a, b: pick one with --x"):
        choose_split(["a", "b"], None, "d", flag="--x")


def test_folder_of_jsonl_files(tmp_path):
    folder = tmp_path / "data"
    folder.mkdir()
    (folder / "train.jsonl").write_text("".join(json.dumps(r) + "\n" for r in PREFS))
    (folder / "test.jsonl").write_text("".join(json.dumps(r) + "\n" for r in PREFS[:2]))
    assert len(load_rows(str(folder))) == 6
    assert len(load_rows(str(folder), purpose="eval")) == 2
    assert len(load_rows(str(folder), split="test")) == 2


def test_configurations_of_a_data_folder_as_on_the_hub(tmp_path):
    """A dataset with several configurations (openai/gsm8k: main, socratic), declared in its README as the hub
    does: --dataset-config picks one; none given -> an error listing them; a file takes none."""
    folder = tmp_path / "gsm8k"
    for config, n in (("main", 3), ("socratic", 2)):
        (folder / config).mkdir(parents=True)
        for split, k in (("train", n), ("test", 1)):
            rows = [{"question": f"{config} {split} {i}?", "answer": str(i)} for i in range(k)]
            (folder / config / f"{split}.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    (folder / "README.md").write_text("---\nconfigs:\n" + "".join(
        f"- config_name: {c}\n  data_files:\n  - split: train\n    path: {c}/train.jsonl\n"
        f"  - split: test\n    path: {c}/test.jsonl\n" for c in ("main", "socratic")) + "---\n")
    main = load_rows(str(folder), config="main", columns="prompt=question")
    assert main["prompt"] == ["main train 0?", "main train 1?", "main train 2?"]
    assert load_rows(str(folder), config="socratic", purpose="eval")["question"] == ["socratic test 0?"]
    with pytest.raises(DataError) as excinfo:
        load_rows(str(folder))
    assert one_line(excinfo) == f"{folder}: has configurations main, socratic: pick one with --dataset-config"
    with pytest.raises(DataError) as excinfo:
        load_rows(str(folder), config="mian", purpose="eval")
    assert one_line(excinfo) == (f"{folder}: no configuration 'mian'; it has main, socratic (pick one with "
                                 "--eval-dataset-config)")
    with pytest.raises(DataError) as excinfo:
        load_rows(str(folder / "main" / "train.jsonl"), config="main")
    assert "a file or a save_to_disk folder has no configurations" in one_line(excinfo)


# -------------------------------------------------------------------------------------- column map


def test_gsm8k_columns_through_the_prompt_loader(tmp_path, tiny_tokenizer):
    rows = [{"question": "Tom has 3 apples and buys 4 more. How many?", "answer": "3 + 4 = 7\n#### 7"},
            {"question": "What is 6 times 7?", "answer": "#### 42"}]
    path = tmp_path / "gsm8k.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    ds = load_rows(str(path), columns="prompt=question")
    records, report = prepare_prompts(ds, tiny_tokenizer, 64, prompt_format="raw")
    assert report.kept == 2
    assert records[0]["prompt_ids"] == tiny_tokenizer(rows[0]["question"]).input_ids
    assert [r["columns"] for r in records] == [{"answer": r["answer"]} for r in rows]
    assert load_rows(str(path), columns={"prompt": "question"}).column_names[:2] == ["prompt", "answer"]

    with pytest.raises(DataError) as excinfo:
        load_rows(str(path), columns="prompt=query")
    assert one_line(excinfo) == f"{path}: --columns prompt=query: no column 'query'; columns: question, answer"
    with pytest.raises(DataError) as excinfo:
        load_rows(str(path), columns="answer=question")
    assert one_line(excinfo) == (f"{path}: --columns answer=question: there is already a column 'answer' (it "
                                 "would be lost); map it to another name too, e.g. answer_orig=answer")
    swapped = load_rows(str(path), columns="answer=question,question=answer")  # a swap loses nothing
    assert swapped["answer"] == [r["question"] for r in rows]
    with pytest.raises(ConfigError, match="--columns 'prompt': expected NEW=OLD, e.g. prompt=question"):
        parse_column_map("prompt")


def test_csv_and_a_yaml_column_map(tmp_path, tiny_tokenizer):
    from rlhfkit.options import parse_trainer_args
    from rlhfkit.trainers import SFTConfig

    (tmp_path / "qa.csv").write_text('question,answer\n"What is 6 times 7, exactly?",42\n"Say hi",17\n')
    ds = load_rows(str(tmp_path / "qa.csv"), columns="prompt=question,completion=answer")
    # CSV cells are plain values: pandas reads a column of numbers as numbers, which a completion cannot be
    assert ds["prompt"] == ["What is 6 times 7, exactly?", "Say hi"] and ds["completion"] == [42, 17]
    with pytest.raises(DataError, match="row 1, field 'completion': expected a string or a list of chat messages"):
        prepare_sft(ds, tiny_tokenizer, 64)
    (tmp_path / "sft.yaml").write_text("columns:\n  prompt: question\n  completion: answer\n")
    config = parse_trainer_args(SFTConfig, ["--config", str(tmp_path / "sft.yaml")], "rlhfkit sft", "")
    assert parse_column_map(config.columns) == {"prompt": "question", "completion": "answer"}
    assert (config.dataset_split, config.eval_split, config.prompt_format) == (None, None, "auto")


def test_cli_dpo_with_column_map_and_saved_split(tiny_model_dir, tmp_path, capsys):
    from rlhfkit.cli import main

    renamed = [{"query": r["prompt"], "good": r["chosen"], "bad": r["rejected"]} for r in PREFS]
    folder = tmp_path / "prefs"
    datasets.DatasetDict({"train_prefs": datasets.Dataset.from_list(renamed),
                          "test_prefs": datasets.Dataset.from_list(renamed[:2])}).save_to_disk(str(folder))
    out = tmp_path / "out"
    code = main(["dpo", "--model", str(tiny_model_dir), "--dataset", str(folder), "--dataset-split", "train_prefs",
                 "--eval-dataset", str(folder), "--columns", "prompt=query,chosen=good,rejected=bad",
                 "--output-dir", str(out), "--max-steps", "2", "--per-device-batch-size", "2", "--max-length", "48",
                 "--no-progress-bar", "--num-threads", "1", "--eval-on-start", "false"])
    assert code == 0
    summary = json.loads((out / "summary.json").read_text())
    assert summary["train_rows"] == 6 and summary["train_pairs"] == 6
    lines = capsys.readouterr().err.splitlines()
    assert lines.count("[rlhfkit] prompt format: raw (tokenizer has no chat template of its own; string prompts "
                       "stay text)") == 1
    # the eval split was not named: the only test_* split (2 rows) was taken
    assert lines.count(f"[rlhfkit] {folder}: 6/6 rows kept") == 1 and lines.count(f"[rlhfkit] {folder}: 2/2 rows kept") == 1


# ------------------------------------------------------------------------------------ prompt format


def test_prompt_format_auto_chat_raw(own_tokenizer, tiny_tokenizer):
    tok = own_tokenizer
    ds = datasets.Dataset.from_list([{"prompt": "hello there", "completion": "hi"}])
    chat_ids = tok.apply_chat_template([{"role": "user", "content": "hello there"}], add_generation_prompt=True)
    if isinstance(chat_ids, dict) or hasattr(chat_ids, "input_ids"):
        chat_ids = chat_ids["input_ids"]
    raw_ids = tok("hello there").input_ids
    assert chat_ids != raw_ids
    (auto,), _ = prepare_prompts(ds, tok, 64)
    (chat,), _ = prepare_prompts(ds, tok, 64, prompt_format="chat")
    (raw,), _ = prepare_prompts(ds, tok, 64, prompt_format="raw")
    assert auto["prompt_ids"] == chat["prompt_ids"] == list(chat_ids) and raw["prompt_ids"] == raw_ids
    assert auto["prompt"] == "<|bos|><|user|>hello there<|eos|>\n<|assistant|>"

    # SFT: the completion becomes the assistant turn (through its EOS); text rows stay text
    (sft,), _ = prepare_sft(ds, tok, 64)
    full = tok.apply_chat_template([{"role": "user", "content": "hello there"}, {"role": "assistant", "content": "hi"}],
                                   tokenize=False)
    assert tok.decode(sft["input_ids"]) + "\n" == full
    assert sft["loss_mask"].count(1) == len(tok("hi<|eos|>", add_special_tokens=False).input_ids)
    (text,), _ = prepare_sft(datasets.Dataset.from_list([{"text": "hello there"}]), tok, 64)
    assert text["input_ids"] == raw_ids + [tok.eos_token_id]
    # preferences: prompt + chosen/rejected as one conversation each
    (group,), _ = prepare_preferences(datasets.Dataset.from_list([{"prompt": "hello there", "chosen": "hi",
                                                                   "rejected": "go"}]), tok, 64)
    assert group["prompt_ids"] == list(chat_ids)

    # rlhfkit's fallback template (the tiny test models') is not the tokenizer's own: auto stays raw
    assert resolve_prompt_format(tiny_tokenizer, "auto") == "raw"
    (tiny,), _ = prepare_prompts(ds, tiny_tokenizer, 64)
    assert tiny["prompt_ids"] == tiny_tokenizer("hello there").input_ids
    with pytest.raises(ConfigError) as excinfo:
        resolve_prompt_format(tiny_tokenizer, "chat", "tiny")
    assert one_line(excinfo) == ("--prompt-format chat: the tokenizer of 'tiny' has no chat template of its own; "
                                 "use --prompt-format raw, or give the data as chat messages")
    with pytest.raises(ConfigError, match="--prompt-format must be auto, chat or raw, not 'xml'"):
        resolve_prompt_format(tok, "xml")


# ---------------------------------------------------------------------------------- BOS on truncation


def test_left_truncation_keeps_bos_and_system_turn(tiny_tokenizer, own_tokenizer):
    tok = tiny_tokenizer
    bos = tok.bos_token_id
    long = "one two three four five six seven eight nine ten eleven twelve thirteen fourteen fifteen"
    full = tok(long).input_ids
    assert full[0] == bos and len(full) > 10
    (rec,), report = prepare_prompts(datasets.Dataset.from_list([{"prompt": long}]), tok, 6)
    assert report.truncated == 1 and rec["prompt_ids"] == [bos] + full[-5:]

    # SFT and preferences: the cut prompt keeps BOS too
    (sft,), _ = prepare_sft(datasets.Dataset.from_list([{"prompt": long, "completion": "ok"}]), tok, 8)
    response = tok("ok", add_special_tokens=False).input_ids + [tok.eos_token_id]
    keep = max(8 - len(response), 8 // 2)  # the prompt is cut only as far as needed
    assert sft["input_ids"] == [bos] + full[-(keep - 1):] + response
    (group,), _ = prepare_preferences(datasets.Dataset.from_list([{"prompt": long, "chosen": "yes", "rejected": "no"}]),
                                      tok, 64, max_prompt_length=4)
    assert group["prompt_ids"] == [bos] + full[-3:]

    # a leading system turn stays whole when it fits, with the prompt's end after it
    own = own_tokenizer
    system = {"role": "system", "content": "Be brief."}
    messages = [system, {"role": "user", "content": long}]
    ids = own.apply_chat_template(messages, add_generation_prompt=True)
    ids = list(ids["input_ids"] if hasattr(ids, "keys") else ids)
    head = own(own.apply_chat_template([system], tokenize=False), add_special_tokens=False).input_ids
    assert ids[0] == own.bos_token_id and ids[:len(head)] == head
    (chat,), _ = prepare_prompts(datasets.Dataset.from_list([{"prompt": messages}]), own, len(head) + 4)
    assert chat["prompt_ids"] == head + ids[-4:]
    # too short for the system turn: BOS and the end
    (tight,), _ = prepare_prompts(datasets.Dataset.from_list([{"prompt": messages}]), own, 3)
    assert tight["prompt_ids"] == [own.bos_token_id] + ids[-2:]


# --------------------------------------------------------------------------- reward model as users score it


@pytest.mark.parametrize("template", ["own", "fallback"])
def test_exported_reward_model_scores_chat_template_text_as_trained(template, own_tokenizer, tiny_tokenizer,
                                                                    tmp_path):
    """Own template: text after EOS (a newline) is kept as a tail; rlhfkit's fallback: nothing follows EOS."""
    import torch
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    from rlhfkit.models.tiny import build_tiny_model
    from rlhfkit.rollout.rewards import ModelReward
    from rlhfkit.rollout.scoring import ScoringBatch
    from rlhfkit.trainers import RewardConfig, run_reward

    own = template == "own"
    base = build_tiny_model(tmp_path / "base", tokenizer=own_tokenizer if own else tiny_tokenizer, layers=1,
                            hidden=32)
    rows = [{"prompt": [{"role": "user", "content": r["prompt"]}], "chosen": r["chosen"], "rejected": r["rejected"]}
            for r in PREFS]
    data = tmp_path / "prefs.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in rows))
    run_reward(RewardConfig(model=str(base), dataset=str(data), output_dir=str(tmp_path / "rm"), max_steps=3,
                            per_device_batch_size=3, learning_rate=1e-2, max_length=64, progress_bar=False,
                            num_threads=1))
    tok = AutoTokenizer.from_pretrained(tmp_path / "rm")
    model = AutoModelForSequenceClassification.from_pretrained(tmp_path / "rm").eval()

    def score(ids):
        with torch.no_grad():
            return float(model(torch.tensor([list(ids)])).logits[0, 0])

    (group,), _ = prepare_preferences(datasets.Dataset.from_list(rows[1:2]), tok, 64, keep_template_tail=True)
    trained = group["prompt_ids"] + group["responses"][0]
    messages = rows[1]["prompt"] + [{"role": "assistant", "content": rows[1]["chosen"]}]
    text = tok.apply_chat_template(messages, tokenize=False)
    assert text.endswith("<|eos|>\n" if own else "<|eos|>")
    assert tok.decode(trained) == text  # rlhfkit's training text is the template's
    # the way HF documents it: the template's text holds BOS, so no second one is added
    user = tok(text, add_special_tokens=False).input_ids
    assert user == trained
    assert score(tok(tok.decode(trained), add_special_tokens=False).input_ids) == pytest.approx(score(user), abs=1e-4)
    # tok(text) adds BOS a second time: that is a different sequence (HF's docs warn against it)
    assert tok(text).input_ids == [tok.bos_token_id] + user
    # rlhfkit's own scorer (RL, eval, judges) reads the sequence a policy produced (ending at EOS) the same way
    rm = ModelReward(str(tmp_path / "rm"), tok)
    response = group["responses"][0][: len(group["responses"][0]) - len(rm.tail_ids)]
    assert bool(rm.tail_ids) == own and response[-1] == tok.eos_token_id
    batch = ScoringBatch([text], [rows[1]["chosen"]], [group["prompt_ids"]], [response], [True])
    assert float(rm.score(batch)[0]) == pytest.approx(score(user), abs=1e-4)
    if own:  # the tail matters: reading at EOS differs
        assert abs(score(user) - score(user[:-len(rm.tail_ids)])) > 1e-3


def test_cli_names_the_splits_in_one_line(tiny_model_dir, ultrafeedback_dir, tmp_path, capsys):
    from rlhfkit.cli import main

    base = ["sft", "--model", str(tiny_model_dir), "--max-steps", "1", "--no-progress-bar"]
    assert main(base + ["--dataset", str(ultrafeedback_dir), "--output-dir", str(tmp_path / "a")]) == 2
    assert capsys.readouterr().err.strip().splitlines()[-1] == (
        f"rlhfkit sft: error: {ultrafeedback_dir}: has splits train_prefs, test_prefs, train_sft, test_sft: pick one "
        "with --dataset-split")
    assert main(base + ["--dataset", str(ultrafeedback_dir), "--dataset-split", "train_sft", "--columns",
                        "prompt=question", "--output-dir", str(tmp_path / "b")]) == 2
    assert capsys.readouterr().err.strip().splitlines()[-1] == (
        f"rlhfkit sft: error: {ultrafeedback_dir}: --columns prompt=question: no column 'question'; columns: prompt, "
        "completion")


def test_eval_takes_a_column_map_and_the_prompt_format(tiny_model_dir, tmp_path, capsys):
    from rlhfkit.cli import main

    calls = tmp_path / "calls.jsonl"
    (tmp_path / "judge.py").write_text(
        "import json\n"
        "def judge(prompts, responses, answer):\n"
        f"    open({str(calls)!r}, 'a').write(json.dumps(list(prompts)) + '\\n')\n"
        "    return [float(a) for a in answer]\n")
    rows = [{"question": f"What is {i} times 7?", "answer": str(7 * i)} for i in range(3)]
    data = tmp_path / "gsm.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in rows))
    args = ["eval", "--policy", f"base={tiny_model_dir}", "--prompts", str(data), "--columns", "prompt=question",
            "--judge", f"fn:{tmp_path / 'judge.py'}:judge", "--max-new-tokens", "2", "--n-boot", "10"]
    assert main(args) == 0
    seen = [p for line in calls.read_text().splitlines() for p in json.loads(line)]
    assert seen == [r["question"] for r in rows]  # raw: the tiny model's template is rlhfkit's fallback
    assert main(args + ["--prompt-format", "chat"]) == 2
    assert capsys.readouterr().err.strip().splitlines()[-1] == (
        f"rlhfkit eval: error: --prompt-format chat: the tokenizer of '{tiny_model_dir}' has no chat template of "
        "its own; use --prompt-format raw, or give the data as chat messages")
