"""Every file under conf/ composes; typos and bad values fail early with the dotted key named."""

from __future__ import annotations

import pytest
from hydra.errors import ConfigCompositionException
from omegaconf.errors import ConfigKeyError

from lit_lora.config.schema import to_train_config
from lit_lora.errors import UserError
from tests.helpers import CONF, compose_train

GROUP_FILES = sorted(p for p in CONF.rglob("*.yaml") if p.parent != CONF)


def _override_for(path) -> str:
    group = path.parent.relative_to(CONF).as_posix()
    # callbacks/default is loaded by train.yaml as a plain config, so that +callbacks=<name> adds one more.
    return f"+{group}={path.stem}" if group == "callbacks" else f"{group}={path.stem}"


def test_config_files_found():
    groups = {p.parent.name for p in GROUP_FILES}
    assert {
        "model",
        "quant",
        "lora",
        "data",
        "optim",
        "trainer",
        "callbacks",
        "logger",
        "experiment",
    } <= groups


@pytest.mark.parametrize("path", GROUP_FILES, ids=lambda p: str(p.relative_to(CONF)))
def test_every_config_file_composes(path, tmp_path):
    overrides = [_override_for(path), f"output_dir={tmp_path}"]
    if path.parent.name == "objective_data":  # chosen by its name, <objective>_<data>, not by an override
        objective, data = path.stem.split("_", 1)
        overrides = [f"objective={objective}", f"data={data}", f"output_dir={tmp_path}"]
    if path.parent.name == "data" and path.stem == "files":
        overrides.append(f"data.source={tmp_path}")
    # Preference data and preference objectives only compose together (config.check_objective_data).
    if path.parent.name == "data" and path.stem == "demo_preference":
        overrides.append("objective=dpo")
    if path.parent.name == "data" and path.stem == "demo_prompt":  # prompts: objective=grpo (and its rewards)
        overrides.append("objective=grpo")
    if path.parent.name == "objective" and path.stem == "grpo":
        overrides.append("data=demo_prompt")
    elif path.parent.name == "objective" and path.stem != "sft":
        overrides.append("data=demo_preference")
    cfg = compose_train(overrides)
    typed = to_train_config(cfg)
    assert typed.output_dir == str(tmp_path)
    assert typed.model.name_or_path


def test_the_preference_demo_trains_dpo_with_the_chosen_answers_nll_unless_told_otherwise(tmp_path):
    """conf/objective_data/dpo_demo_preference.yaml applies to that pair only; the command line wins."""

    def rpo_alpha(*overrides: str) -> float:
        return to_train_config(compose_train([*overrides, f"output_dir={tmp_path}"])).objective.rpo_alpha

    assert rpo_alpha("objective=dpo", "data=demo_preference") == 1.0
    assert rpo_alpha("objective=dpo", "data=demo_preference", "objective.rpo_alpha=0") == 0.0
    assert rpo_alpha("objective=orpo", "data=demo_preference") == 0.0
    assert rpo_alpha("objective=dpo", "data=demo_preference", "experiment=smollm2_qlora") == 1.0


def test_default_config_values(tmp_path):
    typed = to_train_config(compose_train([f"output_dir={tmp_path}"]))
    assert typed.model.name_or_path == "embedded:smollm2-135m"
    assert typed.quant.method == "none"
    assert typed.data.source == "demo"
    assert typed.lora.target_modules == ["attention"]
    assert "adapter_export" in compose_train([f"output_dir={tmp_path}"]).callbacks


def test_article_experiments_match_the_article(tmp_path):
    gpt2 = to_train_config(compose_train(["experiment=gpt2_lora", f"output_dir={tmp_path}"]))
    assert (gpt2.model.model_type, gpt2.lora.r, gpt2.lora.alpha, gpt2.lora.dropout) == ("gpt2", 8, 32, 0.1)
    assert gpt2.lora.target_modules == ["c_attn"]
    mistral = to_train_config(compose_train(["experiment=mistral7b_qlora", f"output_dir={tmp_path}"]))
    assert mistral.model.name_or_path == "mistralai/Mistral-7B-v0.1"
    assert (mistral.quant.method, mistral.quant.compute_dtype) == ("nf4", "float16")
    assert (mistral.lora.r, mistral.lora.alpha, mistral.lora.dropout) == (64, 16, 0.1)
    assert mistral.lora.target_modules == ["q_proj", "k_proj", "v_proj", "o_proj"]


