"""Preference tuning (issue 21): rows, encoding, the losses against TRL, the reference, training.

TRL is a test-only reference implementation here: its ``DPOTrainer`` computes the loss and the
rewards of the same model on the same token sequences (its own forward and reference handling), and
its SimPO (``CPOTrainer``) and ORPO (``ORPOTrainer``) loss functions take the same log-probs.
Everything runs on the tiny random Llama in fp32, with non-zero LoRA B weights so that the adapter
changes the model and the reference (adapter off) differs from it.
"""

from __future__ import annotations

import csv
import json
import math
import shutil
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM

from lit_lora.apps.compare import compare
from lit_lora.config.apps import GenerateConfig
from lit_lora.config.schema import (
    DataConfig,
    LoraConfig,
    ObjectiveConfig,
    OptimConfig,
    to_train_config,
)
from lit_lora.data.batching import collate_pairs
from lit_lora.data.module import DataModule, encode_rows
from lit_lora.data.rendering import IGNORE_INDEX, Rendering, prompt_ids
from lit_lora.data.rows import BadRows, Row, to_row
from lit_lora.errors import UserError
from lit_lora.models.adapters import REFERENCE_ADAPTER, load_reference
from lit_lora.models.builder import build_model
from lit_lora.speedups.chunked_loss import sequence_logps
from lit_lora.training.module import LitLoRA
from lit_lora.training.objectives import orpo, pair_scores
from lit_lora.training.reference import reference_model
from lit_lora.training.run import train
from tests.helpers import (
    CKPT_EVERY_2,
    DPO,
    TINY,
    assert_same_steps,
    compose_train,
    plain_config,
    run_cli,
    tiny_model_config,
    train_with_accumulation,
)

FIELDS = {
    "instruction": "instruction",
    "input": "input",
    "output": "output",
    "prompt": "prompt",
    "completion": "completion",
    "chosen": "chosen",
    "rejected": "rejected",
    "system": "system",
    "messages": "messages",
    "role": "role",
    "content": "content",
    "conversations": "conversations",
    "speaker": "from",
    "value": "value",
    "text": "text",
}
PAIRS = [
    ("What is 2 plus 2?", "4", "5"),
    ("Name a colour.", "Blue is a colour.", "Seven"),
    ("Say hi", "hi there, how are you today?", "no"),
    ("Extract the city: Ana lives in Porto.", '{"city": "Porto"}', "Porto is a city in Portugal."),
]
TINY_DPO = [*TINY, *DPO, "data.train_size=32", "data.val_size=8"]


def _user(text: str) -> list[dict]:
    return [{"role": "user", "content": text}]


def _answer(text: str) -> list[dict]:
    return [{"role": "assistant", "content": text}]


# ------------------------------------------------------------------------------------------ rows
def _pair_row(obj: dict, fields: dict | None = None) -> tuple[Row | None, BadRows]:
    bad = BadRows("skip")
    return to_row(obj, "rows.jsonl:1", "preference", fields or FIELDS, bad), bad


def test_explicit_prompt_rows_take_strings_or_messages():
    row, _ = _pair_row({"prompt": "Hi?", "chosen": "Hello.", "rejected": "Go away."})
    assert row.messages == _user("Hi?") + _answer("Hello.")
    assert row.rejected == _user("Hi?") + _answer("Go away.")
    system = [{"role": "system", "content": "Be kind."}]
    row, _ = _pair_row(
        {"prompt": [*system, *_user("Hi?")], "chosen": _answer("Hello."), "rejected": _answer("No.")}
    )
    assert row.messages == [*system, *_user("Hi?"), *_answer("Hello.")]
    assert row.rejected == [*system, *_user("Hi?"), *_answer("No.")]


def test_implicit_prompt_is_the_shared_opening_of_two_conversations():
    opening = [*_user("Hi?"), *_answer("Hello."), *_user("How are you?")]
    row, bad = _pair_row({"chosen": [*opening, *_answer("Fine.")], "rejected": [*opening, *_answer("Bad.")]})
    assert not bad.counts
    assert row.messages == [*opening, *_answer("Fine.")]
    assert row.rejected == [*opening, *_answer("Bad.")]


