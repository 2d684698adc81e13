"""``python -m lit_lora.serve``: a real server process on 127.0.0.1 with the embedded model, two adapters
trained here (different behaviour, non-zero B) and the base, driven with the official ``openai`` client.
Every answer is compared with what ``lit_lora.apps.generate`` answers for the same name and prompt."""

from __future__ import annotations

import json
import os
import queue
import shutil
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import httpx
import openai
import pytest
from safetensors.torch import load_file, save_file

from lit_lora import train
from lit_lora.apps.generate import Session
from lit_lora.config.apps import GenerateConfig, typed
from lit_lora.config.compose import compose
from lit_lora.data.rendering import prompt_ids
from lit_lora.errors import UserError
from lit_lora.serve.server import _quote_adapter_list, adapter_table
from tests.helpers import ROOT

pytestmark = pytest.mark.slow

KEY = "sk-lit-lora-test"
# Long enough that the json adapter's demo answer ends with EOS before it (16 tokens: the ``stop`` finish
# reason) while the other answers are cut (``length``); every decoded token costs each request ~70 ms.
MAX_TOKENS = 20
DEMO = "Anna Berg is a 34-year-old nurse from Oslo."
PROMPTS = [DEMO, "Tell me about the sea."]
# Float32 frozen weights (the model config's default is bf16): a request decoded in a batch of 16 then
# differs from the same request alone by fp32 round-off only, far below any greedy margin here.
MODEL = ["model.dtype=float32"]
QUICK = ["trainer.enable_progress_bar=false", "score=false", "trainer.limit_val_batches=0", "logger=csv"]
QUICK += ["optim.warmup_steps=2", "optim.lr=3e-3", "data.batch_size=4", "lora.r=8"]
GREETING = "Xin chào! Tôi là trợ lý tiếng Việt."
QUESTIONS = ["What is the capital of France?", "Tell me a joke.", "How do I sort a list in Python?"]
QUESTIONS += ["Describe the sea.", "Who wrote Hamlet?", "What is 2+2?", "Name a fruit.", "Where is Hanoi?"]


@pytest.fixture(scope="module")
def adapters(tmp_path_factory) -> dict[str, Path]:
    """``json``: the demo task, 6 steps (one epoch of 24 rows); ``greeter``: one fixed Vietnamese greeting
    for any question, 4 steps at a higher learning rate without warm-up. The fewest steps (each costs ~2
    CPU seconds on the real model) after which each answers the demo prompt in its own way, far from a
    greedy tie (:data:`MIN_MARGIN`), and the json adapter still ends its demo answer with EOS before
    ``MAX_TOKENS`` (the ``stop`` finish reason)."""
    root = tmp_path_factory.mktemp("serve")
    train.run([*QUICK, f"output_dir={root / 'json'}", "trainer.max_steps=6", "data.train_size=24"])
    rows = root / "greeter.jsonl"
    rows.write_text("\n".join(json.dumps({"instruction": q, "output": GREETING}) for q in QUESTIONS))
    train.run(
        [
            *QUICK,
            f"output_dir={root / 'greeter'}",
            "trainer.max_steps=4",
            "optim.lr=1e-2",
            "optim.warmup_steps=0",
            "data=files",
            f"data.source={rows}",
        ]
    )
    return {"json": root / "json" / "adapter", "greeter": root / "greeter" / "adapter"}


