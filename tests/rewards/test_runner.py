"""Failure isolation: a reward that raises, hangs, or returns junk yields None for the samples it
hits, is counted in the metrics with its first error, and the run goes on; None is then 0 or drops
the group, as the recipe says."""

import textwrap
import time

import pytest

from r1pipe.rewards import RewardRunner, RewardSpec, combine_rewards

BAD_REWARDS = textwrap.dedent(
    """
    import time

    def sleeps_forever(prompts, completions, **columns):
        while True:
            time.sleep(3600)

    def raises(prompts, completions, **columns):
        raise RuntimeError("boom")

    def raises_on_bad(prompts, completions, **columns):
        if any("bad" in c for c in completions):
            raise ValueError("cannot score " + repr([c for c in completions if "bad" in c][0]))
        return [float(len(c)) for c in completions]

    def junk(prompts, completions, **columns):
        return [1.0, "high", float("nan"), None]

    def wrong_length(prompts, completions, **columns):
        return [1.0]

    def constant(prompts, completions, **columns):
        return [1.0] * len(completions)
    """
)
COMPLETIONS = ["ok one", "a bad one", "ok three", "ok four"]


@pytest.fixture(scope="module")
def bad_file(tmp_path_factory):
    path = tmp_path_factory.mktemp("plugins") / "bad_rewards.py"
    path.write_text(BAD_REWARDS)
    return path


def spec(bad_file, fn, **kw):
    return RewardSpec(f"{bad_file}:{fn}", label=fn, **kw)


def test_hanging_and_raising_rewards_in_workers_do_not_stop_the_run(bad_file):
    specs = [
        spec(bad_file, "sleeps_forever", timeout_s=0.5),
        spec(bad_file, "raises", timeout_s=10.0),
        spec(bad_file, "raises_on_bad", timeout_s=10.0),
        RewardSpec("tag_count"),
    ]
    with RewardRunner(specs, pool_size=2) as runner:
        start = time.monotonic()
        out = runner(["p"] * 4, COMPLETIONS)
        first_call_s = time.monotonic() - start
        assert out.per_function["sleeps_forever"] == [None] * 4
        assert out.per_function["raises"] == [None] * 4
        # the batch call failed, so each sample was retried alone: only the bad one is None
        assert out.per_function["raises_on_bad"] == [6.0, None, 8.0, 7.0]
        assert out.per_function["tag_count"] == [0.0] * 4
        m = out.metrics
        assert m["rewards/sleeps_forever/error_count"] == 4 and "timed out after 0.5 s" in m["rewards/sleeps_forever/first_error"]
        assert m["rewards/raises/error_count"] == 4 and m["rewards/raises/first_error"] == "RuntimeError: boom"
        assert m["rewards/raises_on_bad/error_count"] == 1
        assert m["rewards/raises_on_bad/first_error"].startswith("ValueError: cannot score 'a bad one'")
        assert m["rewards/raises_on_bad/mean"] == pytest.approx(7.0)
        assert "rewards/tag_count/first_error" not in m
        assert out.totals == [0.0 + 6.0, 0.0, 8.0, 7.0]  # none_policy "zero"
        # the killed worker was replaced: the runner still works
        out2 = runner(["p"], ["ok"])
        assert out2.per_function["raises_on_bad"] == [2.0]
        assert out2.per_function["sleeps_forever"] == [None]
    assert first_call_s < 30  # a hang costs its timeout, not the run


def test_invalid_return_values_become_none_with_a_message(bad_file):
    with RewardRunner([spec(bad_file, "junk", isolation="inline"), spec(bad_file, "wrong_length", isolation="inline")]) as runner:
        out = runner(["p"] * 4, COMPLETIONS)
    assert out.per_function["junk"] == [1.0, None, None, None]
    assert out.metrics["rewards/junk/error_count"] == 2  # the reward's own None is not an error
    assert out.metrics["rewards/junk/none_count"] == 3
    assert "'high'" in out.metrics["rewards/junk/first_error"]
    # 1 value for 4 completions: retried per sample, where one value is right
    assert out.per_function["wrong_length"] == [1.0] * 4
    assert "returned 1 values for 4 completions" in out.metrics["rewards/wrong_length/first_error"]


def test_inline_exception_is_isolated_per_sample(bad_file):
    with RewardRunner([spec(bad_file, "raises_on_bad", isolation="inline")]) as runner:
        out = runner(["p"] * 4, COMPLETIONS)
    assert out.per_function["raises_on_bad"] == [6.0, None, 8.0, 7.0]
    assert out.metrics["rewards/raises_on_bad/error_count"] == 1


def test_drop_group_policy(bad_file):
    specs = [spec(bad_file, "raises_on_bad", isolation="inline"), spec(bad_file, "constant", isolation="inline", weight=0.5)]
    with RewardRunner(specs, none_policy="drop_group") as runner:
        out = runner(["p"] * 4, COMPLETIONS, group_size=2)
    assert out.keep == [False, False, True, True]
    assert out.totals == [None, None, 8.5, 7.5]
    assert out.metrics["rewards/dropped_samples"] == 2
    assert out.metrics["rewards/total/mean"] == pytest.approx(8.0)


def test_combine_rewards_against_hand_sums():
    per = {"a": [1.0, None, 0.0, 1.0], "b": [0.5, 0.5, None, 0.0]}
    w = {"a": 2.0, "b": -1.0}
    totals, keep = combine_rewards(per, w, "zero", group_size=2)
    assert totals == [1.5, -0.5, 0.0, 2.0] and keep == [True] * 4
    totals, keep = combine_rewards(per, w, "drop_group", group_size=2)
    assert totals == [None] * 4 and keep == [False] * 4
    totals, keep = combine_rewards(per, w, "drop_group", group_size=1)
    assert totals == [1.5, None, None, 2.0] and keep == [True, False, False, True]
    with pytest.raises(ValueError, match="group_size=3"):
        combine_rewards(per, w, "zero", group_size=3)
    with pytest.raises(ValueError, match="none_policy"):
        combine_rewards(per, w, "ignore")


def test_column_length_mismatch_names_the_column():
    with pytest.raises(ValueError, match="column 'solution' has 1 values for 2"):
        RewardRunner(["accuracy"])(["p", "p"], ["a", "b"], solution=["1"])