def test_renamed_fields_are_read():
    fields = {**FIELDS, "prompt": "question", "chosen": "good", "rejected": "bad"}
    row, _ = _pair_row({"question": "Hi?", "good": "Hello.", "bad": "No."}, fields)
    assert row.messages[-1]["content"] == "Hello." and row.rejected[-1]["content"] == "No."


@pytest.mark.parametrize(
    ("obj", "reason"),
    [
        ({"prompt": "Hi?", "chosen": "Hello."}, "missing_field"),
        ({"prompt": "Hi?", "chosen": " ", "rejected": "No."}, "empty_field"),
        ({"prompt": "Hi?", "chosen": "Same.", "rejected": "Same."}, "identical_answers"),
        ({"prompt": "Hi?", "chosen": 3, "rejected": "No."}, "wrong_type"),
        ({"chosen": _user("A?") + _answer("x"), "rejected": _user("B?") + _answer("y")}, "no_common_prompt"),
        (
            {"chosen": _user("A?") + _answer("x") + _user("C?"), "rejected": _user("A?") + _answer("y")},
            "no_common_prompt",
        ),
        ({"chosen": "x", "rejected": "y"}, "missing_field"),
    ],
)
def test_bad_preference_rows_are_counted_by_reason_or_fail_naming_the_row(obj, reason):
    row, bad = _pair_row(obj)
    assert row is None and bad.counts == {reason: 1}, bad.counts
    with pytest.raises(UserError, match=rf"rows.jsonl:1: .*\[{reason}\]"):
        to_row(obj, "rows.jsonl:1", "preference", FIELDS, BadRows("fail"))


def test_pairs_label_only_their_answers_and_truncate_the_answers_not_the_prompt(tokenizer):
    rendering = Rendering.resolve(tokenizer)
    prompt = [*_user("Q1"), *_answer("earlier answer"), *_user("Q2")]
    n_prompt = len(prompt_ids(tokenizer, rendering, prompt))
    rows = [Row("r:1", messages=[*prompt, *_answer("good " * 40)], rejected=[*prompt, *_answer("bad")])]
    limit = n_prompt + 6
    bad = BadRows("fail")
    cfg = DataConfig(format="preference", max_seq_len=limit)
    (example,), _, counts = encode_rows(rows, tokenizer, rendering, cfg, bad, "test")
    assert counts["truncated"] == 1
    chosen, rejected = example["input_ids"], example["rejected_input_ids"]
    assert len(chosen) == limit and len(rejected) < limit
    assert chosen[:n_prompt] == rejected[:n_prompt], "both sides keep the whole prompt"
    for labels in (example["labels"], example["rejected_labels"]):
        assert all(label == IGNORE_INDEX for label in labels[:n_prompt]), "earlier answers are context"
    assert tokenizer.decode([t for t in example["rejected_labels"] if t != IGNORE_INDEX]).startswith("bad")
    assert tokenizer.decode([t for t in example["labels"] if t != IGNORE_INDEX]).startswith("good good")
    # A prompt that leaves no room for an answer is a bad row, not a silently empty pair.
    with pytest.raises(UserError, match=r"r:1: .*\[no_answer_token\]"):
        encode_rows(
            rows, tokenizer, rendering, DataConfig(format="preference", max_seq_len=n_prompt), bad, "t"
        )


def test_preference_data_from_a_saved_dataset_folder(tmp_path, tokenizer):
    import datasets

    rows = [{"prompt": p, "chosen": c, "rejected": r} for p, c, r in PAIRS]
    datasets.Dataset.from_list(rows).save_to_disk(str(tmp_path / "saved"))
    cfg = DataConfig(
        source=str(tmp_path / "saved"), format="preference", val_fraction=0.25, cache=False, batch_size=2
    )
    data = DataModule(cfg, tokenizer, tmp_path / "data")
    data.setup()
    assert data.pairs and len(data.examples["train"]) == 3 and len(data.examples["val"]) == 1
    batch = next(iter(data.train_dataloader()))
    assert batch["input_ids"].shape[0] == 4 and int(batch["pairs"]) == 2
    assert int(batch["step_tokens"]) == 2, "a step is weighted by its pairs"


