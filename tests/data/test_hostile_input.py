"""Hostile input: random and malformed rows (hypothesis), and a one-character typo of every config key.

Data: whatever the rows hold, the pipeline either raises :class:`UserError` or emits examples that
each have a trained token, whose labels are their own token ids where trained, and whose trained text
is the answer the row gave. Config: a typo of any leaf key fails before the model loads, naming the key.
"""

from __future__ import annotations

import copy
import functools
import json
import subprocess
import sys
import time
from pathlib import Path

import pytest
from hydra import compose, initialize_config_dir
from hydra.core.global_hydra import GlobalHydra
from hydra.errors import HydraException
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from omegaconf import OmegaConf

from lit_lora.config.schema import ModelConfig, to_train_config
from lit_lora.data.module import DataModule
from lit_lora.data.rendering import IGNORE_INDEX, count_trained
from lit_lora.errors import UserError
from lit_lora.models.builder import load_tokenizer
from lit_lora.training.run import check_plugin_keys
from tests.helpers import CONF, ROOT, TINY, compose_train

TOKENIZER = load_tokenizer(ModelConfig(name_or_path="embedded:smollm2-135m"), "embedded:smollm2-135m", True)

values = st.one_of(
    st.none(),
    st.text(max_size=40),
    st.integers(),
    st.floats(allow_nan=True),
    st.booleans(),
    st.lists(st.text(max_size=5), max_size=3),
    st.dictionaries(st.text(max_size=5), st.text(max_size=5), max_size=2),
)
good_text = st.text(st.characters(codec="utf-8", exclude_categories=("Cs",)), min_size=1, max_size=60)
alpaca_rows = st.fixed_dictionaries(
    {},
    optional={"instruction": st.one_of(good_text, values), "input": st.one_of(good_text, values), "output": st.one_of(good_text, values)},
)  # fmt: skip
messages = st.lists(
    st.fixed_dictionaries(
        {},
        optional={
            "role": st.one_of(st.sampled_from(["system", "user", "assistant", "tool", ""]), values),
            "content": st.one_of(good_text, values),
        },
    ),
    max_size=5,
)
chat_rows = st.one_of(st.fixed_dictionaries({"messages": st.one_of(messages, values)}), values)
raw_lines = st.binary(max_size=80)


@functools.cache
def _data_config(tmp_path: Path, fmt: str):
    """The data settings of ``_setup``: composed once per test (a Hydra composition costs ~0.1 s, more than
    most examples), since hypothesis runs every example of a test in the same ``tmp_path``."""
    path = tmp_path / "rows.jsonl"
    return to_train_config(
        compose_train(
            [*TINY, f"output_dir={tmp_path / 'run'}", "data=files", f"data.source='{path}'", f"data.format={fmt}",
             "data.on_bad_row=skip", "data.cache=false", "data.max_seq_len=64", "data.val_fraction=0", "data.test_fraction=0"]
        )
    ).data  # fmt: skip


def _setup(tmp_path, fmt: str, lines: list[bytes]) -> DataModule | None:
    (tmp_path / "rows.jsonl").write_bytes(b"\n".join(lines))
    module = DataModule(_data_config(tmp_path, fmt), TOKENIZER, tmp_path / "data")
    try:
        module.setup()
    except UserError:
        return None
    return module


def _check_examples(module: DataModule) -> None:
    for example in module.examples["train"]:
        ids, labels = example["input_ids"], example["labels"]
        assert len(ids) == len(labels) and count_trained(labels) >= 1
        assert all(label in (IGNORE_INDEX, token) for token, label in zip(ids, labels, strict=True))


# Derandomized, no example database: every run (CI's clean clone included) draws the same rows, so a
# failure reproduces anywhere instead of once in a while (`make fuzz` explores far more rows).
_SETTINGS = settings(
    max_examples=25,
    deadline=None,
    derandomize=True,
    database=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)


@_SETTINGS
@given(rows=st.lists(alpaca_rows, min_size=1, max_size=6), junk=st.lists(raw_lines, max_size=3))
def test_random_alpaca_rows_never_raise_and_every_example_is_well_masked(tmp_path, rows, junk):
    lines = [json.dumps(r, ensure_ascii=False).encode() for r in rows] + junk
    module = _setup(tmp_path, "alpaca", lines)
    if module is None:
        return
    _check_examples(module)
    for row, example in zip(module.rows["train"], module.examples["train"], strict=True):
        answer = row.messages[-1]["content"]
        trained = [
            t
            for t, label in zip(example["input_ids"], example["labels"], strict=True)
            if label != IGNORE_INDEX
        ]
        text = TOKENIZER.decode(trained)
        # What the tokenizer can say of the answer: byte-level BPE drops bytes missing from its vocabulary
        # (SmolLM2 has no token for 0xF1, the lead byte of U+40000..U+7FFFF), so compare with its round trip.
        said = TOKENIZER.decode(TOKENIZER(answer.strip(), add_special_tokens=False)["input_ids"])
        if count_trained(example["labels"]) == len(trained) and len(example["input_ids"]) < 64:
            assert text.startswith(said[:10]) or said[:10] in text, (answer, said, text)


@_SETTINGS
@given(rows=st.lists(chat_rows, min_size=1, max_size=5), junk=st.lists(raw_lines, max_size=3))
def test_random_chat_rows_never_raise_and_every_example_is_well_masked(tmp_path, rows, junk):
    lines = [json.dumps(r, ensure_ascii=False).encode() for r in rows] + junk
    module = _setup(tmp_path, "chat", lines)
    if module is not None:
        _check_examples(module)


