"""Rewards: accuracy + strict format, one case per known reward hack, combination, loading."""
import pytest

from nanoseek.tasks import ArithmeticTask, CountdownTask
from nanoseek.tasks.arithmetic import make_problem
from nanoseek.tasks.rewards import (accuracy_reward, format_reward, load_reward, weighted,
                                    well_formed)

P = make_problem([37, 45], ["+"])  # answer 82

# (completion, format reward, accuracy reward) — chat mode, answer_tags=None (either form)
CASES = [
    ("<think>\n7+5=12 carry 1. 3+4+1=8.\n</think>\n82<|eos|>", 1, 1),        # the agreed form
    ("<think>r</think> <answer>82</answer>", 1, 1),                         # R1-Zero form
    ("<think>r</think>81", 1, 0),                                           # well formed, wrong
    ("<think></think>82", 0, 1),                                            # hack: empty thought
    ("<think>  \n </think>82", 0, 1),                                       # hack: blank thought
    ("<think>r</think><answer></answer>", 0, 0),                            # hack: empty answer
    ("<think>r</think>", 0, 0),                                             # no answer at all
    ("<think>a</think><think>b</think>82", 0, 1),                           # hack: repeated tags
    ("<think>r</think><answer>82</answer><answer>83</answer>", 0, 0),       # hack: hedged answers
    ("<think>r</think>82 and some chatter", 0, 0),                          # text after the answer
    ("<think>r</think><answer>82</answer> trailing", 0, 1),                 # answer outside tags end
    ("<think>the answer is 82</think>", 0, 0),                              # answer in think only
    ("<think>r <answer>82</answer></think>", 0, 0),                         # answer tag in think
    ("82", 0, 1),                                                           # no thought at all
    ("so 82 <think>r</think>82", 0, 1),                                     # text before <think>
    ("<think>r</think>82<|user|>more", 0, 0),                               # runs into next turn
    ("<think>r</think>82<|eos|><think>x</think>9", 1, 1),                   # after eos is ignored
    ("<think>r</think>82<|pad|><|pad|>", 1, 1),
]


@pytest.mark.parametrize("completion,fmt,acc", CASES)
def test_each_hack_gets_what_it_deserves(completion, fmt, acc):
    assert format_reward([completion], [P]) == [float(fmt)]
    assert accuracy_reward([completion], [P]) == [float(acc)]


def test_template_that_preopens_think():
    # prompt ended with '<think>', so the completion starts inside the thought
    good = "7+5=12 carry 1. 3+4+1=8.\n</think>\n82"
    assert well_formed(good, think_preopened=True) and not well_formed(good)
    assert accuracy_reward([good], [P], think_preopened=True) == [1.0]
    assert not well_formed("<think>r</think>82", think_preopened=True)   # opened twice
    assert not well_formed("</think>82", think_preopened=True)            # empty thought
    assert not well_formed("r</think>8</think>82", think_preopened=True)  # closed twice
    assert accuracy_reward(["82"], [P], think_preopened=True) == [0.0]    # never left the thought


def test_answer_tags_mode():
    tagged, bare = "<think>r</think><answer>82</answer>", "<think>r</think>82"
    assert format_reward([tagged, bare], answer_tags=True) == [1.0, 0.0]
    assert format_reward([tagged, bare], answer_tags=False) == [0.0, 1.0]


def test_accuracy_countdown_verifies_not_compares():
    p = CountdownTask().make(1, seed=0)[0]
    nums, target = p.meta["numbers"], p.meta["target"]
    right = f"<think>r</think><answer>{p.answer}</answer>"
    cheat = f"<think>r</think><answer>{target}</answer>"  # the target as a literal
    assert accuracy_reward([right, cheat], [p, p]) == [1.0, float(target in nums)]


def test_weighted_combination():
    combined = weighted({"accuracy": (accuracy_reward, 1.0), "format": (format_reward, 0.5)})
    comps = ["<think>r</think>82", "<think></think>82", "<think>r</think>80"]
    total, parts = combined(comps, [P] * 3)
    # 1*1 + 0.5*1 = 1.5 ; 1*1 + 0.5*0 = 1.0 ; 1*0 + 0.5*1 = 0.5
    assert total == [1.5, 1.0, 0.5]
    assert parts == {"accuracy": [1.0, 1.0, 0.0], "format": [1.0, 0.0, 1.0]}
    bad = weighted({"short": (lambda c, p, **k: [1.0], 1.0)})
    with pytest.raises(ValueError, match="short"):
        bad(comps, [P] * 3)


def test_load_reward():
    assert load_reward("accuracy") is accuracy_reward
    assert load_reward("nanoseek.tasks.rewards:format_reward") is format_reward
    with pytest.raises(ValueError, match="pkg.module:function"):
        load_reward("no_colon_here")
    with pytest.raises(ImportError, match="no_such_mod"):
        load_reward("no_such_mod:fn")
    with pytest.raises(AttributeError, match="nope"):
        load_reward("nanoseek.tasks.rewards:nope")
    with pytest.raises(TypeError, match="not callable"):
        load_reward("nanoseek.tasks.rewards:BUILTIN")


def test_length_mismatch_is_clear():
    with pytest.raises(ValueError, match="repeat each problem"):
        accuracy_reward(["a", "b"], [P])
    assert ArithmeticTask().name == "arithmetic"