# ---------------------------------------------------------------------------------- model fixtures
@pytest.fixture(scope="module")
def tiny():
    """The tiny Llama with a LoRA adapter whose B weights are non-zero (seeded), and a batch of pairs."""
    torch.manual_seed(0)  # LoRA A's initialisation: the same adapter in every run of the suite
    built = build_model(plain_config(model=tiny_model_config(), lora=LoraConfig(r=4, dropout=0.0)))
    generator = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for name, param in built.model.named_parameters():
            if "lora_B" in name:
                param.copy_(torch.randn(param.shape, generator=generator) * 0.05)
    rendering = Rendering.resolve(built.tokenizer)
    rows = [
        Row(f"r:{i}", _user(p) + _answer(c), rejected=_user(p) + _answer(r))
        for i, (p, c, r) in enumerate(PAIRS)
    ]
    cfg = DataConfig(format="preference")
    examples, _, _ = encode_rows(rows, built.tokenizer, rendering, cfg, BadRows("fail"), "pairs")
    built.model.train()
    return SimpleNamespace(
        model=built.model,
        tokenizer=built.tokenizer,
        batch=collate_pairs(examples, built.tokenizer.pad_token_id),
    )


def _ours(tiny, objective: ObjectiveConfig, chunked: bool = True):
    module = LitLoRA(tiny.model, OptimConfig(), objective=objective, chunked_loss=chunked)
    return module._pair_scores(tiny.batch)


def _trl_inputs(batch: dict) -> dict:
    # TRL marks completion tokens; it predicts token t+1 at t over completion_mask[:, 1:], as lit-lora
    # predicts labels[:, 1:]. Position 0 is never predicted, so its mask entry is irrelevant.
    trained = (batch["labels"][:, 1:] != IGNORE_INDEX).long()
    completion = torch.cat([torch.zeros_like(trained[:, :1]), trained], dim=1)
    return {
        "input_ids": batch["input_ids"],
        "attention_mask": batch["attention_mask"],
        "completion_mask": completion,
    }


def _trl_dpo(tiny, loss: str, beta: float, keep_ref_copy: bool, tmp_path: Path):
    """TRL's DPOTrainer on the same PEFT model: its loss and metrics on the same batch."""
    import datasets
    from trl import DPOConfig, DPOTrainer

    rows = [{"prompt": p, "chosen": c, "rejected": r} for p, c, r in PAIRS]
    args = DPOConfig(
        output_dir=str(tmp_path / "trl"),
        beta=beta,
        loss_type=[loss],
        report_to=[],
        use_cpu=True,
        bf16=False,
        per_device_train_batch_size=len(PAIRS),
    )
    trainer = DPOTrainer(
        model=tiny.model,
        args=args,
        train_dataset=datasets.Dataset.from_list(rows),
        processing_class=tiny.tokenizer,
    )
    try:
        if (
            not keep_ref_copy
        ):  # TRL copies a pre-existing adapter as its reference; lit-lora's default is the base
            tiny.model.delete_adapter("ref")
        tiny.model.train()
        value = trainer._compute_loss(trainer.model, _trl_inputs(tiny.batch), False)
        metrics = {k: v[-1] for k, v in trainer._metrics["train"].items()}
    finally:
        if "ref" in tiny.model.peft_config:
            tiny.model.delete_adapter("ref")
        tiny.model.set_adapter("default")
    return float(value), metrics


@pytest.mark.parametrize("loss", ["sigmoid", "ipo", "hinge"])
def test_dpo_loss_and_rewards_equal_trl_dpo_trainer(tiny, loss, tmp_path):
    beta = 0.5
    ours = _ours(tiny, ObjectiveConfig(name="dpo", loss=loss, beta=beta))
    theirs, metrics = _trl_dpo(tiny, loss, beta, keep_ref_copy=False, tmp_path=tmp_path)
    assert metrics["rewards/margins"] != 0, "the adapter must move the model away from its reference"
    assert abs(float(ours.loss.mean()) - theirs) < 1e-5, (float(ours.loss.mean()), theirs)
    assert abs(float(ours.rewards_chosen.mean()) - metrics["rewards/chosen"]) < 1e-5
    assert abs(float(ours.rewards_rejected.mean()) - metrics["rewards/rejected"]) < 1e-5
    margin = ours.rewards_chosen - ours.rewards_rejected
    assert abs(float(margin.mean()) - metrics["rewards/margins"]) < 1e-5
    assert abs(float((margin > 0).float().mean()) - metrics["rewards/accuracies"]) < 1e-6
    assert abs(float(ours.logps[0].mean()) - metrics["logps/chosen"]) < 1e-4
    assert abs(float(ours.logps[1].mean()) - metrics["logps/rejected"]) < 1e-4


