"""``make bench-serve``: ``lit_lora.serve.server`` under 1, 4 and 16 concurrent clients against a loop that answers
one request at a time through ``lit_lora.apps.generate``.

Both sides answer the same held-out demo prompts with the same adapter, model settings (the command
line's defaults: the embedded SmolLM2-135M, bf16 frozen weights) and ``max_tokens``, greedy. The server
is a real process on 127.0.0.1 driven by the ``openai`` client from threads (closed loop: each client sends
its next request when its answer arrives); the loop is ``Session.reply`` in this process, while the
server sits idle. Levels run in interleaved rounds (loop, 1, 4, 16, loop, 1...) so a shared machine's
noise hits all alike.

Reported per level: requests/s, generated tokens/s (completion tokens, EOS included, as ``usage``
counts them), p50 / p95 request latency, and tokens/s relative to the loop. Writes
``bench/results/<name>.json`` and ``.md``.
Usage: python -m bench.serve [--rounds 2] [--requests 32] [--max-tokens 48] [--adapter <folder>]
"""

from __future__ import annotations

import argparse
import datetime
import os
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

from bench import write_results

ROOT = Path(__file__).resolve().parents[1]
LEVELS = (1, 4, 16)
MIXED = "16 mixed"  # 16 clients, every other request to the base


def _prompts(n: int) -> list[str]:
    from lit_lora.data.demo import make_rows

    return [f"{r['instruction']}\n\n{r['input']}" for r in make_rows(n, seed=1234, held_out_names=True)]


def _train_adapter(scratch: Path) -> Path:
    """The demo task, briefly: enough for the adapter's JSON answers (ending at EOS) to differ from the base."""
    from lit_lora import train

    out = scratch / "run"
    train.run(
        [
            f"output_root={scratch}",
            f"output_dir={out}",
            "trainer.max_steps=40",
            "trainer.limit_val_batches=0",
            "trainer.enable_progress_bar=false",
            "score=false",
            "logger=none",
            "optim.lr=2e-3",
        ]
    )
    return out / "adapter"


def _server_args(max_tokens: int) -> list[str]:
    return [f"max_new_tokens={max_tokens}", "max_batch_size=16"]


def _start_server(adapter: Path, max_tokens: int) -> tuple[subprocess.Popen, int]:
    import httpx

    proc = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "lit_lora.serve",
            "port=0",
            f"adapters={{json:{adapter}}}",
            *_server_args(max_tokens),
        ],
        cwd=ROOT,
        env={**os.environ, "PYTHONUNBUFFERED": "1"},
        stdout=subprocess.PIPE,
        text=True,
    )
    for line in proc.stdout:
        if "serving" in line:
            port = int(line.rsplit(":", 1)[1].split("/")[0])
            while httpx.get(f"http://127.0.0.1:{port}/health", timeout=60).status_code != 200:
                time.sleep(0.1)
            return proc, port
    raise SystemExit(f"the server did not start (exit {proc.wait()})")


def _server_level(port: int, clients: int, prompts: list[str], max_tokens: int, mixed: bool = False) -> dict:
    """``clients`` closed-loop clients through ``prompts``; ``mixed``: odd requests ask the base, so that
    batches hold two models (PEFT's mixed-adapter path)."""
    import openai

    queue = list(enumerate(prompts))
    lock = threading.Lock()
    latencies, tokens, answers = [], [0], {}

    def client() -> None:
        api = openai.OpenAI(
            base_url=f"http://127.0.0.1:{port}/v1", api_key="none", max_retries=0, timeout=600
        )
        while True:
            with lock:
                if not queue:
                    return
                i, prompt = queue.pop(0)
            start = time.perf_counter()
            answer = api.chat.completions.create(
                model="base" if mixed and i % 2 else "json",
                messages=[{"role": "user", "content": prompt}],
                max_tokens=max_tokens,
                temperature=0,
            )
            with lock:
                latencies.append(time.perf_counter() - start)
                tokens[0] += answer.usage.completion_tokens
                answers[i] = answer.choices[0].message.content

    threads = [threading.Thread(target=client) for _ in range(clients)]
    start = time.perf_counter()
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    return _level(time.perf_counter() - start, latencies, tokens[0], answers)


def _loop_level(session, prompts: list[str]) -> dict:
    latencies, tokens, answers = [], 0, {}
    start = time.perf_counter()
    for i, prompt in enumerate(prompts):
        began = time.perf_counter()
        reply = session.reply([{"role": "user", "content": prompt}])
        latencies.append(time.perf_counter() - began)
        tokens += reply.new_tokens
        answers[i] = reply.text
    return _level(time.perf_counter() - start, latencies, tokens, answers)


