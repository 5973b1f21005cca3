"""Constrained output for the API: ``response_format`` and forced tool calls as grammars for the
engine's allowed-token mask (nanoseek/engine/constraints.py).

Every grammar is one Lark text for llguidance: JSON schemas are embedded with ``%json``, written
compactly (``constraints.json_rule``: no free whitespace, which a sampler at temperature 1 would
otherwise wander through), and special tokens are named by id. When the generation starts inside ``<think>`` (a
reasoner), the grammar lets the reasoning run free up to ``</think>\\n`` and constrains what follows.
"""

from __future__ import annotations

import json

from ..engine.constraints import Grammar, json_rule
from ..tokenizer import TOOL_CALL_BEGIN, TOOL_CALL_END, TOOL_CALLS_BEGIN, TOOL_CALLS_END, TOOL_SEP

ANY_OBJECT = {"type": "object"}


def grammar(engine, body: str, in_think: bool) -> Grammar:
    """A grammar whose ``start`` is ``body`` (Lark), after free reasoning when ``in_think``."""
    tok = engine.tokenizer
    head = f'start: /(?s:.*)/ <[{tok.end_think_id}]> "\\n" body\n' if in_think else "start: body\n"
    return Grammar.lark(tok, engine.config.vocab_size, head + "body: " + body)


def response_format_grammar(engine, response_format, in_think: bool) -> Grammar | None:
    """``{"type": "json_object"}`` → any JSON object; ``{"type": "json_schema", ...}`` → JSON
    valid under its schema (enforced whether ``strict`` is set or not); text → None.
    A schema llguidance cannot compile is a ValueError naming the reason."""
    if response_format is None or response_format.type == "text":
        return None
    schema = ANY_OBJECT
    if response_format.type == "json_schema":
        schema = response_format.json_schema.schema_ or ANY_OBJECT
    return grammar(engine, json_rule(schema), in_think)


def tool_call_grammar(engine, tools: list, in_think: bool) -> Grammar:
    """One call of one of ``tools`` in DeepSeek-V3's format (nanoseek/tokenizer.py), its arguments
    valid under that function's ``parameters`` schema (an object, when it has none):
    <｜tool▁calls▁begin｜><｜tool▁call▁begin｜>function<｜tool▁sep｜>NAME\\n```json\\nARGS\\n```<｜tool▁call▁end｜><｜tool▁calls▁end｜>"""
    ids = {t: f"<[{i}]>" for t, i in engine.tokenizer.tool_ids.items()}
    calls = " | ".join(f'{json.dumps(t.function.name + chr(10) + "```json" + chr(10), ensure_ascii=False)} '
                       f'{json_rule(t.function.parameters or ANY_OBJECT)} "\\n```"' for t in tools)
    body = (f'{ids[TOOL_CALLS_BEGIN]} {ids[TOOL_CALL_BEGIN]} "function" {ids[TOOL_SEP]} call '
            f'{ids[TOOL_CALL_END]} {ids[TOOL_CALLS_END]}\ncall: {calls}\n')
    return grammar(engine, body, in_think)
