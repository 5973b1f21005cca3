"""Tasks: worked traces, reproducible disjoint splits, safe countdown verifier, GSM8K loader,
the pretraining corpus and the chat/R1-Zero texts."""
import itertools
import json

import pytest

from nanoseek.tasks import (ArithmeticTask, CountdownTask, GSM8KTask, builtin_corpus,
                            cold_start_sft, get_task, parse_pretrain_answer, pretrain_prompt,
                            r1_zero_prompt)
from nanoseek.tasks.arithmetic import add_trace, make_problem, mul_trace, sub_trace, usable
from nanoseek.tasks.base import extract_answer, heldout, normalize_number
from nanoseek.tasks.countdown import safe_eval, verify


# ---- arithmetic traces ------------------------------------------------------------------

def test_column_traces_by_hand():
    # 37+45: what is left of the operands, the column, the answer so far; 7+5=12 → 2 carry 1
    assert add_trace(37, 45) == "37+45: 7+5=12, 2 carry 1. 3+4: 3+4+1=8, 82. 37+45=82."
    # 95+17: the last column's carry becomes the leading digit, so it is not named
    assert add_trace(95, 17) == "95+17: 5+7=12, 2 carry 1. 9+1: 9+1+1=11, 112. 95+17=112."
    # an exhausted operand is restated as 0; a zero column digit stays in the answer so far
    assert add_trace(123, 45) == "123+45: 3+5=8, 8. 12+4: 2+4=6, 68. 1+0: 1+0=1, 168. 123+45=168."
    assert add_trace(999, 1) == ("999+1: 9+1=10, 0 carry 1. 99+0: 9+0+1=10, 00 carry 1. "
                                 "9+0: 9+0+1=10, 1000. 999+1=1000.")
    assert add_trace(6, 2) == "6+2=8."
    # 52-17: 2<7 so borrow: 12-7=5; 5-1-1=3 → 35
    assert sub_trace(52, 17) == "2-7+10=5 borrow 1. 5-1-1=3. 52-17=35."
    assert sub_trace(105, 98) == "5-8+10=7 borrow 1. 0-9-1+10=0 borrow 1. 1-0-1=0. 105-98=7."
    assert mul_trace(37, 4)[0] == "7*4=28 carry 2. 3*4+2=14. 37*4=148."
    text, steps = mul_trace(37, 45)  # 37*5=185, 37*40=1480, 185+1480=1665
    assert text.startswith("37*5=185. 37*40=1480. ") and text.endswith("1665. 185+1480=1665. 37*45=1665.")
    assert (185, "+", 1480) in steps


def test_chain_uses_precedence_and_one_line_per_step():
    p = make_problem([12, 34, 5], ["+", "*"])  # 34*5=170 first, then 12+170=182
    assert p.answer == "182" and p.prompt == "What is 12+34*5?"
    lines = p.solution.split("\n")
    assert lines[0].endswith("34*5=170.") and lines[1].endswith("12+170=182.")
    assert make_problem([3, 5, 1], ["-", "+"]) is None  # 3-5 would go negative


@pytest.mark.parametrize("knobs", [dict(digits=2, ops="+"), dict(digits=3, ops="+-*", chain=3)])
def test_arithmetic_splits_reproducible_disjoint_and_correct(knobs):
    t = ArithmeticTask(**knobs)
    train, test = t.make(200, seed=1), t.make(40, seed=1, split="test")
    assert train == t.make(200, seed=1) and train != t.make(200, seed=2)
    assert not {p.meta["expr"] for p in train} & {p.meta["expr"] for p in test}
    assert all(heldout(p.meta["key"]) for p in test) and not any(heldout(p.meta["key"]) for p in train)
    for p in train + test:
        assert int(p.answer) == eval(p.meta["expr"])  # test-only cross-check of the generator
        assert t.check(t.parse(f"<think>\n{p.solution}\n</think>\n{p.answer}<|eos|>"), p)


def test_arithmetic_too_small_space_is_a_clear_error():
    with pytest.raises(ValueError, match="too small"):
        ArithmeticTask(digits=1, ops="+").make(30, seed=0, split="test")


def test_arithmetic_parse_is_strict():
    t = ArithmeticTask()
    assert t.parse("<think>x</think> 82.") == "82"
    assert t.parse("<think>x</think>1,234") == "1234"
    assert t.parse("<think>x</think>81 or 82") is None
    assert t.parse("<think>x</think>12.5") is None


