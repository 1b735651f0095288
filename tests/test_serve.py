"""`rlhf serve` on a tiny Llama (SmolLM2's tokenizer and chat template), asked by the official
`openai` client: one real server process for the module, its answers checked against the model
run directly with transformers."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import httpx
import openai
import pytest
import torch

from components.models import lm
from components.serving.engine import Engine, Request
from tests.conftest import REPO
from tests.tiny_llama import make_tiny_llama

KEY = "serve-test-key"
NAME = "tiny"
MESSAGES = [{"role": "user", "content": "Name a colour."}]


@pytest.fixture(scope="module")
def tiny_folder(tmp_path_factory) -> Path:
    """The tiny Llama saved as the pipeline saves a policy (its own pad token), so every load is the same model."""
    raw = make_tiny_llama(tmp_path_factory.mktemp("tiny-raw"))
    model, tokenizer = lm.load_policy(raw)
    folder = tmp_path_factory.mktemp("tiny-policy")
    lm.save_policy(model, tokenizer, folder)
    return folder


@pytest.fixture(scope="module")
def reference(tiny_folder, single_thread):
    model, tokenizer = lm.load_policy(tiny_folder)
    return model.eval(), tokenizer


@pytest.fixture(scope="module")
def server(tiny_folder):
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    process = subprocess.Popen(
        [sys.executable, "-m", "flows.cli", "serve", str(tiny_folder), "--port", str(port), "--api-key", KEY,
         "--served-model-name", NAME],
        cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
    )
    url = f"http://127.0.0.1:{port}/v1"
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:
        assert process.poll() is None, process.stdout.read()
        try:
            if httpx.get(f"{url}/models", headers={"Authorization": f"Bearer {KEY}"}).status_code == 200:
                break
        except httpx.TransportError:
            time.sleep(0.3)
    yield url
    process.terminate()
    process.wait(timeout=30)


@pytest.fixture(scope="module")
def client(server):
    return openai.OpenAI(base_url=server, api_key=KEY, max_retries=0)


def greedy(reference, text: str, max_new_tokens: int) -> tuple[list[int], torch.Tensor]:
    """transformers' own greedy decoding and the log-probs of its tokens."""
    model, tokenizer = reference
    ids = tokenizer(text, add_special_tokens=False, return_tensors="pt")["input_ids"]
    out = model.generate(ids, do_sample=False, max_new_tokens=max_new_tokens, output_logits=True,
                         return_dict_in_generate=True, pad_token_id=tokenizer.pad_token_id, eos_token_id=tokenizer.eos_token_id)
    tokens = out.sequences[0, ids.shape[1]:].tolist()
    logprobs = torch.stack([torch.log_softmax(step[0].float(), -1) for step in out.logits])
    return tokens, logprobs


def test_chat_completion_is_greedy_decoding_of_the_chat_template_with_its_logprobs(client, reference):
    _, tokenizer = reference
    prompt = tokenizer.apply_chat_template(MESSAGES, add_generation_prompt=True, tokenize=False)
    tokens, logprobs = greedy(reference, prompt, 8)
    response = client.chat.completions.create(model=NAME, messages=MESSAGES, max_tokens=8, temperature=0,
                                              logprobs=True, top_logprobs=3)
    choice = response.choices[0]
    assert choice.message.content == tokenizer.decode(tokens, skip_special_tokens=True)
    assert choice.finish_reason == ("stop" if tokenizer.eos_token_id in tokens else "length")
    assert response.usage.prompt_tokens == len(tokenizer(prompt, add_special_tokens=False)["input_ids"])
    assert response.usage.completion_tokens == len(tokens)
    for step, entry in enumerate(choice.logprobs.content):
        assert entry.logprob == pytest.approx(float(logprobs[step, tokens[step]]), abs=1e-4)
        best = logprobs[step].topk(3)
        assert [t.logprob for t in entry.top_logprobs] == pytest.approx(best.values.tolist(), abs=1e-4)