@pytest.fixture(scope="module")
def expected(adapters) -> dict[tuple[str, str], tuple[str, int, int]]:
    """(name, prompt) -> (greedy text, completion tokens, prompt tokens) through lit_lora.apps.generate, with
    the server's model settings (composed from the same conf/ files as the command line's)."""
    out = {}
    with pytest.MonkeyPatch.context() as patch:
        decoded = _record_decoded_tokens(patch)
        for name, folder in [("base", None), *adapters.items()]:
            overrides = [*MODEL, f"max_new_tokens={MAX_TOKENS}", *([f"adapter={folder}"] if folder else [])]
            session = Session(typed(compose("generate", overrides), GenerateConfig))
            for prompt in PROMPTS:
                messages = [{"role": "user", "content": prompt}]
                reply = session.reply(messages)
                prompt_tokens = prompt_ids(session.tokenizer, session.rendering, messages)
                new_tokens = decoded[-1]
                assert len(new_tokens) == reply.new_tokens
                margin, greedy = _greedy_margin(session, prompt_tokens, new_tokens)
                # Batched decoding differs from this by fp32 round-off (~1e-5): a closer tie would make the
                # server's answer depend on which requests shared its batch, now and then.
                assert margin > MIN_MARGIN, (
                    f"{name}/{prompt!r}: a greedy near-tie ({margin:.2e}); pick another prompt"
                )
                assert greedy == new_tokens, f"{name}/{prompt!r}: the margin is not the decode's"
                out[name, prompt] = (reply.text, reply.new_tokens, len(prompt_tokens))
    assert any(tokens < MAX_TOKENS for _, tokens, _ in out.values()), "no answer ends with EOS (stop)"
    answers = {out[name, DEMO][0] for name in ("base", *adapters)}
    assert len(answers) == 3, f"the three models should answer differently: {answers}"
    assert out["greeter", PROMPTS[1]][0].startswith("Xin chào")
    return out


MIN_MARGIN = 1e-3


def _record_decoded_tokens(patch: pytest.MonkeyPatch) -> list[list[int]]:
    """The token ids that ``Session.reply`` decodes, one list per reply, appended as it returns them: the
    real ``generate_tokens`` runs, its answer is kept."""
    from lit_lora.apps import generate as app

    decoded: list[list[int]] = []
    real = app.generate_tokens

    def recording(*args, **kwargs):
        rows = real(*args, **kwargs)
        decoded.extend(list(row) for row in rows)
        return rows

    patch.setattr(app, "generate_tokens", recording)
    return decoded


def _greedy_margin(session: Session, prompt: list[int], new: list[int]) -> tuple[float, list[int]]:
    """The smallest gap between the two best logits over the greedy decode ``new`` of ``prompt``, and the
    best token at each step. One forward over the prompt and the decoded tokens gives the logits of every
    decoding step at once (the decode's own, up to fp32 round-off), where a second decode that returned
    its logits cost as much as the reply itself."""
    import torch

    model = session.model.eval()  # as generate_tokens decodes (it restores the flags it found)
    with torch.no_grad():
        logits = model(input_ids=torch.tensor([prompt + new]), use_cache=False).logits[0].float()
    steps = logits[len(prompt) - 1 : len(prompt) - 1 + len(new)]  # position i predicts token i + 1
    top2 = steps.topk(2, dim=-1).values
    return float((top2[:, 0] - top2[:, 1]).min()), steps.argmax(-1).tolist()


def _drain(stream, lines: list[str], serving: queue.Queue | None) -> None:
    """Read ``stream`` to its end into ``lines`` (a server whose pipe is never read would block on a full
    one); hand the ``serving`` line, or None at the end of the stream, to ``serving``."""
    for line in stream:
        lines.append(line)
        if serving is not None and "serving" in line:
            serving.put(line)
    if serving is not None:
        serving.put(None)


