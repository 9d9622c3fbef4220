import math
import sys
import textwrap
import types

import numpy as np
import pytest

from mlxrl.errors import RewardError
from mlxrl.rewards import get_reward, load_rewards, register
from mlxrl.tasks.letter_count import count_letters, letter_count

# (completion, target, count_letters value (Oumi), letter_count value (walkthrough))
CASES = [
    ("The answer is \\boxed{3}.", 3, 0.0, 1.0),
    ("\\boxed{+1}", 1, 0.0, 1.0),
    ("\\boxed{2}", 3, 1 / 1.5 - 2, 0.0),  # off by one: -1.3333
    ("\\boxed{-1}", 1, 1 / 2.5 - 2, 0.0),  # off by two: -1.6
    ("\\boxed{10}", 3, 1 / 7.5 - 2, 0.0),  # off by seven: -1.8667
    ("\\boxed{0}", 0, 0.0, 1.0),
    ("\\boxed{2} or maybe \\boxed{3}", 3, -3.0, 0.0),  # two boxed answers that disagree
    ("\\boxed{3} so \\boxed{3}", 3, -3.0, 0.5),  # two boxed answers, both right
    ("There are 3 r's in strawberry.", 3, -3.0, 0.5),  # no box, right number
    ("There are two r's.", 3, -3.0, 0.0),  # no box, wrong number
    ("strawberry has ten letters and three r's", 3, -3.0, 0.5),  # last number counts
    ("I count 1, 2, 3, 4", 3, -3.0, 0.0),  # listing numbers earns nothing
    ("\\boxed{three}", 3, -3.0, 0.5),  # words instead of digits
    ("\\boxed{four}", 3, -3.0, 0.0),
    ("no idea", 3, -3.0, 0.0),
    ("", 0, -3.0, 0.0),
]


@pytest.mark.parametrize("text,target,oumi,walk", CASES)
def test_builtin_values(text, target, oumi, walk):
    conversational = [[{"role": "assistant", "content": text}]]
    assert count_letters(conversational, [target]) == [pytest.approx(oumi)]
    assert count_letters([text], [target]) == [pytest.approx(oumi)]
    assert letter_count(conversational, letter_count=[target]) == [walk]
    assert letter_count([text], letter_count=[target]) == [walk]


def test_oumi_table():
    off = [0, 1, 2, 3, 7]
    got = count_letters([f"\\boxed{{{5 + d}}}" for d in off], [5] * len(off))
    assert got == pytest.approx([0.0, -1.3333333, -1.6, -1.7142857, -1.8666667])


def test_count_letters_compares_the_target_as_given():
    """Oumi's `abs(count - target_count)` on the row's value: no int() cast (oumi-compat.md 4)."""
    assert count_letters(["\\boxed{2}"], [2.5]) == [pytest.approx(1 / (0.5 + 0.5) - 2)]  # -1.0, not 0.0
    assert count_letters(["\\boxed{3}"], [2.75]) == [pytest.approx(1 / 0.75 - 2)]
    rs = load_rewards(["count_letters"])
    with pytest.raises(RewardError, match="count_letters"):  # Oumi raises on a string count too
        _score(rs, ["\\boxed{3}"], letter_count=["3"])


def test_letter_count_transform_keeps_the_metadata_value():
    from mlxrl.tasks.letter_count import transform

    raw = {"messages": [{"role": "user", "content": "q"}],
           "metadata": {"letter_count_integer": 2.5}}
    assert transform(raw)["letter_count"] == 2.5


def _score(rs, texts, **columns):
    n = len(texts)
    return rs.score(["p"] * n, texts, [[1]] * n, columns)


def test_score_shape_names_and_total():
    rs = load_rewards(["count_letters", "letter_count"], weights=[1.0, 2.0])
    assert rs.names == ["count_letters", "letter_count"]
    scores = _score(rs, ["\\boxed{3}", "\\boxed{2}"], letter_count=[3, 3])
    assert scores.shape == (2, 2)
    np.testing.assert_allclose(rs.total(scores), [2.0, 1 / 1.5 - 2])