def test_dpo_with_a_reference_adapter_equals_trl_with_its_reference_copy(tiny, tmp_path):
    """TRL's reference for a PEFT model that already has an adapter is a frozen copy of it; lit-lora's
    ``objective.ref_adapter`` is the same thing loaded from a folder (the SFT -> DPO chain)."""
    tiny.model.save_pretrained(str(tmp_path / "sft"))
    theirs, metrics = _trl_dpo(tiny, "sigmoid", 0.1, keep_ref_copy=True, tmp_path=tmp_path)
    load_reference(tiny.model, str(tmp_path / "sft"))
    try:
        ours = _ours(tiny, ObjectiveConfig(name="dpo", beta=0.1, ref_adapter=str(tmp_path / "sft")))
    finally:
        tiny.model.delete_adapter(REFERENCE_ADAPTER)
        tiny.model.set_adapter("default")
    assert metrics["rewards/chosen"] == 0 and abs(float(ours.rewards_chosen.abs().max())) < 1e-6
    assert abs(float(ours.loss.mean()) - theirs) < 1e-5 and abs(theirs - math.log(2)) < 1e-6
    assert all(p.requires_grad for n, p in tiny.model.named_parameters() if "lora_" in n), "still trainable"


def test_conservative_dpo_is_the_label_smoothed_formula(tiny):
    eps, beta = 0.2, 0.5
    ours = _ours(tiny, ObjectiveConfig(name="dpo", beta=beta, label_smoothing=eps))
    plain = _ours(tiny, ObjectiveConfig(name="dpo", beta=beta))
    # Written out: the rewards are beta * logratios, so the DPO logit is the reward margin.
    z = plain.rewards_chosen - plain.rewards_rejected
    expected = -(1 - eps) * F.logsigmoid(z) - eps * F.logsigmoid(-z)
    assert torch.allclose(ours.loss.detach(), expected, atol=1e-6)


def test_rpo_adds_the_chosen_answers_nll_per_token_to_dpo(tiny):
    alpha = 0.7
    plain = _ours(tiny, ObjectiveConfig(name="dpo"))
    rpo = _ours(tiny, ObjectiveConfig(name="dpo", rpo_alpha=alpha))
    # Written out from the full logits: rows 0..B-1 of the batch are the chosen answers.
    batch, pairs = tiny.batch, int(tiny.batch["pairs"])
    with torch.no_grad():
        logits = tiny.model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
    labels = batch["labels"][:, 1:]
    nll = []
    for i in range(pairs):
        keep = labels[i] != IGNORE_INDEX
        nll.append(F.cross_entropy(logits[i, :-1][keep].float(), labels[i][keep]))
    expected = plain.loss.detach() + alpha * torch.stack(nll)
    assert torch.allclose(rpo.loss.detach(), expected, atol=1e-5), (rpo.loss, expected)
    assert torch.equal(rpo.rewards_chosen, plain.rewards_chosen), "the rewards are DPO's"


def _trl_self(**kwargs):
    return SimpleNamespace(accelerator=SimpleNamespace(device=torch.device("cpu")), **kwargs)


def test_simpo_equals_trl_cpo_simpo_loss(tiny):
    from trl.experimental.cpo import CPOTrainer

    beta, gamma = 2.0, 0.5
    ours = _ours(tiny, ObjectiveConfig(name="simpo", beta=beta, gamma=gamma))
    counts = (tiny.batch["labels"][:, 1:] != IGNORE_INDEX).sum(dim=1).chunk(2)
    avg = [lp / n for lp, n in zip(ours.logps, counts, strict=True)]
    trl = _trl_self(beta=beta, simpo_gamma=gamma, label_smoothing=0.0, loss_type="simpo", alpha=0.0)
    losses, chosen, rejected = CPOTrainer.cpo_loss(trl, avg[0], avg[1])
    assert torch.allclose(ours.loss.detach(), losses, atol=1e-6)
    assert torch.allclose(ours.rewards_chosen, chosen, atol=1e-6)
    assert torch.allclose(ours.rewards_rejected, rejected, atol=1e-6)