# ---- pretraining corpus -----------------------------------------------------------------

def test_corpus_format_and_heldout_never_leaks():
    assert all(d.startswith("Q: ") for d in builtin_corpus("arith", 100, seed=0))  # default: no chat
    docs = list(builtin_corpus("arith", 300, seed=0, chat=0.3))
    assert len(docs) == 300 and docs[:3] == list(builtin_corpus("arith", 3, seed=0, chat=0.3))
    test = ArithmeticTask(digits=2, ops="+").make(60, seed=0, split="test")
    test_q = {f"Q: {p.meta['expr']}\n" for p in test}
    qa = [d for d in docs if d.startswith("Q: ")]
    chats = [d for d in docs if d.startswith("User: ")]
    assert len(qa) + len(chats) == 300 and 60 <= len(chats) <= 120  # CHAT_DOC_FRACTION = 0.3
    blocks = [b for d in qa for b in d.split("\n\n")]
    assert 4 * len(qa) <= len(blocks) <= 8 * len(qa)
    for b in blocks:
        q, a = b.split("\nA: ", 1)
        assert q + "\n" not in test_q
        assert parse_pretrain_answer(a) == str(eval(q[3:]))  # answer after '####' is right
    # the eval prompt is exactly a corpus prefix, and its parser reads the corpus format
    p = make_problem([37, 45], ["+"])
    assert pretrain_prompt(p) == "Q: 37+45\nA:"
    assert parse_pretrain_answer(" 7+5=12 carry 1. 3+4+1=8. 37+45=82.\n#### 82\nQ: 1+1") == "82"
    assert parse_pretrain_answer(" 7+5=12 carry") is None
    # one-exchange chat documents: a few in the R1-Zero tag form, the rest plain; all correct
    tagged = [c for c in chats if "<think>" in c]
    assert 1 <= len(tagged) < len(chats) / 3
    for c in chats:
        q, a = c.removeprefix("User: What is ").split("?\nAssistant: ")
        assert f"Q: {q}\n" not in test_q
        if c in tagged:
            assert a.startswith("<think> ") and a.endswith(f"</think> <answer> {eval(q)} </answer>")
        else:
            assert parse_pretrain_answer(a) == str(eval(q))


def test_corpus_is_an_endless_stream_and_rejects_unknown_names():
    it = builtin_corpus("arith", None, seed=3)
    assert len(list(itertools.islice(it, 50))) == 50
    with pytest.raises(ValueError, match="arith"):
        builtin_corpus("nope", 1, 0)
    with pytest.raises(ValueError, match=r"no parameter.*'k'.*known: n, seed, chat, tagged"):
        builtin_corpus("arith", 1, 0, k=1)
    with pytest.raises(ValueError, match="fractions"):
        next(builtin_corpus("arith", 1, 0, chat=2))


def test_train_problems_never_state_a_heldout_step():
    for p in ArithmeticTask(digits=2, ops="+-", chain=3).make(100, seed=0):
        assert usable(p, "train") and not any(heldout(k) for k in p.meta["step_keys"])


# ---- countdown ----------------------------------------------------------------------------

def test_countdown_verifier_by_hand():
    assert verify("(25-5)*4+3", [25, 5, 4, 3], 83)   # 20*4+3 = 83
    assert verify("6/4*2", [6, 4, 2], 3)              # exact fractions: 3/2*2 = 3
    assert not verify("5+5", [5, 3], 10)              # 5 used twice
    assert not verify("-5+15", [5, 15], 10)           # unary minus is not allowed
    assert not verify("5/0", [5, 0], 1)
    assert not verify("2**3", [2, 3], 8)
    assert not verify("__import__('os').system('x')", [1], 1)
    assert not verify("1.5*2", [2], 3)
    assert not verify("(" * 150 + "1" + ")" * 150, [1], 1)
    assert safe_eval("7*(2+1)")[1] == [7, 2, 1]


def test_countdown_problems_are_solvable_and_split():
    t = CountdownTask()
    train, test = t.make(100, seed=0), t.make(20, seed=0, split="test")
    assert not {p.meta["key"] for p in train} & {p.meta["key"] for p in test}
    for p in train + test:
        assert t.check(p.answer, p), p
        assert p.solution.endswith(f"So {p.answer}={p.meta['target']}.")
    p = train[0]
    assert t.parse(f"<think>r</think><answer>{p.answer} = {p.meta['target']}</answer>") == p.answer