def _level(wall: float, latencies: list[float], tokens: int, answers: dict) -> dict:
    ordered = sorted(latencies)
    return {
        "wall_s": wall,
        "requests": len(latencies),
        "tokens": tokens,
        "requests_per_s": len(latencies) / wall,
        "tokens_per_s": tokens / wall,
        "p50_s": statistics.median(ordered),
        "p95_s": ordered[min(len(ordered) - 1, round(0.95 * (len(ordered) - 1)))],
        "answers": [answers[i] for i in sorted(answers)],
    }


def _summary(runs: list[dict]) -> dict:
    """Median over rounds of each figure."""
    keys = ("requests_per_s", "tokens_per_s", "p50_s", "p95_s")
    return {k: statistics.median(r[k] for r in runs) for k in keys}


def markdown(report: dict) -> str:
    rows = [
        "| system | clients | requests/s | tokens/s | p50 latency (s) | p95 latency (s) | tokens/s vs loop |",
        "|---|---|---|---|---|---|---|",
    ]
    loop = report["summary"]["loop"]["tokens_per_s"]
    for key, figures in report["summary"].items():
        system, clients = ("generate loop", "1") if key == "loop" else ("lit_lora.serve", key)
        rows.append(
            f"| {system} | {clients} | {figures['requests_per_s']:.2f} | {figures['tokens_per_s']:.1f} | "
            f"{figures['p50_s']:.2f} | {figures['p95_s']:.2f} | {figures['tokens_per_s'] / loop:.2f}x |"
        )
    m = report["meta"]
    return (
        f"# lit_lora.serve.server vs one request at a time ({m['date']}, {m['machine']})\n\n"
        f"{m['requests']} held-out demo prompts per level, max_tokens {m['max_tokens']}, greedy, one adapter "
        f"(the demo task), embedded SmolLM2-135M with bf16 frozen weights, max_batch_size 16; median of "
        f'{m["rounds"]} interleaved rounds. "16 mixed": every other request asks the base, so batches '
        f"mix two models (PEFT's mixed-adapter path); its answers from the adapter are compared. Same answers "
        f"as the loop: {report['same_answers']}.\n\n" + "\n".join(rows) + "\n"
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--requests", type=int, default=32)
    parser.add_argument("--max-tokens", type=int, default=48)
    parser.add_argument("--adapter", type=Path, default=None)
    parser.add_argument("--name", default="serve-cpu")
    args = parser.parse_args()

    from lit_lora.apps.generate import Session
    from lit_lora.config.apps import GenerateConfig, typed
    from lit_lora.config.compose import compose

    prompts = _prompts(args.requests)
    with tempfile.TemporaryDirectory() as scratch:
        adapter = args.adapter or _train_adapter(Path(scratch))
        cfg = typed(
            compose("generate", [f"adapter={adapter}", f"max_new_tokens={args.max_tokens}"]), GenerateConfig
        )
        session = Session(cfg)
        proc, port = _start_server(adapter, args.max_tokens)
        runs: dict[str, list[dict]] = {"loop": [], **{str(c): [] for c in LEVELS}, MIXED: []}
        try:
            for round_ in range(args.rounds):
                runs["loop"].append(_loop_level(session, prompts))
                for clients in LEVELS:
                    runs[str(clients)].append(_server_level(port, clients, prompts, args.max_tokens))
                runs[MIXED].append(_server_level(port, 16, prompts, args.max_tokens, mixed=True))
                print(
                    f"round {round_ + 1}: "
                    + ", ".join(f"{k}: {v[-1]['tokens_per_s']:.1f} tok/s" for k, v in runs.items()),
                    flush=True,
                )
        finally:
            proc.terminate()
            proc.wait(120)
    loop_answers = runs["loop"][0]["answers"]
    same = {
        k: sum(a == b for a, b in zip(v[0]["answers"], loop_answers, strict=True)) for k, v in runs.items()
    }
    report = {
        "meta": {
            "date": datetime.date.today().isoformat(),
            "machine": f"{os.cpu_count()} CPU cores",
            "requests": args.requests,
            "max_tokens": args.max_tokens,
            "rounds": args.rounds,
        },
        "summary": {k: _summary(v) for k, v in runs.items()},
        "same_answers": ", ".join(
            f"{k}: {n}/{args.requests // 2 if k == MIXED else args.requests}"
            for k, n in same.items()
            if k != "loop"
        ),
        "runs": {k: [{x: y for x, y in r.items() if x != "answers"} for r in v] for k, v in runs.items()},
    }
    write_results(args.name, report, markdown(report))
    print(markdown(report))


if __name__ == "__main__":
    main()