def test_orpo_equals_trl_odds_ratio_term_plus_the_per_pair_nll(tiny):
    from trl.experimental.orpo import ORPOTrainer

    lam = 0.25
    ours = _ours(tiny, ObjectiveConfig(name="orpo", lambda_=lam))
    counts = (tiny.batch["labels"][:, 1:] != IGNORE_INDEX).sum(dim=1).chunk(2)
    avg = [lp / n for lp, n in zip(ours.logps, counts, strict=True)]
    ratio_loss, chosen, rejected, _, _ = ORPOTrainer.odds_ratio_loss(_trl_self(beta=lam), avg[0], avg[1])
    # TRL: loss = nll - beta * logsigmoid(log odds); the NLL here is the chosen answer's per token.
    assert torch.allclose(ours.loss.detach(), -avg[0] - ratio_loss, atol=1e-6)
    assert torch.allclose(ours.rewards_chosen, chosen, atol=1e-6)
    assert torch.allclose(ours.rewards_rejected, rejected, atol=1e-6)
    # And the paper's formula, written out with probabilities rather than log1p.
    p_w, p_l = avg[0].exp(), avg[1].exp()
    odds = (p_w / (1 - p_w)) / (p_l / (1 - p_l))
    assert torch.allclose(
        orpo(*ours.logps, *counts, lam), -avg[0] - lam * torch.log(torch.sigmoid(odds.log())), atol=1e-5
    )


def test_chunked_log_probs_and_their_gradients_equal_full_logits(tiny):
    batch = tiny.batch
    inputs = {"input_ids": batch["input_ids"], "attention_mask": batch["attention_mask"]}
    weights = torch.linspace(-1, 1, batch["input_ids"].shape[0])
    grads = []
    for chunked in (True, False):
        tiny.model.zero_grad()
        logps, counts = sequence_logps(tiny.model, inputs, batch["labels"], chunked, chunk=5)
        (logps * weights).sum().backward()
        grads.append({n: p.grad.clone() for n, p in tiny.model.named_parameters() if p.requires_grad})
        if chunked:
            first = logps.detach()
    assert torch.allclose(first, logps.detach(), atol=1e-4)
    assert counts.tolist() == (batch["labels"][:, 1:] != IGNORE_INDEX).sum(dim=1).tolist()
    # fp32, two summation orders: equal to rounding, relative to the largest gradient (2e-6 to 4.5e-6
    # seen over six seeds, hence the bound 5e-5).
    scale = max(g.abs().max().item() for g in grads[1].values())
    assert scale > 0
    assert max((grads[0][n] - grads[1][n]).abs().max().item() for n in grads[0]) < 5e-5 * scale
    tiny.model.zero_grad()


def test_reference_with_the_adapter_off_equals_a_separately_loaded_plain_base(tiny):
    from transformers import AutoModelForCausalLM

    batch = tiny.batch
    inputs = {"input_ids": batch["input_ids"], "attention_mask": batch["attention_mask"]}
    with torch.no_grad():
        tuned, _ = sequence_logps(tiny.model, inputs, batch["labels"], chunked=True)
        with reference_model(tiny.model):
            reference, _ = sequence_logps(tiny.model, inputs, batch["labels"], chunked=True)
        source = tiny.model.peft_config["default"].base_model_name_or_path
        plain = AutoModelForCausalLM.from_pretrained(source, dtype=torch.float32).eval()
        base, _ = sequence_logps(plain, inputs, batch["labels"], chunked=False)
    assert tiny.model.training, "the training mode is restored"
    assert (tuned - base).abs().max() > 1e-3, "the adapter changes the log-probs"
    assert (reference - base).abs().max() < 1e-6 * base.abs().max(), (reference - base).abs().max()


# --------------------------------------------------------------------------------------- training
def test_dpo_gradient_accumulation_8x1_4x2_2x4_give_the_same_loss_and_adapter(tmp_path):
    exact = [
        *TINY_DPO,
        "lora.dropout=0.0",
        "score=false",
        "trainer.limit_val_batches=0",
        "trainer.max_steps=3",
    ]
    assert_same_steps(train_with_accumulation(tmp_path, exact))