def test_none_is_nan_and_all_nan_total_is_nan():
    @register("_test_sometimes_none")
    def sometimes(completions, **kwargs):
        return [None, 1.0]

    rs = load_rewards(["_test_sometimes_none", "_test_sometimes_none"])
    scores = _score(rs, ["a", "b"])
    assert math.isnan(scores[0, 0])
    total = rs.total(scores)
    assert math.isnan(total[0]) and total[1] == 2.0
    assert rs.names == ["_test_sometimes_none"] * 2


def test_user_function_from_file(tmp_path, monkeypatch):
    path = tmp_path / "my_rewards.py"
    path.write_text(textwrap.dedent("""
        def length_reward(completions, scale=1.0, **kwargs):
            return [scale * len(c) for c in completions]

        def needs_answer(prompts, completions, answer):
            return [float(c == a) for c, a in zip(completions, answer)]
    """))
    rs = load_rewards([f"{path}:length_reward"], kwargs={f"{path}:length_reward": {"scale": 2}})
    assert rs.names == ["length_reward"]
    np.testing.assert_allclose(_score(rs, ["ab", "abc"], other=[1, 2])[:, 0], [4.0, 6.0])
    # relative to base_dir (the config's folder); columns it does not declare are not passed
    monkeypatch.chdir("/")
    rs = load_rewards(["my_rewards.py:needs_answer"], base_dir=tmp_path)
    scores = _score(rs, ["x", "y"], answer=["x", "z"], letter_count=[1, 2])
    np.testing.assert_allclose(scores[:, 0], [1.0, 0.0])


def test_user_function_from_module(monkeypatch):
    module = types.ModuleType("_mlxrl_test_reward_mod")
    module.const = lambda completions, **kw: [0.25] * len(completions)
    monkeypatch.setitem(sys.modules, "_mlxrl_test_reward_mod", module)
    for name in ["_mlxrl_test_reward_mod:const", "_mlxrl_test_reward_mod.const"]:
        rs = load_rewards([name])
        np.testing.assert_allclose(_score(rs, ["a", "b"])[:, 0], [0.25, 0.25])


def test_configured_kwargs_override_columns():
    @register("_test_echo")
    def echo(completions, value, **kwargs):
        return [float(v) for v in value]

    rs = load_rewards(["_test_echo"], kwargs={"_test_echo": {"value": [7, 7]}})
    np.testing.assert_allclose(_score(rs, ["a", "b"], value=[1, 2])[:, 0], [7, 7])


@pytest.mark.parametrize(
    "body,message",
    [
        ("raise ValueError('boom')", "'bad_fn' raised ValueError: boom"),
        ("return [1.0]", "'bad_fn' returned 1 values for 2 completions"),
        ("return ['high', 'low']", "'bad_fn' returned 'high'"),
        ("return 1.0", "'bad_fn' returned float"),
    ],
)
def test_bad_functions_raise_naming_them(tmp_path, body, message):
    path = tmp_path / "bad.py"
    path.write_text(f"def bad_fn(completions, **kwargs):\n    {body}\n")
    rs = load_rewards([f"{path}:bad_fn"])
    with pytest.raises(RewardError, match=message.replace("[", r"\[")):
        _score(rs, ["a", "b"])


def test_unknown_names_and_bad_kwargs(tmp_path):
    with pytest.raises(RewardError, match="unknown reward function 'nope'.*count_letters"):
        load_rewards(["nope"])
    with pytest.raises(RewardError, match="reward file not found"):
        get_reward(f"{tmp_path}/missing.py:f")
    (tmp_path / "r.py").write_text("x = 1\n")
    with pytest.raises(RewardError, match="'g' not found"):
        get_reward(f"{tmp_path}/r.py:g")
    with pytest.raises(RewardError, match="cannot import reward module"):
        get_reward("no_such_module_xyz:f")
    with pytest.raises(RewardError, match="'gsm8k', which is not in reward_functions"):
        load_rewards(["count_letters"], kwargs={"gsm8k": {"strict": True}})
    with pytest.raises(RewardError, match="must be a mapping"):
        load_rewards(["count_letters"], kwargs={"count_letters": 3})
    with pytest.raises(RewardError, match="2 reward weights for 1"):
        load_rewards(["count_letters"], weights=[1, 2])
