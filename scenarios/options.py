"""Command-line flags and scenario-file keys, generated from the config dataclasses' fields: a new option is one field.

    Table("llm", LLMAgentConfig, prefix="llm_")   field `answer_mode: str = "free"` + its docstring
        -> flag  --llm_answer_mode ANSWER_MODE    help: the docstring, then "(default: free)"
        -> key   [llm] answer_mode = "mask"       in a scenario file

A field's help is the string literal that follows it (an attribute docstring), or else its trailing `# comment`.
Values are checked by the dataclass itself (`__post_init__`), so a bad value gets the same message from a flag and
from a scenario file. Nested configs (`LLMAgentConfig.ppo`, ...) are tables of their own; `skip` lists the fields
that are not options (derived from others, or set per agent).
"""

from __future__ import annotations

import argparse
import ast
import inspect
import io
import textwrap
import tokenize
import types
import typing
from collections.abc import Callable, Iterable, Mapping
from dataclasses import MISSING, Field, dataclass, field, fields
from functools import cache
from typing import Any

from simulator.errors import ConfigError, closest


@dataclass(frozen=True)
class Table:
    """One config dataclass: its scenario table, its flag prefix and its --help group."""

    key: str  # scenario table: "run", "llm", "llm.actors", ...
    cls: type
    prefix: str  # flag prefix: --<prefix><field>
    title: str  # --help group title
    skip: frozenset[str] = frozenset()  # fields that are not options
    flags_only: bool = False  # no scenario table (how to launch, not what to run)
    special: Mapping[str, Mapping[str, Any]] = field(default_factory=dict)  # per-field add_argument overrides

    def options(self) -> list[Field[Any]]:
        return [f for f in fields(self.cls) if f.init and f.name not in self.skip and not _is_config(f)]

    def flag(self, name: str) -> str:
        return f"--{self.prefix}{name}"

    def dest(self, name: str) -> str:
        return f"{self.key}:{name}"


def _is_config(f: Field[Any]) -> bool:
    """A nested config dataclass (it is a table of its own)."""
    return f.default_factory is not MISSING and inspect.isclass(f.default_factory) and hasattr(
        f.default_factory, "__dataclass_fields__")


@cache
def field_docs(cls: type) -> dict[str, str]:
    """Each field's attribute docstring, else its trailing comment, as one line of help text."""
    source = textwrap.dedent(inspect.getsource(cls))
    comments = {tok.start[0]: tok.string.lstrip("# ").strip()
                for tok in tokenize.generate_tokens(io.StringIO(source).readline) if tok.type == tokenize.COMMENT}
    body = ast.parse(source).body[0]
    assert isinstance(body, ast.ClassDef)
    docs: dict[str, str] = {}
    for stmt, nxt in zip(body.body, [*body.body[1:], None], strict=True):
        if not (isinstance(stmt, ast.AnnAssign) and isinstance(stmt.target, ast.Name)):
            continue
        name = stmt.target.id
        if isinstance(nxt, ast.Expr) and isinstance(nxt.value, ast.Constant) and isinstance(nxt.value.value, str):
            docs[name] = " ".join(nxt.value.value.split())
        elif stmt.end_lineno in comments:
            docs[name] = comments[stmt.end_lineno]
    return docs


@cache
def _hints(cls: type) -> dict[str, Any]:
    return typing.get_type_hints(cls)


def _base(hint: Any) -> tuple[Any, bool]:
    """(the type, whether None is allowed) of X or X | None."""
    if isinstance(hint, types.UnionType) or typing.get_origin(hint) is typing.Union:
        args = [a for a in typing.get_args(hint) if a is not type(None)]
        return (args[0] if len(args) == 1 else str), type(None) in typing.get_args(hint)
    return hint, False


def _converter(kind: Any, optional: bool, label: str) -> Callable[[str], Any]:
    def convert(text: str) -> Any:
        if optional and text.lower() == "none":
            return None
        try:
            return kind(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{label}: expected {kind.__name__}, got {text!r}") from None

    convert.__name__ = kind.__name__ if isinstance(kind, type) else "value"
    return convert


def add_table(parser: argparse.ArgumentParser, table: Table) -> None:
    """One --help group with a flag per option of the table's dataclass."""
    group = parser.add_argument_group(table.title)
    docs = field_docs(table.cls)
    for f in table.options():
        special = dict(table.special.get(f.name, {}))
        names = [table.flag(f.name), *special.pop("aliases", ())]
        default = f.default if f.default is not MISSING else (
            f.default_factory() if f.default_factory is not MISSING else None)
        shown = special.pop("default_text", default)
        doc = docs.get(f.name, "")
        kind, optional = _base(_hints(table.cls)[f.name])
        kw: dict[str, Any] = {"dest": table.dest(f.name), "default": argparse.SUPPRESS}
        if kind is bool and not optional:
            kw["action"] = "store_true" if table.flags_only else argparse.BooleanOptionalAction
        else:
            kw["type"] = _converter(kind, optional, table.flag(f.name))
            kw["metavar"] = f.name.upper()
        kw.update(special)
        if "choices" in kw:  # argparse shows them in place of the metavar
            kw.pop("metavar", None)
        if "(default" in doc or "default:" in doc:  # the docstring says it already
            kw["help"] = doc
        else:
            kw["help"] = f"{doc} (default: {shown})" if doc else f"(default: {shown})"
        group.add_argument(*names, **kw)


def given(namespace: argparse.Namespace, table: Table) -> dict[str, Any]:
    """The table's options given on the command line (flags not given are absent: their default is SUPPRESS)."""
    prefix = f"{table.key}:"
    return {k[len(prefix):]: v for k, v in vars(namespace).items() if k.startswith(prefix)}


def check_keys(where: str, table: Table, values: Mapping[str, Any], nested: Iterable[str] = ()) -> None:
    """ConfigError for a key the table does not take, with the closest valid key and the list of valid ones."""
    valid = sorted([f.name for f in table.options()] + list(nested))
    for key in values:
        if key not in valid:
            hint = closest(key, valid)
            raise ConfigError(f"{where}: unknown key {key!r} in [{table.key}]"
                              + (f"; did you mean {hint!r}?" if hint else "") + f" Valid: {', '.join(valid)}")