def test_sft_then_dpo_chain_with_the_sft_adapter_as_init_and_reference(tmp_path):
    sft = train(compose_train([*TINY, "score=false", f"output_dir={tmp_path / 'sft'}"]))
    adapter = tmp_path / "sft" / "adapter"
    assert sft.summary["status"] == "completed"
    result = train(
        compose_train(
            [
                *TINY_DPO,
                "trainer.max_steps=2",
                "trainer.val_check_interval=1",
                f"lora.init_from={adapter}",
                f"objective.ref_adapter={adapter}",
                f"output_dir={tmp_path / 'dpo'}",
            ]
        )
    )
    summary = result.summary
    assert summary["objective"]["ref_adapter"] == str(adapter)
    # At step 0 policy and reference are the same adapter: the first validation's rewards are 0.
    with (tmp_path / "dpo" / "metrics.csv").open() as f:
        first = next(row for row in csv.DictReader(f) if row["val/rewards_chosen"])
    assert (
        abs(float(first["val/rewards_chosen"])) < 1e-6 and abs(float(first["val/loss"]) - math.log(2)) < 1e-5
    )
    assert summary["preference"]["rewards_margin"] != 0, "the second validation sees the trained policy"
    saved = json.loads((tmp_path / "dpo" / "adapter" / "adapter_config.json").read_text())
    assert saved["r"] == 8 and REFERENCE_ADAPTER not in {
        p.name for p in (tmp_path / "dpo" / "adapter").iterdir()
    }
    before, after = load_file(str(adapter / "adapter_model.safetensors")), _adapter(tmp_path / "dpo")
    assert max((before[k] - after[k]).abs().max().item() for k in before) > 0, "DPO moved the SFT adapter"
    assert "preference_tuned" in summary and summary["preference_tuned"]["n"] == 4
    _merge_generate_and_evaluate_a_dpo_adapter(tmp_path / "dpo", summary)


def _merge_generate_and_evaluate_a_dpo_adapter(run: Path, summary: dict) -> None:
    """The commands after training take a DPO adapter as they take an SFT one (issue 21, point 7)."""
    from lit_lora.apps import evaluate as evaluate_command
    from lit_lora.apps import generate as generate_command
    from lit_lora.apps import merge as merge_command

    adapter = run / "adapter"
    data = [
        *(o for o in DPO if o.startswith("data")),
        "data.train_size=32",
        "data.val_size=8",
        "data.test_size=4",
        "data.eval_batch_size=1",
    ]
    work = run.parent / "evaluation"
    report = evaluate_command.run(
        ["model=tiny", *data, "data.score_max_new_tokens=4", f"adapters=[{adapter}]", f"work_dir={work}"]
    )
    base, tuned = report["models"]
    # The same held-out pairs as training's own scoring: the same preference accuracy, base and tuned.
    assert tuned["preference_accuracy"] == round(summary["preference_tuned"]["accuracy"], 2)
    assert base["preference_accuracy"] == round(summary["preference_base"]["accuracy"], 2)
    assert tuned["logp_margin"] != base["logp_margin"] and tuned["perplexity"] != base["perplexity"]

    # generate: the evaluation's first greedy answer, from the same prompt through the Python API.
    cfg = to_train_config(compose_train(["model=tiny", *DPO[:1], *data, f"output_dir={run.parent / 'x'}"]))
    built = build_model(GenerateConfig(model=cfg.model), adapter=adapter)
    pairs = DataModule(cfg.data, built.tokenizer, run.parent / "data")
    pairs.setup()
    (prompt,) = pairs.rows["test"][0].messages[:-1]
    quoted = "'" + prompt["content"].replace("'", "\\'") + "'"  # Hydra's quoted value: spaces, newlines
    reply = generate_command.run(["model=tiny", f"adapter={adapter}", f"prompt={quoted}", "max_new_tokens=4"])
    assert reply.text == tuned["examples"][0]["answer"] and reply.new_tokens > 0

    # merge: the merged model's logits are the base's plus the adapter's.
    merged = merge_command.run(["model=tiny", f"adapter={adapter}", f"output_dir={run.parent / 'merged'}"])
    plain = AutoModelForCausalLM.from_pretrained(str(merged), dtype=torch.float32).eval()
    ids = torch.tensor([pairs.examples["test"][0]["input_ids"]])
    policy = built.model
    with torch.no_grad():
        expected, got = policy(input_ids=ids).logits, plain(input_ids=ids).logits
        with policy.disable_adapter():
            before = policy(input_ids=ids).logits
    assert (expected - before).abs().max() > 1e-4, "the DPO adapter must change the logits"
    assert (got - expected).abs().max() <= 1e-5