# ---- gsm8k --------------------------------------------------------------------------------

def test_gsm8k_loader(tmp_path):
    f = tmp_path / "g.jsonl"
    recs = [{"question": f"Q{i}: how many?", "answer": f"It is <<2*3=6>>6.\n#### ${i},000"}
            for i in range(1, 41)]
    f.write_text("\n".join(json.dumps(r) for r in recs) + "\n")
    t = GSM8KTask(path=str(f))
    train, test = t.make(None, 0), t.make(None, 0, split="test")
    assert len(train) + len(test) == 40 and not {p.prompt for p in train} & {p.prompt for p in test}
    p = next(p for p in train + test if p.prompt == "Q3: how many?")
    assert p.answer == "3000" and p.solution == "It is 6."
    assert t.check(t.parse("<think>r</think>3,000"), p) and not t.check(t.parse("<think>r</think>30"), p)
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"question": "q", "answer": "no final"}\n')
    with pytest.raises(ValueError, match=r"bad.jsonl:1: .*####"):
        GSM8KTask(path=str(bad)).make(None, 0)


def test_normalize_number():
    assert normalize_number("$1,234.50") == "1234.5"
    assert normalize_number(" -7. ") == "-7"
    assert normalize_number("18.00") == "18"
    assert normalize_number("about 5") is None


# ---- chat texts ---------------------------------------------------------------------------

def test_cold_start_sft_and_r1_zero_prompt():
    ex = cold_start_sft(ArithmeticTask(), 5, seed=0)
    assert len(ex) == 5
    user, asst = ex[0]["messages"]
    assert user["role"] == "user" and user["content"].startswith("What is ")
    assert asst["role"] == "assistant" and asst["content"] == str(eval(user["content"][8:-1]))
    assert asst["reasoning_content"].endswith(f"={asst['content']}.")
    p = make_problem([2, 3], ["+"])
    prompt = r1_zero_prompt(p)
    assert "What is 2+3?" in prompt and prompt.endswith("Assistant:")
    assert "<think>" in prompt and "<answer>" in prompt
    assert r1_zero_prompt(p, open_think=True).endswith("Assistant: <think>")


def test_extract_answer_contract():
    assert extract_answer("<think>a</think>\n82<|eos|>junk") == "82"
    assert extract_answer("<think>a</think><answer> 7 </answer><|pad|><|pad|>") == "7"
    assert extract_answer("<think>a <answer>7</answer></think>") is None       # only in the thought
    assert extract_answer("<think>still thinking 7") is None
    assert extract_answer("reasoning 7</think>8", think_preopened=True) == "8"
    assert extract_answer("7", think_preopened=True) is None
    assert extract_answer("82") == "82"                                          # no tags at all
    assert extract_answer("</think><answer>1</answer><answer>2</answer>") is None  # hedging
    assert get_task("countdown").name == "countdown"


# ---- properties ---------------------------------------------------------------------------

from hypothesis import given, settings, strategies as st  # noqa: E402

_FACT = __import__("re").compile(r"([\d+\-*/() ]+)=(\d+)")


def _all_facts_true(trace: str) -> bool:
    """Every 'lhs=n' a trace states is arithmetically true (test-only eval of our own text)."""
    facts = _FACT.findall(trace)
    return bool(facts) and all(eval(lhs) == int(rhs) for lhs, rhs in facts)


@settings(max_examples=150, deadline=None)
@given(st.integers(0, 99999), st.integers(0, 99999), st.sampled_from("+-*"))
def test_every_stated_step_is_true(a, b, op):
    if op == "-" and a < b:
        a, b = b, a
    p = make_problem([a, b], [op])
    assert int(p.answer) == eval(f"{a}{op}{b}") and _all_facts_true(p.solution)


@settings(max_examples=200, deadline=None)
@given(st.text(alphabet="0123456789+-*/() x_.", max_size=40))
def test_countdown_verifier_never_raises(text):
    assert verify(text, [1, 2, 3, 4], 6) in (True, False)


def test_countdown_traces_are_true():
    for p in CountdownTask().make(50, seed=5):
        assert _all_facts_true(p.solution.split(". ", 1)[1])