def test_issue_command_composes(tmp_path):
    typed = to_train_config(
        compose_train(["model=mistral7b", "quant=nf4", "lora.r=64", f"output_dir={tmp_path}"])
    )
    assert (typed.quant.method, typed.lora.r, typed.model.model_type) == ("nf4", 64, "mistral")


@pytest.mark.parametrize(
    "override", ["lora.rr=3", "quant.double_qant=false", "trainer.max_step=3", "modle=tiny"]
)
def test_typo_in_a_key_fails_at_composition(override):
    with pytest.raises((ConfigCompositionException, ConfigKeyError)) as info:
        compose_train([override])
    assert override.split("=")[0].split(".")[-1] in str(info.value) + str(info.value.__cause__)


def test_unknown_group_option_fails():
    with pytest.raises(ConfigCompositionException, match="model/foo"):
        compose_train(["model=foo"])


@pytest.mark.parametrize(
    ("override", "message"),
    [
        ("quant.method=nf5", "quant.method"),
        ("lora.r=0", "lora.r"),
        ("lora.init=zeros", "lora.init"),
        ("trainer.precision=64", "trainer.precision"),
        ("trainer.process_group_timeout_s=0", "trainer.process_group_timeout_s"),
        ("optim.name=sgd", "optim.name"),
        ("data.batch_size=0", "data.batch_size"),
        ("lora.target_modules=7", "lora.target_modules"),
    ],
)
def test_bad_values_raise_user_error_naming_the_key(override, message, tmp_path):
    cfg = compose_train([override, f"output_dir={tmp_path}"])
    with pytest.raises(UserError, match=message):
        to_train_config(cfg)


def test_cross_field_check_names_the_fix(tmp_path):
    cfg = compose_train(["quant=nf4", "trainer.precision=16-mixed", f"output_dir={tmp_path}"])
    with pytest.raises(UserError, match=r"bf16-mixed or quant\.compute_dtype=float16"):
        to_train_config(cfg)


def test_cli_typo_is_one_clear_message_without_traceback(cli, tmp_path):
    proc = cli("lora.rr=3", f"output_dir={tmp_path}")
    assert proc.returncode != 0
    assert "lora.rr" in proc.stderr
    assert "Traceback" not in proc.stderr + proc.stdout
    assert not any(tmp_path.iterdir()), "nothing is written before the config is valid"


def test_cli_unknown_group_option(cli, tmp_path):
    proc = cli("model=foo", f"output_dir={tmp_path}")
    assert proc.returncode != 0
    assert "model/foo" in proc.stderr and "smollm2-135m" in proc.stderr
    assert "Traceback" not in proc.stderr


@pytest.mark.parametrize(
    ("app", "overrides", "kind"),
    [
        ("merge", ["adapter=/a", "output_dir=/b", "quant=nf4", "dtype=bfloat16"], "MergeConfig"),
        ("generate", ["adapter=/a", "prompt=hi", "model=tiny"], "GenerateConfig"),
        ("evaluate", ["adapters=[/a,/b]", "data=sentiment", "work_dir=/tmp/w"], "EvaluateConfig"),
    ],
)
def test_after_training_apps_compose_with_the_training_groups(app, overrides, kind):
    from hydra import compose, initialize_config_dir
    from hydra.core.global_hydra import GlobalHydra
    from omegaconf import OmegaConf

    from lit_lora.config.apps import register_app_configs

    register_app_configs()
    GlobalHydra.instance().clear()
    with initialize_config_dir(config_dir=str(CONF), version_base="1.3"):
        typed = OmegaConf.to_object(compose(config_name=app, overrides=overrides))
    assert type(typed).__name__ == kind
    assert typed.model.name_or_path
    with (
        pytest.raises(ConfigCompositionException),
        initialize_config_dir(config_dir=str(CONF), version_base="1.3"),
    ):
        compose(config_name=app, overrides=[*overrides, "no_such_key=1"])