def start_server(*args: str, timeout: float = 180) -> tuple[subprocess.Popen, int]:
    """``python -m lit_lora.serve port=0 <args>``; returns the process and the port it printed. Its
    stdout and stderr are read by threads from the start; ``proc.stderr_lines`` holds what it wrote."""
    proc = subprocess.Popen(
        [sys.executable, "-m", "lit_lora.serve", "port=0", *args],
        cwd=ROOT,
        env={**os.environ, "PYTHONUNBUFFERED": "1"},
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    serving: queue.Queue = queue.Queue()
    proc.stdout_lines, proc.stderr_lines = [], []
    threading.Thread(target=_drain, args=(proc.stdout, proc.stdout_lines, serving), daemon=True).start()
    threading.Thread(target=_drain, args=(proc.stderr, proc.stderr_lines, None), daemon=True).start()
    try:
        line = serving.get(timeout=timeout)  # a server that hangs before printing fails here, not forever
    except queue.Empty:
        line = None
    if line is None:
        proc.kill()
        proc.wait()
        raise AssertionError(f"the server did not start: {''.join(proc.stderr_lines)[-3000:]}")
    port = int(line.rsplit(":", 1)[1].split("/")[0])
    # The socket listens from the start; wait until the app answers.
    deadline = time.monotonic() + timeout
    while httpx.get(f"http://127.0.0.1:{port}/health", timeout=30).status_code != 200:
        assert time.monotonic() < deadline, "the server never became healthy"
        time.sleep(0.1)
    return proc, port


@pytest.fixture(scope="module")
def server(adapters):
    # The list form from the command line, unquoted: lit_lora.serve.server quotes it for Hydra.
    listed = f"adapters=[json={adapters['json']},greeter={adapters['greeter']}]"
    # grace_period_s: the SIGTERM test checks that streams in flight finish, not how long the grace is.
    # With the 30 s default, a loaded 2-core machine (two test suites at once) cut a stream at 30 s.
    proc, port = start_server(listed, *MODEL, f"api_key={KEY}", "max_new_tokens=256", "grace_period_s=600")
    yield proc, port
    if proc.poll() is None:
        proc.kill()
        proc.wait()


def client(port: int, key: str = KEY) -> openai.OpenAI:
    return openai.OpenAI(base_url=f"http://127.0.0.1:{port}/v1", api_key=key, max_retries=0, timeout=120)


def ask(port: int, name: str, prompt: str, **kwargs):
    """One chat turn, greedy with ``MAX_TOKENS`` unless ``kwargs`` say otherwise."""
    kwargs = {"max_tokens": MAX_TOKENS, "temperature": 0, **kwargs}
    return client(port).chat.completions.create(
        model=name, messages=[{"role": "user", "content": prompt}], **kwargs
    )


def health(port: int) -> dict:
    return httpx.get(f"http://127.0.0.1:{port}/health", timeout=30).json()


def test_adapter_list_forms():
    assert adapter_table({"a": "x/adapter"}) == {"a": "x/adapter"}
    assert adapter_table(["runs/one/adapter", "b=runs/two/adapter"]) == {
        "one": "runs/one/adapter",
        "b": "runs/two/adapter",
    }
    assert _quote_adapter_list(["adapters=[a=x/y,b=z]", "port=1"]) == ["adapters=['a=x/y','b=z']", "port=1"]
    with pytest.raises(UserError, match="given twice"):
        adapter_table(["a=x", "a=y"])
    with pytest.raises(UserError, match="usable model name"):
        adapter_table({"bad name": "x"})


def test_models_lists_the_base_and_each_adapter_with_its_rank(server, adapters):
    _, port = server
    cards = {m.id: m for m in client(port).models.list().data}
    assert set(cards) == {"base", "json", "greeter"}
    assert cards["base"].model_extra["lora_rank"] is None and cards["base"].model_extra["parent"] is None
    for name in adapters:
        assert cards[name].model_extra["lora_rank"] == 8
        assert cards[name].model_extra["parent"] == "base"
        assert cards[name].model_extra["root"] == str(adapters[name].resolve())


def test_each_name_answers_as_generate_streamed_or_not(server, expected):
    _, port = server
    for (name, prompt), (text, tokens, prompt_tokens) in expected.items():
        answer = ask(port, name, prompt)
        assert answer.choices[0].message.content == text, (name, prompt)
        assert answer.model == name
        assert answer.choices[0].finish_reason == ("length" if tokens == MAX_TOKENS else "stop")
        assert (answer.usage.prompt_tokens, answer.usage.completion_tokens) == (prompt_tokens, tokens)
        assert answer.usage.total_tokens == prompt_tokens + tokens
        chunks = list(ask(port, name, prompt, stream=True, stream_options={"include_usage": True}))
        assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices) == text
        assert len([c for c in chunks if c.choices and c.choices[0].delta.content]) > 1, "streamed in pieces"
        assert chunks[-1].usage.completion_tokens == tokens