def _adapter(run: Path) -> dict[str, torch.Tensor]:
    return load_file(str(run / "adapter" / "adapter_model.safetensors"))


def test_precomputed_reference_replaces_the_reference_forward_and_is_read_back_on_resume(
    tmp_path, monkeypatch
):
    exact = [*TINY_DPO, "lora.dropout=0.0", "score=false", *CKPT_EVERY_2]
    live = train(compose_train([*exact, f"output_dir={tmp_path / 'live'}"])).summary

    def no_reference(model):
        raise AssertionError("a training or validation step ran the reference model")

    # From here on any step that runs the reference fails; the precomputing pass uses its own import.
    monkeypatch.setattr("lit_lora.training.module.reference_model", no_reference)
    run = tmp_path / "pre"
    pre = train(compose_train([*exact, "objective.precompute_ref=true", f"output_dir={run}"])).summary
    assert pre["precomputed_reference"]["status"] == "computed"
    (stored,) = (run / "reference").glob("*.safetensors")
    logps = load_file(str(stored))
    assert logps["train"].shape == (32, 2) and logps["val"].shape == (8, 2) and (logps["train"] < 0).all()
    # Same training as with the reference run at every step: only the batching of the pass differs.
    a, b = _adapter(tmp_path / "live"), _adapter(run)
    assert max((a[k] - b[k]).abs().max().item() for k in a) < 1e-5
    assert abs(pre["val_loss"] - live["val_loss"]) < 1e-5
    assert abs(pre["preference"]["rewards_margin"] - live["preference"]["rewards_margin"]) < 1e-5

    # An interrupted run (a checkpoint at step 2, no results yet) resumes and reads the file back.
    trained, written = _adapter(run), stored.stat().st_mtime_ns
    shutil.rmtree(run / "adapter")
    (run / "summary.json").unlink()
    for later in (run / "checkpoints").iterdir():
        if later.name != "step-000002.ckpt":
            shutil.rmtree(later)
    resumed = train(
        compose_train([*exact, "objective.precompute_ref=true", f"output_dir={run}", "resume=auto"])
    )
    assert resumed.summary["precomputed_reference"]["status"] == "loaded"
    assert stored.stat().st_mtime_ns == written and len(list((run / "reference").iterdir())) == 1
    again = _adapter(run)
    assert all(torch.equal(trained[k], again[k]) for k in trained), "resume is exact with stored log-probs"
    assert any(t.abs().max() > 0 for k, t in trained.items() if "lora_B" in k)


def test_the_reference_key_changes_with_the_pairs_and_with_what_the_reference_computes_with():
    from lit_lora.training.reference import reference_key

    pair = {
        "input_ids": [1, 2, 3],
        "labels": [-100, 2, 3],
        "rejected_input_ids": [1, 2, 4],
        "rejected_labels": [-100, 2, 4],
    }
    examples = {"train": [pair], "val": []}
    key = reference_key(examples, {"model": "m", "ref_adapter": None})
    assert key == reference_key({"train": [dict(pair)], "val": []}, {"ref_adapter": None, "model": "m"})
    assert key != reference_key(examples, {"model": "m", "ref_adapter": "ab12"})
    assert key != reference_key(
        {"train": [{**pair, "rejected_input_ids": [1, 2, 5]}], "val": []}, {"model": "m", "ref_adapter": None}
    )
    assert key != reference_key({"train": [], "val": [pair]}, {"model": "m", "ref_adapter": None})


def test_precompute_ref_is_refused_where_it_cannot_run(tmp_path):
    from lit_lora.config.device import check_device
    from lit_lora.config.schema import to_train_config

    with pytest.raises(UserError, match="objective=simpo has none"):
        to_train_config(compose_train([*TINY_DPO, "objective=simpo", "objective.precompute_ref=true"]))
    fsdp = ["trainer=fsdp", "trainer.accelerator=cpu", "trainer.devices=2", "objective.precompute_ref=true"]
    with pytest.raises(UserError, match=r"precompute_ref=true is not supported with trainer\.strategy=fsdp"):
        check_device(to_train_config(compose_train([*TINY_DPO, *fsdp, f"output_dir={tmp_path}"])))