def test_streaming_gives_the_same_text_as_a_whole_answer_with_the_same_seed(client):
    whole = client.chat.completions.create(model=NAME, messages=MESSAGES, max_tokens=10, seed=7, n=2)
    chunks = list(client.chat.completions.create(model=NAME, messages=MESSAGES, max_tokens=10, seed=7, n=2, stream=True,
                                                 stream_options={"include_usage": True}))
    texts, reasons = ["", ""], [None, None]
    for chunk in chunks[:-1]:
        for choice in chunk.choices:
            texts[choice.index] += choice.delta.content or ""
            reasons[choice.index] = choice.finish_reason or reasons[choice.index]
    assert texts == [c.message.content for c in whole.choices] and reasons == [c.finish_reason for c in whole.choices]
    assert texts[0] != texts[1]  # n choices sample apart
    assert chunks[-1].usage.completion_tokens == whole.usage.completion_tokens


def test_completions_batch_of_prompts_with_n_and_logprobs_and_streaming(client, reference):
    _, tokenizer = reference
    response = client.completions.create(model=NAME, prompt=["The sky is", "Once upon"], max_tokens=6, n=2,
                                         temperature=0, logprobs=2)
    assert [c.index for c in response.choices] == [0, 1, 2, 3]
    for number, prompt in enumerate(["The sky is", "Once upon"]):
        tokens, _ = greedy(reference, prompt, 6)
        expected = tokenizer.decode(tokens, skip_special_tokens=True)
        assert [c.text for c in response.choices[2 * number: 2 * number + 2]] == [expected, expected]
    logprobs = response.choices[0].logprobs
    assert len(logprobs.tokens) == len(logprobs.token_logprobs) == len(logprobs.top_logprobs) == 6
    assert "".join(logprobs.tokens) == response.choices[0].text
    streamed = "".join(c.choices[0].text for c in client.completions.create(
        model=NAME, prompt="The sky is", max_tokens=6, temperature=0, stream=True))
    assert streamed == response.choices[0].text