# ------------------------------------------------------------------------------------------ config typos
def _leaves() -> list[str]:
    cfg = compose_train([*TINY, "output_dir=/tmp/unused"])
    container = OmegaConf.to_container(cfg, resolve=False)
    out = []

    def walk(node, prefix):
        for key, value in node.items():
            dotted = f"{prefix}{key}"
            if isinstance(value, dict) and value:
                walk(value, dotted + ".")
            else:
                out.append(dotted)

    walk(container, "")
    return out


def _typo(key: str, siblings: set[str]) -> str:
    """A one-character change of the last segment that is not another valid key."""
    head, _, leaf = key.rpartition(".")
    for i in range(len(leaf) - 1, -1, -1):
        for wrong in (leaf[:i] + leaf[i + 1 :], leaf[:i] + "x" + leaf[i + 1 :]):
            if wrong and wrong != leaf and wrong not in siblings and not wrong.startswith("_"):
                return f"{head}.{wrong}" if head else wrong
    raise AssertionError(key)


def test_a_one_character_typo_of_every_leaf_key_fails_naming_the_key():
    leaves = _leaves()
    # One Hydra initialisation for the compositions below (compose_train starts a new one each time).
    GlobalHydra.instance().clear()
    with initialize_config_dir(config_dir=str(CONF), version_base="1.3"):
        _typos_fail(leaves)


def _with_key(cfg, key: str):
    """A copy of the composed ``cfg`` with ``key`` added (value 1): the config Hydra composes for
    ``+key=1``, checked against Hydra's own for a sample of the keys in :func:`_typos_fail`."""
    cfg = copy.deepcopy(cfg)
    OmegaConf.set_struct(cfg, False)
    OmegaConf.update(cfg, key, 1, force_add=True)
    OmegaConf.set_struct(cfg, True)
    return cfg


def _typos_fail(leaves: list[str]) -> None:
    assert len(leaves) > 80
    composed = compose(config_name="train", overrides=[*TINY, "output_dir=/tmp/unused"])
    for n, key in enumerate(leaves):
        if key.endswith("._target_") or key.startswith("model.config_overrides."):
            continue  # overrides of the architecture's config: checked against it when it loads (below)
        head = key.rpartition(".")[0]
        siblings = {k.rpartition(".")[2] for k in leaves if k.rpartition(".")[0] == head}
        wrong = _typo(key, siblings)
        # ``+key=`` gets past Hydra, which only appends the key, and must be caught by lit-lora's schema:
        # every key, on the composed config with the key appended. ``key=`` is refused by Hydra's struct
        # mode, the same code for every key: it, and Hydra's own ``+key=`` (whose config must be the one
        # checked), run on a sample of one key in eight (each compose costs ~0.1 s on the CI machine).
        _refused(f"+{wrong}=1", wrong, functools.partial(_with_key, composed, wrong))
        if n % 8 == 0:
            appended = _with_key(composed, wrong)
            for override in (f"+{wrong}=1", f"{wrong}=1"):
                _refused(override, wrong, functools.partial(_by_hydra, override, appended))


def _by_hydra(override: str, appended) -> object:
    """Hydra's composition with ``override``; for ``+key=1``, it must be ``appended``, the config checked
    for every key."""
    cfg = compose(config_name="train", overrides=[*TINY, "output_dir=/tmp/unused", override])
    if override.startswith("+"):
        assert cfg == appended, f"Hydra's {override} is not the composed config with the key appended"
    return cfg


def _refused(override: str, wrong: str, config) -> None:
    """The config ``config()`` builds for ``override`` fails, in Hydra or in lit-lora's checks, naming ``wrong``."""
    try:
        cfg = config()
        to_train_config(cfg)
        check_plugin_keys(cfg)
    except (HydraException, UserError) as err:
        assert wrong.rpartition(".")[2] in str(err), (override, str(err)[:300])
    else:
        raise AssertionError(f"{override} was accepted")


def test_a_typo_in_config_overrides_fails_when_the_architecture_config_loads(tmp_path):
    from lit_lora.models.builder import build_model

    cfg = to_train_config(
        compose_train(["model=tiny", f"output_dir={tmp_path}", "+model.config_overrides.vocab_siz=3"])
    )
    with pytest.raises(UserError, match=r"model\.config_overrides\.vocab_siz: LlamaConfig has no such field"):
        build_model(cfg)


def test_a_typo_on_the_command_line_fails_before_the_model_loads():
    started = time.time()
    done = subprocess.run(
        [sys.executable, "-m", "lit_lora.train", "model=tiny", "+callbacks.adapter_checkpoint.every_n_train_stepz=2"],
        cwd=ROOT, capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    assert done.returncode == 2
    last = done.stderr.strip().splitlines()[-1]
    assert "callbacks.adapter_checkpoint.every_n_train_stepz" in last and "every_n_train_steps" in last
    assert "Loading weights" not in done.stderr
    assert time.time() - started < 30


@pytest.mark.parametrize(
    "overrides,message",
    [
        (["trainer.precision=16-mixed", "quant=nf4"], "trainer.precision=16-mixed"),
        (["trainer.accelerator=gpu"], "CUDA"),
    ],
)
def test_cross_field_and_device_checks_say_what_to_change(tmp_path, overrides, message):
    """Through ``lit_lora.training.run.run``, which composes and checks what the command line does, in this
    process: how the CLI ends a UserError (exit 2, one line) is checked by the command-line test above."""
    from lit_lora.training.run import run

    with pytest.raises(UserError) as refused:
        run(["model=tiny", f"output_dir={tmp_path}", *overrides])
    # exit_with prints "lit-lora: error: <message>" and exits with the error's status
    assert refused.value.exit_code == 2
    assert message in f"lit-lora: error: {refused.value}".splitlines()[-1], str(refused.value)
