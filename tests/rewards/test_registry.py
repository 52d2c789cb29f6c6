"""Finding rewards: registry names, module and file plug-ins named in a recipe, and the errors a
recipe author sees for a wrong name or key."""

import textwrap

import pytest
import yaml

from r1pipe.rewards import RewardRunner, RewardSpec, available_rewards, load_reward, parse_reward_specs

BUILT_INS = {
    "accuracy", "format", "tag_count", "language_consistency", "reasoning_steps",
    "cosine_length", "repetition_penalty", "code_execution", "reward_model",
}

PLUGIN = textwrap.dedent(
    """
    def length_bonus(prompts, completions, target=10, **columns):
        # a user reward in its own file: closeness of the completion length to a target
        return [1.0 - min(1.0, abs(len(c) - target) / target) for c in completions]

    def echo_column(prompts, completions, difficulty, **columns):
        return [float(d) for d in difficulty]
    """
)


@pytest.fixture
def plugin_dir(tmp_path):
    (tmp_path / "my_rewards.py").write_text(PLUGIN)
    return tmp_path


def test_all_built_ins_are_registered():
    assert BUILT_INS <= set(available_rewards())


def test_unknown_name_lists_available_and_suggests():
    with pytest.raises(ValueError) as e:
        load_reward("acuracy")
    msg = str(e.value)
    assert "did you mean 'accuracy'" in msg
    for name in BUILT_INS:
        assert name in msg


def test_module_function_name_loads():
    fn = load_reward("r1pipe.rewards.format:format_reward")
    assert fn is load_reward("format")


def test_missing_function_in_plugin_file_names_file_and_functions(plugin_dir):
    with pytest.raises(ValueError, match="length_bonus"):
        load_reward(f"{plugin_dir}/my_rewards.py:length_bonsu")
    with pytest.raises(ValueError, match="does not exist"):
        load_reward(f"{plugin_dir}/nope.py:f")


def test_plugin_file_named_in_yaml_recipe_is_loaded_and_called(plugin_dir):
    recipe = yaml.safe_load(
        """
        rewards:
          - name: format
            weight: 0.5
          - name: my_rewards.py:length_bonus
            weight: 2.0
            kwargs: {target: 4}
          - name: my_rewards.py:echo_column
            isolation: inline
        """
    )
    specs = parse_reward_specs(recipe["rewards"], base_dir=plugin_dir)
    assert [s.column for s in specs] == ["format", "length_bonus", "echo_column"]
    assert specs[1].name == f"{plugin_dir.resolve()}/my_rewards.py:length_bonus"
    completions = ["<think>a</think>b", "abcd"]
    with RewardRunner(specs) as runner:
        out = runner(["p", "p"], completions, difficulty=[3, 5])
    format_ = [1.0, 0.0]
    length = [1.0 - min(1.0, abs(len(c) - 4) / 4) for c in completions]
    assert out.per_function == {"format": format_, "length_bonus": length, "echo_column": [3.0, 5.0]}
    assert out.totals == pytest.approx([0.5 * f + 2.0 * b + e for f, b, e in zip(format_, length, [3.0, 5.0])])


def test_weight_mapping_form():
    specs = parse_reward_specs({"accuracy": 1.0, "format": {"weight": 0.2, "kwargs": {"answer_tag": True}}})
    assert specs == [RewardSpec("accuracy", 1.0), RewardSpec("format", 0.2, {"answer_tag": True})]


@pytest.mark.parametrize(
    "config,message",
    [
        ([{"name": "accuracy", "wieght": 1}], "did you mean 'weight'"),
        ([{"weight": 1}], "missing key 'name'"),
        (["acuracy"], r"rewards\[0\]: unknown reward 'acuracy'"),
        ([{"name": "format", "isolation": "thread"}], "isolation"),
        (["format", "format"], "appear twice"),
        ("accuracy", "expected a list"),
    ],
)
def test_bad_recipe_entries_fail_loudly(config, message):
    with pytest.raises(ValueError, match=message):
        parse_reward_specs(config)


def test_trl_reward_function_runs_unchanged():
    """TRL's own accuracy reward, named as a plug-in, agrees with ours on chat completions."""
    pytest.importorskip("trl")
    completions = [[{"role": "assistant", "content": c}] for c in [r"\boxed{\frac{1}{3}}", r"\boxed{0.5}", "no idea"]]
    solution = [r"\frac{1}{3}"] * 3
    specs = [RewardSpec("trl.rewards:accuracy_reward", isolation="inline", label="trl"), RewardSpec("accuracy")]
    out = RewardRunner(specs)(["q"] * 3, completions, solution=solution)
    assert out.per_function["trl"] == out.per_function["accuracy"] == [1.0, 0.0, 0.0]