def test_stop_strings_and_seeded_sampling(server, expected):
    _, port = server
    text = expected["greeter", DEMO][0]
    stopped = ask(port, "greeter", DEMO, stop=["Tôi"])
    assert stopped.choices[0].message.content == text[: text.index("Tôi")]
    assert stopped.choices[0].finish_reason == "stop"
    sampled = [
        ask(port, "base", PROMPTS[1], temperature=1.0, top_p=0.9, seed=7).choices[0].message.content
        for _ in range(2)
    ]
    assert sampled[0] == sampled[1], "the same seed samples the same answer"


SEED = 2024


def test_a_seeded_sampled_answer_is_generates_with_the_same_settings(server, adapters, expected):
    """``temperature``, ``top_p`` and ``seed`` sent to the server sample what ``lit_lora.generate`` samples
    with the same settings: both decode with lit_lora.inference.decoding (transformers' temperature and
    top-p processors, a generator of the request's own seeded with its seed)."""
    from lit_lora.generate import run as generate

    _, port = server
    sampled = ["temperature=0.9", "top_p=0.9", f"seed={SEED}", f"prompt={PROMPTS[1]}"]
    replies = {}
    # The adapter's path (the base's is the same code without it: tests/inference/test_decoding.py
    # compares Session.reply with the engine on the base); each generate call loads the model once.
    for name, folder in [("json", adapters["json"])]:
        overrides = [
            *MODEL,
            f"max_new_tokens={MAX_TOKENS}",
            *sampled,
            *([f"adapter={folder}"] if folder else []),
        ]
        reply = replies[name] = generate(overrides)
        assert reply.text != expected[name, PROMPTS[1]][0], f"{name}: sampled, not the greedy answer"
        settings = {"temperature": 0.9, "top_p": 0.9, "seed": SEED}
        answer = ask(port, name, PROMPTS[1], **settings)
        assert answer.choices[0].message.content == reply.text, name
        assert answer.usage.completion_tokens == reply.new_tokens
        chunks = ask(port, name, PROMPTS[1], stream=True, **settings)
        assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices) == reply.text, name
    other = ask(port, "json", PROMPTS[1], temperature=0.9, top_p=0.9, seed=SEED + 1)
    assert other.choices[0].message.content != replies["json"].text, "another seed, another answer"


def test_errors_are_openai_shaped_and_leave_the_server_serving(server, adapters):
    _, port = server
    with pytest.raises(openai.NotFoundError, match="does not exist"):
        ask(port, "nope", DEMO)
    with pytest.raises(openai.BadRequestError, match="context is 8192 tokens"):
        ask(port, "json", "word " * 9000)
    with pytest.raises(openai.BadRequestError, match="over this server's cap"):
        client(port).chat.completions.create(
            model="json", messages=[{"role": "user", "content": "hi"}], max_tokens=10**6
        )
    with pytest.raises(openai.UnprocessableEntityError, match="messages"):
        client(port).chat.completions.create(model="json", messages=[])
    with pytest.raises(openai.AuthenticationError):
        client(port, key="wrong").models.list()
    no_key = httpx.get(f"http://127.0.0.1:{port}/v1/models", timeout=30)
    assert no_key.status_code == 401 and no_key.json()["error"]["code"] == "invalid_api_key"
    broken = httpx.post(
        f"http://127.0.0.1:{port}/v1/chat/completions",
        content=b"{not json",
        headers={"Authorization": f"Bearer {KEY}", "Content-Type": "application/json"},
        timeout=30,
    )
    assert broken.status_code == 422 and "message" in broken.json()["error"]
    assert ask(port, "json", DEMO).choices[0].message.content