@pytest.mark.parametrize("objective", ["simpo", "orpo"])
def test_reference_free_objectives_train_and_report_their_metrics(tmp_path, objective):
    result = train(
        compose_train([*TINY_DPO, f"objective={objective}", "score=false", f"output_dir={tmp_path / 'run'}"])
    )
    assert set(result.summary["preference"]) == {
        "rewards_chosen",
        "rewards_rejected",
        "rewards_margin",
        "rewards_accuracy",
        "logps_chosen",
        "logps_rejected",
    }
    header = (tmp_path / "run" / "metrics.csv").read_text().splitlines()[0].split(",")
    assert {"train/loss", "train/rewards_margin", "val/rewards_accuracy", "val/loss"} <= set(header)
    rows, out = compare([tmp_path / "run"], tmp_path / "report")
    accuracy = result.summary["preference"]["rewards_accuracy"]
    assert rows[0]["preference_accuracy"] == round(100 * accuracy, 1) and rows[0]["best_val_ppl"] is None
    assert (out / "preference.png").stat().st_size > 0


# -------------------------------------------------------------------------------------- bad input
def test_dpo_on_non_preference_data_stops_before_loading_the_model(tmp_path):
    done = run_cli("model=tiny", "objective=dpo", f"output_dir={tmp_path / 'run'}", timeout=120)
    assert done.returncode == 2, done.stderr[-2000:]
    lines = [line for line in done.stderr.strip().splitlines() if line]
    assert len(lines) == 1 and "data.format=preference" in lines[0], done.stderr
    assert not (tmp_path / "run" / "config.yaml").exists(), "nothing was written or loaded"


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        (["objective.beta=0"], "objective.beta must be > 0"),
        (["objective.loss=kto"], "objective.loss='kto' is not supported"),
        (["objective.label_smoothing=0.5"], r"objective.label_smoothing must be in \[0, 0.5\)"),
        (["objective=simpo", "objective.ref_adapter=/x"], "objective=simpo has none"),
        (["objective.rpo_alpha=-1"], "objective.rpo_alpha must be >= 0"),
        (["objective=orpo", "objective.rpo_alpha=1"], "objective=orpo has its own loss"),
        (["data.packing=true"], "data.packing=true is not supported with objective=dpo"),
    ],
)
def test_impossible_objective_values_fail_at_config_time_naming_the_key(overrides, message, tmp_path):
    from lit_lora.config.schema import to_train_config

    cfg = compose_train([*TINY_DPO, *overrides, f"output_dir={tmp_path}"])
    with pytest.raises(UserError, match=message):
        to_train_config(cfg)


def test_a_reference_adapter_of_another_base_or_shape_is_refused_naming_both(tiny, tmp_path):
    from peft import LoraConfig as PeftLoraConfig
    from peft import get_peft_model
    from transformers import AutoModelForCausalLM, LlamaConfig

    source = tiny.model.peft_config["default"].base_model_name_or_path
    other = AutoModelForCausalLM.from_config(
        LlamaConfig(**{**tiny.model.config.to_dict(), "hidden_size": 32})
    )
    other.config.name_or_path = source
    get_peft_model(other, PeftLoraConfig(r=4, target_modules=["q_proj"])).save_pretrained(
        str(tmp_path / "shape")
    )
    with pytest.raises(UserError, match=rf"does not fit this run's model {source}"):
        load_reference(tiny.model, str(tmp_path / "shape"))
    config = json.loads((tmp_path / "shape" / "adapter_config.json").read_text())
    (tmp_path / "shape" / "adapter_config.json").write_text(
        json.dumps({**config, "base_model_name_or_path": "gpt2"})
    )
    with pytest.raises(UserError, match=rf"was trained on gpt2, but this run's model is {source}"):
        load_reference(tiny.model, str(tmp_path / "shape"))
    assert REFERENCE_ADAPTER not in tiny.model.peft_config


def test_pair_scores_refuse_dpo_without_reference_log_probs():
    logps = (torch.tensor([-1.0]), torch.tensor([-2.0]))
    with pytest.raises(ValueError, match="reference"):
        pair_scores(ObjectiveConfig(name="dpo"), logps, (torch.tensor([1]), torch.tensor([1])))
