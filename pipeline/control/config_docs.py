"""docs/config.md, generated from the experiment config's pydantic models (`pipeline.control.config`).

Every key of `ExperimentConfig` and of the models nested in it gets one row: its dotted path, its type (with the
bounds validation enforces), its default and its meaning. The meaning is the field's `description=`, else the
docstring written under the field (an attribute docstring, read from the source with `ast` so that importing the
config stays as cheap as before), else the row says it is undocumented. Nested models are listed after their parent,
each with its class docstring; a key holding a map of models shows `<name>` in its path, a list of them `[]`.

    python -m pipeline.control.config_docs            # print the Markdown
    python -m pipeline.control.config_docs --write    # rewrite docs/config.md (tests/test_config_docs.py checks it)
"""

from __future__ import annotations

import ast
import inspect
import json
import sys
import textwrap
import types
from collections.abc import Iterator
from functools import cache
from typing import Annotated, Any, Literal, Union, get_args, get_origin

import annotated_types
from pydantic import BaseModel
from pydantic.fields import FieldInfo
from pydantic_core import PydanticUndefined

from pipeline.control.config import PACKAGE_ROOT, ExperimentConfig

DOC_PATH = PACKAGE_ROOT / "docs" / "config.md"
REGENERATE = "python -m pipeline.control.config_docs --write"
_BOUNDS = ((annotated_types.Gt, "gt", ">"), (annotated_types.Ge, "ge", "≥"), (annotated_types.Lt, "lt", "<"),
           (annotated_types.Le, "le", "≤"))


# ---------------------------------------------------------------- types


def _bounds(metadata: list[Any]) -> str:
    """The numeric bounds in a field's or an `Annotated` type's metadata, as `≥ 0, ≤ 1` ("" when none)."""
    parts = []
    for item in metadata:
        if isinstance(item, FieldInfo):  # Field(...) inside Annotated[...] of a nested type
            parts.append(_bounds(item.metadata))
            continue
        for kind, attr, sign in _BOUNDS:
            if isinstance(item, kind):
                parts.append(f"{sign} {getattr(item, attr)}")
    return ", ".join(p for p in parts if p)


def type_name(tp: Any, metadata: list[Any] | None = None) -> str:
    """A readable name of an annotation: `int (> 0)`, `list[float (≥ 0, ≤ 1)] | null`, `"emulator" | "fireworks"`;
    a nested model shows as `mapping` (its keys are listed under its own path)."""
    bounds = _bounds(metadata or [])
    if bounds:
        return f"{type_name(tp)} ({bounds})"
    origin = get_origin(tp)
    if origin is Annotated:
        base, *extra = get_args(tp)
        return type_name(base, list(extra))
    if origin in (Union, types.UnionType):
        args = get_args(tp)
        # `null` last: it reads as "may be left out" after the type that matters
        return " | ".join([type_name(a) for a in args if a is not type(None)] + ["null"] * (type(None) in args))
    if origin is Literal:
        return " | ".join(json.dumps(value) for value in get_args(tp))
    if origin in (list, dict):
        return f"{origin.__name__}[{', '.join(type_name(a) for a in get_args(tp))}]"
    if inspect.isclass(tp) and issubclass(tp, BaseModel):
        return "mapping"
    return "null" if tp is type(None) else getattr(tp, "__name__", str(tp))


def _nested_models(tp: Any, suffix: str = "") -> Iterator[tuple[str, type[BaseModel]]]:
    """(path suffix, model) for each model an annotation holds: directly (""), as map values (".<name>") or as list
    items ("[]"), through `Optional` and `Annotated`."""
    origin = get_origin(tp)
    if inspect.isclass(tp) and issubclass(tp, BaseModel):
        yield suffix, tp
    elif origin in (Union, types.UnionType, Annotated):
        for arg in get_args(tp)[:1] if origin is Annotated else get_args(tp):
            yield from _nested_models(arg, suffix)
    elif origin is list:
        yield from _nested_models(get_args(tp)[0], f"{suffix}[]")
    elif origin is dict:
        yield from _nested_models(get_args(tp)[1], f"{suffix}.<name>")


