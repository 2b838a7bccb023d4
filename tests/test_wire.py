"""Every name that crosses the wire is spelled once, in fedtextseg/wire.py: the adapter, the apps, the SecAgg+ glue
and the message audit use its constants (a key renamed in one place and not another would break the protocol)."""

from __future__ import annotations

import ast
from pathlib import Path

from fedtextseg import wire

ROOT = Path(__file__).resolve().parent.parent
# wire names that are not ordinary words (which, like "site" or "round", also name config keys and folders)
DISTINCTIVE = {v for k, v in vars(wire).items() if k.isupper() and isinstance(v, str) and ("-" in v or "." in v
                                                                                           or "_" in v)}


def _string_constants(path: Path):
    tree = ast.parse(path.read_text())
    docstrings = {id(node.body[0].value) for node in ast.walk(tree)
                  if isinstance(node, (ast.Module, ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef))
                  and node.body and isinstance(node.body[0], ast.Expr) and isinstance(node.body[0].value, ast.Constant)}
    for node in ast.walk(tree):
        if isinstance(node, ast.Constant) and isinstance(node.value, str) and id(node) not in docstrings:
            yield node.lineno, node.value


def test_wire_names_are_spelled_only_in_the_wire_module():
    assert {"meta.annotated", "num-examples", "frozen-info", "secaggplus_configs", "total-rounds"} <= DISTINCTIVE
    spelled = [f"{path.relative_to(ROOT)}:{line}: {value!r}"
               for folder in ("fedtextseg", "server", "client") for path in sorted((ROOT / folder).rglob("*.py"))
               if path.name != "wire.py" for line, value in _string_constants(path) if value in DISTINCTIVE]
    assert spelled == [], "use the fedtextseg.wire constant instead:\n" + "\n".join(spelled)