def test_stop_strings_cut_the_answer(client):
    full = client.completions.create(model=NAME, prompt="The sky is", max_tokens=12, temperature=0).choices[0].text
    stop = full[len(full) // 2: len(full) // 2 + 2]
    cut = client.completions.create(model=NAME, prompt="The sky is", max_tokens=12, temperature=0, stop=[stop]).choices[0]
    assert cut.text == full[: full.index(stop)] and cut.finish_reason == "stop"
    streamed = "".join(c.choices[0].text for c in client.completions.create(
        model=NAME, prompt="The sky is", max_tokens=12, temperature=0, stop=[stop], stream=True))
    assert streamed == cut.text  # text that might start the stop string was held back, never sent


def test_bad_requests_get_openai_style_errors(client, server):
    with pytest.raises(openai.BadRequestError) as error:
        client.chat.completions.create(model=NAME, messages=[], max_tokens=4)
    assert error.value.body["param"] == "messages" and error.value.body["type"] == "invalid_request_error"
    with pytest.raises(openai.BadRequestError) as error:
        client.chat.completions.create(model=NAME, messages=MESSAGES, temperature=3)
    assert error.value.body["param"] == "temperature"
    with pytest.raises(openai.BadRequestError):
        client.completions.create(model=NAME, prompt="x", n=0)
    with pytest.raises(openai.BadRequestError) as error:
        client.completions.create(model=NAME, prompt="word " * 600, max_tokens=2)
    assert error.value.body["code"] == "context_length_exceeded"
    with pytest.raises(openai.BadRequestError):
        client.completions.create(model=NAME, prompt="", max_tokens=2)
    with pytest.raises(openai.NotFoundError) as error:
        client.chat.completions.create(model="gpt-4", messages=MESSAGES)
    assert error.value.body["code"] == "model_not_found"
    with pytest.raises(openai.AuthenticationError):
        openai.OpenAI(base_url=server, api_key="wrong", max_retries=0).models.list()
    raw = httpx.post(f"{server}/chat/completions", content=b"{not json", headers={"Authorization": f"Bearer {KEY}"})
    assert raw.status_code == 400 and "error" in raw.json()


def test_the_judge_asks_a_served_model_and_records_both_orders(client, server, tmp_path):
    from components.judges import Comparison, JudgeClient, judge
    from components.sections import JudgeConfig

    cfg = JudgeConfig(base_url=server, model=NAME, template="alpaca_eval", cache_dir=str(tmp_path), max_malformed=0)
    results = judge(JudgeClient(cfg, KEY), [Comparison("Say hi.", "Hi!", "Hello there."), Comparison("2+2?", "4", "5")])
    assert all(set(r.answers) == {"12", "21"} for r in results)
    assert all(a.error is None and a.completion_tokens > 0 for r in results for a in r.answers.values())


def test_concurrent_requests_are_decoded_in_one_batch_with_the_answers_they_get_alone(reference):
    model, tokenizer = reference
    sizes, release = [], threading.Event()

    def hold_first_batch(module, args, kwargs):
        sizes.append(kwargs["input_ids"].shape[0])
        release.wait(timeout=30)

    handle = model.register_forward_pre_hook(hold_first_batch, with_kwargs=True)
    try:
        engine = Engine(model, tokenizer, max_batch=8)
        prompts = ["Hello", "The weather today is", "Why"]
        answers = {i: "" for i in range(3)}
        done = threading.Semaphore(0)

        def collector(number):
            def emit(event):
                answers[number] += event.text
                if event.finish_reason:
                    done.release()
            return emit

        for number, prompt in enumerate(prompts):
            ids = tokenizer(prompt, add_special_tokens=False)["input_ids"]
            engine.submit(Request(ids, max_tokens=5, temperature=0), collector(number))
            time.sleep(0.2)  # the first is being decoded alone; the others wait together
        release.set()
        for _ in prompts:
            assert done.acquire(timeout=60)
    finally:
        handle.remove()
    assert sizes[0] == 1 and 2 in sizes  # the two that waited were decoded together
    for number, prompt in enumerate(prompts):
        tokens, _ = greedy(reference, prompt, 5)
        assert answers[number] == tokenizer.decode(tokens, skip_special_tokens=True)


def test_a_registered_mlflow_model_is_served_by_its_uri(reference, tmp_path, monkeypatch):
    import mlflow

    from components import serving
    from components.pipeline import tracking

    model, tokenizer = reference
    tracking.configure(tmp_path, "serve-test")
    with mlflow.start_run():
        uri = tracking.log_transformers_model(model, tokenizer, "text-generation", "tiny policy")
    tracking.register(uri, "tiny-policy", "champion", {})
    loaded, loaded_tokenizer = serving.load("models:/tiny-policy@champion", tmp_path / "download")
    ids = tokenizer("The sky is", return_tensors="pt")["input_ids"]
    with torch.no_grad():
        assert torch.allclose(loaded(ids).logits, model(ids).logits, atol=1e-5)
    assert loaded_tokenizer.chat_template == tokenizer.chat_template


def test_serving_a_model_that_does_not_exist_fails_in_one_line(tmp_path, capsys):
    from flows.cli import main

    assert main(["serve", str(tmp_path / "no-model"), "--root", str(tmp_path)]) == 2
    error = capsys.readouterr().err.strip()
    assert error.startswith("model error:") and len(error.splitlines()) == 1


def test_a_cancelled_request_stops_decoding(reference):
    model, tokenizer = reference
    engine = Engine(model, tokenizer)
    request = Request(tokenizer("Hello", add_special_tokens=False)["input_ids"], max_tokens=400, temperature=1.0, seed=0)
    events = []

    def emit(event):
        events.append(event)
        if len(events) == 3:
            request.cancelled.set()  # what the server does when the client disconnects

    engine.submit(request, emit)
    time.sleep(1.0)
    assert 3 <= len(events) <= 4 and all(event.finish_reason is None for event in events)
    assert engine.waiting.empty()