# ---------------------------------------------------------------- defaults and meanings


def default_text(field: FieldInfo) -> str:
    """The default as JSON in a code span, `required` when there is none; a nested model's default is its keys'."""
    if field.is_required():
        return "required"
    value = field.default_factory() if field.default_factory is not None else field.default  # type: ignore[call-arg]
    if value is PydanticUndefined:
        return "required"
    if isinstance(value, BaseModel):
        return "see its keys"
    return f"`{json.dumps(value, ensure_ascii=False)}`"


@cache
def attribute_docstrings(model: type[BaseModel]) -> dict[str, str]:
    """Field name → the string literal written on the line after the field in `model`'s class body."""
    tree = ast.parse(textwrap.dedent(inspect.getsource(model)))
    body = tree.body[0].body if tree.body and isinstance(tree.body[0], ast.ClassDef) else []
    docs: dict[str, str] = {}
    for node, after in zip(body, body[1:], strict=False):
        if (isinstance(node, ast.AnnAssign) and isinstance(node.target, ast.Name) and isinstance(after, ast.Expr)
                and isinstance(after.value, ast.Constant) and isinstance(after.value.value, str)):
            docs[node.target.id] = inspect.cleandoc(after.value.value)
    return docs


def meaning(model: type[BaseModel], name: str, field: FieldInfo) -> str:
    """The field's description, else its attribute docstring, else a marker that it has neither."""
    text = field.description or attribute_docstrings(model).get(name)
    return " ".join(text.split()) if text else "(undocumented)"


# ---------------------------------------------------------------- the document


def _cell(text: str) -> str:
    """Text made safe for one Markdown table cell (GitHub renders `\\|` as `|`, also inside code spans)."""
    return text.replace("|", "\\|").replace("\n", " ")


def _sections(model: type[BaseModel], path: str) -> Iterator[tuple[str, type[BaseModel]]]:
    """(dotted path, model) for `model` and, depth first in field order, every model nested in it."""
    yield path, model
    for name, field in model.model_fields.items():
        for suffix, nested in _nested_models(field.annotation):
            yield from _sections(nested, f"{path}.{name}{suffix}" if path else f"{name}{suffix}")


def _section(path: str, model: type[BaseModel]) -> list[str]:
    title = f"`{path}`" if path else "Top level"
    lines = [f"## {title}", ""]
    doc = inspect.getdoc(model)
    if doc and doc != inspect.getdoc(BaseModel) and model.__doc__:
        lines += [" ".join(doc.split()), ""]
    lines += ["| Key | Type | Default | Meaning |", "|---|---|---|---|"]
    for name, field in model.model_fields.items():
        key = f"{path}.{name}" if path else name
        lines.append(f"| `{key}` | `{_cell(type_name(field.annotation, field.metadata))}` | "
                     f"{_cell(default_text(field))} | {_cell(meaning(model, name, field))} |")
    return [*lines, ""]


def render() -> str:
    """docs/config.md: a preamble, then one table per model, the top level first."""
    lines = [
        "# Config reference",
        "",
        f"<!-- Generated from pipeline/control/config.py by `{REGENERATE}`; do not edit by hand. -->",
        "",
        "The experiment config is a YAML file (default `config/experiment.yaml`, a complete example). Unknown keys are "
        "refused; relative paths resolve against the config file's directory. `null` means the key may be set to "
        "null (or left out, when its default is null).",
        "",
    ]
    for path, model in _sections(ExperimentConfig, ""):
        lines += _section(path, model)
    return "\n".join(lines).rstrip("\n") + "\n"


def main(argv: list[str]) -> int:
    """Print the reference, or with `--write` rewrite docs/config.md; returns the exit code."""
    text = render()
    if argv == ["--write"]:
        DOC_PATH.write_text(text, encoding="utf-8")
        return 0
    if argv:
        print(f"usage: python -m pipeline.control.config_docs [--write]  (unknown: {' '.join(argv)})", file=sys.stderr)
        return 2
    sys.stdout.write(text)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