def test_sixteen_concurrent_requests_over_three_names_get_their_own_answers(server, expected):
    _, port = server
    before = health(port)["peak_batch"]
    names = ["base", "json", "greeter"]
    jobs = [(names[i % 3], PROMPTS[(i // 3) % 2], i % 2 == 0) for i in range(16)]
    answers: dict[int, str] = {}

    def run(i: int) -> None:
        name, prompt, stream = jobs[i]
        if stream:
            answers[i] = "".join(
                c.choices[0].delta.content or "" for c in ask(port, name, prompt, stream=True) if c.choices
            )
        else:
            answers[i] = ask(port, name, prompt).choices[0].message.content

    threads = [threading.Thread(target=run, args=(i,)) for i in range(16)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(300)
    for i, (name, prompt, _) in enumerate(jobs):
        assert answers.get(i) == expected[name, prompt][0], (i, name, prompt)
    assert health(port)["peak_batch"] > max(before, 1), "requests should have been decoded together"


def test_a_client_that_disconnects_mid_stream_frees_its_row(server):
    _, port = server
    before = health(port)["cancelled"]
    stream = client(port).chat.completions.create(
        model="base",
        messages=[{"role": "user", "content": "Tell me a long story about the sea."}],
        max_tokens=256,
        stream=True,
    )
    for i, _ in enumerate(stream):
        if i == 3:
            break
    stream.close()
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline and (health(port)["active"] or health(port)["cancelled"] == before):
        time.sleep(0.05)
    state = health(port)
    assert state["active"] == 0 and state["cancelled"] == before + 1


def test_adapters_load_at_run_time_and_a_misfit_is_refused(server, adapters, expected, tmp_path):
    _, port = server
    url = f"http://127.0.0.1:{port}/v1/adapters"
    auth = {"Authorization": f"Bearer {KEY}"}
    body = {"name": "json-again", "path": str(adapters["json"])}
    assert httpx.post(url, json=body, timeout=60).status_code == 401
    added = httpx.post(url, json=body, headers=auth, timeout=60)
    assert added.status_code == 200 and added.json()["lora_rank"] == 8
    assert ask(port, "json-again", DEMO).choices[0].message.content == expected["json", DEMO][0]
    assert httpx.post(url, json=body, headers=auth, timeout=60).status_code == 409
    # The same adapter with its A matrices one column wider: trained on another base.
    misfit = tmp_path / "misfit"
    shutil.copytree(adapters["json"], misfit)
    weights = load_file(misfit / "adapter_model.safetensors")
    for key, value in weights.items():
        if "lora_A" in key:
            weights[key] = value.new_ones(value.shape[0], value.shape[1] + 1)
    save_file(weights, misfit / "adapter_model.safetensors")
    refused = httpx.post(url, json={"name": "misfit", "path": str(misfit)}, headers=auth, timeout=60)
    assert refused.status_code == 400 and "does not fit" in refused.json()["error"]["message"]
    assert "misfit" not in [m.id for m in client(port).models.list().data]
    assert ask(port, "base", DEMO).choices[0].message.content == expected["base", DEMO][0]


def test_sigterm_finishes_four_streams_in_flight_then_exits_zero(server, expected):
    """The last test of the module: it stops the shared server."""
    proc, port = server
    started = threading.Barrier(5, timeout=120)
    results: dict[int, str] = {}
    names = ["base", "json", "greeter", "json"]

    def run(i: int) -> None:
        parts = []
        for n, piece in enumerate(ask(port, names[i], PROMPTS[1], stream=True)):
            if n == 1:
                started.wait()
            if piece.choices:
                parts.append(piece.choices[0].delta.content or "")
        results[i] = "".join(parts)

    threads = [threading.Thread(target=run, args=(i,)) for i in range(4)]
    for thread in threads:
        thread.start()
    started.wait()
    proc.send_signal(signal.SIGTERM)
    for thread in threads:
        thread.join(120)
    assert proc.wait(60) == 0, "".join(proc.stderr_lines)[-2000:]
    for i, name in enumerate(names):
        assert results.get(i) == expected[name, PROMPTS[1]][0], (i, name)


def test_bad_command_lines_fail_with_one_line(tmp_path):
    missing = subprocess.run(
        [sys.executable, "-m", "lit_lora.serve", f"adapters=[{tmp_path / 'nowhere'}]", "port=0"],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert missing.returncode == 2
    assert missing.stderr.strip().splitlines()[-1].startswith("lit-lora: error:")
    assert "not a PEFT adapter folder" in missing.stderr and "Traceback" not in missing.stderr
