"""Structure figures of the fakegpt package, read from its source with `ast` (nothing is imported or run).

    python tools/code_report.py                     # all four sections, defaults below
    python tools/code_report.py --top 15 --module fakegpt/studies/tune.py --entry fakegpt.studies.tune.tune:cfg
    python tools/code_report.py --tree              # ... and the configuration walk as an indented call tree

Sections and what they count:

1. Longest functions: every `def` in fakegpt/ (methods and nested functions included), length = lines from
   the `def` line to the function's last line (decorators excluded), longest first.
2. Modules over `--max-lines` (400) lines: physical lines of each file.
3. Imports of one module (`--module`, default fakegpt/finetune/train.py): the distinct fakegpt modules it
   imports anywhere in the file (function-level imports included). `from fakegpt.a import b` counts
   fakegpt.a.b when that is a module, else fakegpt.a.
4. Walk of a configuration's use (`--entry module.function:param`, default
   fakegpt.finetune.train.finetune:cfg). Starting from that function, the walk follows every call that is
   handed the configuration into another fakegpt function, depth first in source order, each function once.
   Inside a function the configuration is the parameter it arrived in and any name assigned from it
   (`c = cfg`, `cfg = dataclasses.replace(cfg, ...)`, `cfg = t.cfg`) or from a call of a fakegpt function
   annotated to return the configuration's type (the entry parameter's annotation, e.g. FinetuneConfig).
   A call hands it over when an argument is one of those names or such a call (the callee's parameter is
   then the configuration), an attribute of one such as `cfg.seed` (the callee is visited as a reader of a
   field; the walk does not go on from a field), or any expression for a parameter whose `.cfg` the callee
   reads, itself or in a fakegpt function it hands that parameter on to (`loop(t)` or `loop(build(r))` where
   `loop` reads `t.cfg`). `x if c else y` counts as either side. A callee is resolved when it
   is a function of the same module, a name imported from a fakegpt module, `module.function` of an
   imported fakegpt module, or a class (its `__init__`); method calls on objects are not followed.
   Each followed call (to a function not visited yet) is one of:
   - stay: into the caller's own file, to a function defined below the caller (the reader reads on down);
   - climb back up: into the caller's own file, to a function defined above the caller (the reader scrolls
     back up);
   - down: into another file not on the current call chain (the files from the entry to the caller);
   - back: into another file that is on the current call chain (the walk returns into a module it came from).
   "files visited" is the number of distinct files holding a visited function.
"""

from __future__ import annotations

import argparse
import ast
import sys
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]  # --root: another checkout (e.g. `git worktree add DIR REV`)
PACKAGE = "fakegpt"


def module_files(root: Path | None = None) -> dict[str, Path]:
    """Dotted module name -> file, for every module of the package."""
    root = root or ROOT
    out = {}
    for path in sorted((root / PACKAGE).rglob("*.py")):
        parts = list(path.relative_to(root).with_suffix("").parts)
        if parts[-1] == "__init__":
            parts = parts[:-1]
        out[".".join(parts)] = path
    return out


def parse(path: Path) -> ast.Module:
    return ast.parse(path.read_text(encoding="utf-8"), str(path))


def functions(tree: ast.AST) -> list[ast.FunctionDef | ast.AsyncFunctionDef]:
    return [n for n in ast.walk(tree) if isinstance(n, ast.FunctionDef | ast.AsyncFunctionDef)]


# --- 1, 2: sizes ------------------------------------------------------------------------------------------


def longest_functions(files: dict[str, Path], top: int) -> list[tuple[int, str, int, str]]:
    """(length, file, line, name) of the `top` longest functions."""
    rows = []
    for path in files.values():
        for fn in functions(parse(path)):
            rows.append((fn.end_lineno - fn.lineno + 1, rel(path), fn.lineno, fn.name))
    rows.sort(key=lambda r: (-r[0], r[1], r[2]))
    return rows[:top]


def long_modules(files: dict[str, Path], max_lines: int) -> list[tuple[int, str]]:
    rows = [(len(p.read_text(encoding="utf-8").splitlines()), rel(p)) for p in files.values()]
    return sorted((r for r in rows if r[0] > max_lines), key=lambda r: (-r[0], r[1]))


# --- 3: imports -------------------------------------------------------------------------------------------


def fakegpt_imports(path: Path, files: dict[str, Path]) -> list[str]:
    """The distinct fakegpt modules `path` imports (anywhere in the file)."""
    found = set()
    for node in ast.walk(parse(path)):
        if isinstance(node, ast.Import):
            found.update(a.name for a in node.names if a.name.split(".")[0] == PACKAGE)
        elif isinstance(node, ast.ImportFrom) and node.module and node.module.split(".")[0] == PACKAGE:
            for alias in node.names:
                sub = f"{node.module}.{alias.name}"
                found.add(sub if sub in files else node.module)
    return sorted(found)


# --- 4: the configuration walk ----------------------------------------------------------------------------


def bound_args(fn: ast.FunctionDef, method: bool, call: ast.Call) -> list[tuple[str, ast.expr]]:
    """(parameter name, argument) for each argument of `call` that binds a named parameter of `fn` (a method's
    self left out)."""
    params = [a.arg for a in fn.args.posonlyargs + fn.args.args][1 if method else 0 :]
    pairs = [(params[i], a) for i, a in enumerate(call.args) if i < len(params)]
    return pairs + [(kw.arg, kw.value) for kw in call.keywords if kw.arg]


@dataclass
class ModuleIndex:
    """One module's top-level functions and classes, and the names it imports from fakegpt."""

    name: str
    path: Path
    defs: dict[str, ast.FunctionDef | ast.AsyncFunctionDef | ast.ClassDef]
    names: dict[str, tuple[str, str]] = field(default_factory=dict)  # local name -> (module, attribute)
    modules: dict[str, str] = field(default_factory=dict)  # local name -> imported fakegpt module


def index(name: str, path: Path, files: dict[str, Path]) -> ModuleIndex:
    tree = parse(path)
    defs = {n.name: n for n in tree.body if isinstance(n, ast.FunctionDef | ast.AsyncFunctionDef | ast.ClassDef)}
    idx = ModuleIndex(name, path, defs)
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            for a in node.names:
                if a.name in files:
                    idx.modules[a.asname or a.name] = a.name
        elif isinstance(node, ast.ImportFrom) and node.module in files:
            for a in node.names:
                sub = f"{node.module}.{a.name}"
                if sub in files:
                    idx.modules[a.asname or a.name] = sub
                else:
                    idx.names[a.asname or a.name] = (node.module, a.name)
    return idx


def root_name(node: ast.AST) -> str | None:
    """`t` for `t`, `t.cfg`, `t.cfg.seed`; None for anything else."""
    while isinstance(node, ast.Attribute):
        node = node.value
    return node.id if isinstance(node, ast.Name) else None


def reads_cfg_of(fn: ast.AST, name: str) -> bool:
    """Whether `fn` itself reads `name.cfg`."""
    return any(
        isinstance(n, ast.Attribute) and n.attr == "cfg" and isinstance(n.value, ast.Name) and n.value.id == name
        for n in ast.walk(fn)
    )


KINDS = ("stay", "climb back up", "down", "back")


@dataclass
class Walk:
    files: dict[str, Path]
    indexes: dict[str, ModuleIndex] = field(default_factory=dict)
    seen: set[tuple[str, str]] = field(default_factory=set)
    counts: dict[str, int] = field(default_factory=lambda: dict.fromkeys(KINDS, 0))
    visited_files: set[str] = field(default_factory=set)
    lines: list[str] = field(default_factory=list)
    config_type: str = ""  # the entry parameter's annotation

    def module(self, name: str) -> ModuleIndex:
        if name not in self.indexes:
            self.indexes[name] = index(name, self.files[name], self.files)
        return self.indexes[name]

    def resolve(self, mod: ModuleIndex, func: ast.AST) -> tuple[str, str] | None:
        """(module, top-level name) a call's callee is, when it is a fakegpt function or class."""
        if isinstance(func, ast.Name):
            if func.id in mod.defs:
                return mod.name, func.id
            if func.id in mod.names:
                return mod.names[func.id]
        elif isinstance(func, ast.Attribute) and isinstance(func.value, ast.Name) and func.value.id in mod.modules:
            return mod.modules[func.value.id], func.attr
        return None

    def target(self, module: str, name: str) -> tuple[ast.FunctionDef | ast.AsyncFunctionDef, bool] | None:
        """The function a callee runs (a class: its __init__) and whether `self` comes first."""
        node = self.module(module).defs.get(name) if module in self.files else None
        if isinstance(node, ast.ClassDef):
            init = next((n for n in node.body if isinstance(n, ast.FunctionDef) and n.name == "__init__"), None)
            return (init, True) if init is not None else None
        return (node, False) if node is not None else None

    def carries_cfg(self, module: str, fn: ast.AST, param: str, busy: frozenset = frozenset()) -> bool:
        """Whether `fn` reads `param.cfg`, itself or in a fakegpt function it hands `param` to."""
        if reads_cfg_of(fn, param):
            return True
        mod = self.module(module)
        for node in ast.walk(fn):
            if not isinstance(node, ast.Call):
                continue
            callee = self.resolve(mod, node.func)
            found = self.target(*callee) if callee is not None else None
            if found is None or (callee, param) in busy:
                continue
            g, method = found
            for q, arg in bound_args(g, method, node):
                if isinstance(arg, ast.Name) and arg.id == param:
                    if self.carries_cfg(callee[0], g, q, busy | {(callee, param)}):
                        return True
        return False

    def returns_config(self, mod: ModuleIndex, node: ast.AST) -> bool:
        """Whether `node` is a call of a fakegpt function annotated to return the configuration's type."""
        callee = self.resolve(mod, node.func) if isinstance(node, ast.Call) else None
        found = self.target(*callee) if callee is not None else None
        if found is None or found[1] or found[0].returns is None:
            return False
        return bool(self.config_type) and ast.unparse(found[0].returns) == self.config_type

    def visit(
        self, module: str, name: str, param: str, how: str, chain: list[str], depth: int, kind: str = "entry"
    ) -> None:
        """Visit `module.name`, handed the configuration in `param` as `how` (config, field or carrier)."""
        fn, _ = self.target(module, name)
        mod = self.module(module)
        if not self.config_type:
            arg = next(a for a in fn.args.posonlyargs + fn.args.args + fn.args.kwonlyargs if a.arg == param)
            self.config_type = ast.unparse(arg.annotation) if arg.annotation is not None else ""
        self.seen.add((module, name))
        self.visited_files.add(rel(mod.path))
        self.lines.append(f"{'  ' * depth}{module}.{name}({param}: {how})  {rel(mod.path)}:{fn.lineno}  [{kind}]")
        if how == "field":
            return
        aliases = {param} if how == "config" else set()
        for node in body_in_order(fn):
            if isinstance(node, ast.Assign):
                assign(node, aliases, lambda value, mod=mod: self.returns_config(mod, value))
            elif isinstance(node, ast.Call):
                self.call(mod, fn, node, aliases, chain + [module], depth)

    def call(
        self, mod: ModuleIndex, caller: ast.AST, node: ast.Call, aliases: set[str], chain: list[str], depth: int
    ) -> None:
        callee = self.resolve(mod, node.func)
        found = self.target(*callee) if callee is not None else None
        if found is None or callee in self.seen:
            return
        fn, method = found
        for param, arg in bound_args(fn, method, node):
            if self.returns_config(mod, arg):
                how = "config"
            else:
                how = handed(arg, aliases) or ("carrier" if self.carries_cfg(callee[0], fn, param) else None)
            if how is None:
                continue
            if callee[0] == mod.name:
                kind = "stay" if fn.lineno > caller.lineno else "climb back up"
            else:
                kind = "back" if callee[0] in chain else "down"
            self.counts[kind] += 1
            self.visit(callee[0], callee[1], param, how, chain, depth + 1, kind)
            return


def assign(node: ast.Assign, aliases: set[str], returns_config: Callable[[ast.AST], bool]) -> None:
    """Names that become the configuration: assigned from it, a copy of it, `x.cfg` or a call returning one."""
    pairs: list[tuple[ast.AST, ast.AST]] = []
    for target in node.targets:
        if isinstance(target, ast.Tuple) and isinstance(node.value, ast.Tuple):
            pairs += list(zip(target.elts, node.value.elts, strict=False))
        else:
            pairs.append((target, node.value))
    for target, value in pairs:
        if not isinstance(target, ast.Name):
            continue
        if isinstance(value, ast.IfExp):  # `cfg = resumed.cfg if resumed else local`: either side
            branches = [value.body, value.orelse]
            value = next((b for b in branches if isinstance(b, ast.Name) and b.id in aliases), value.body)
        if isinstance(value, ast.Call) and value.args:  # dataclasses.replace(cfg, ...)
            func = value.func
            if (func.attr if isinstance(func, ast.Attribute) else getattr(func, "id", "")) == "replace":
                value = value.args[0]
        if isinstance(value, ast.Name) and value.id in aliases or returns_config(value):
            aliases.add(target.id)
        elif isinstance(value, ast.Attribute) and value.attr == "cfg" and isinstance(value.value, ast.Name):
            aliases.add(target.id)


def handed(arg: ast.AST, aliases: set[str]) -> str | None:
    """How an argument hands the configuration over: as the config, a field of it, or not (None)."""
    if isinstance(arg, ast.Name) and arg.id in aliases:
        return "config"
    if isinstance(arg, ast.Attribute) and arg.attr == "cfg" and isinstance(arg.value, ast.Name):
        return "config"
    if isinstance(arg, ast.Attribute) and root_name(arg) in aliases:
        return "field"
    return None


def body_in_order(fn: ast.AST) -> list[ast.AST]:
    """The assignments and calls in a function, in source order (nested functions' bodies included)."""
    nodes = [n for n in ast.walk(fn) if isinstance(n, ast.Assign | ast.Call) and n is not fn]
    return sorted(nodes, key=lambda n: (n.lineno, n.col_offset))


def call_args(node: ast.Call) -> list[ast.AST]:
    return list(node.args) + [kw.value for kw in node.keywords]


def rel(path: Path) -> str:
    return str(path.relative_to(ROOT))


# --- the report -------------------------------------------------------------------------------------------


def report(top: int, max_lines: int, module: str, entry: str, tree: bool) -> str:
    files = module_files()
    out = [f"== {top} longest functions in {PACKAGE}/ (lines) =="]
    out += [f"{n:5d}  {path}:{line} {name}" for n, path, line, name in longest_functions(files, top)]
    out += ["", f"== modules over {max_lines} lines =="]
    out += [f"{n:5d}  {path}" for n, path in long_modules(files, max_lines)] or ["(none)"]
    imported = fakegpt_imports(ROOT / module, files)
    out += ["", f"== {PACKAGE} modules imported by {module}: {len(imported)} =="]
    out += [f"  {name}" for name in imported]
    target, param = entry.split(":")
    mod_name, func = target.rsplit(".", 1)
    walk = Walk(files)
    walk.visit(mod_name, func, param, "config", [], 0)
    c = walk.counts
    out += [
        "",
        f"== walk of {param} from {target} ==",
        f"functions visited {len(walk.seen)}, files visited {len(walk.visited_files)}; calls followed: "
        + ", ".join(f"{kind} {c[kind]}" for kind in KINDS),
    ]
    out += [f"  {path}" for path in sorted(walk.visited_files)]
    if tree:
        out += ["", *walk.lines]
    return "\n".join(out)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--top", type=int, default=10, help="how many of the longest functions to list")
    p.add_argument("--max-lines", type=int, default=400, help="list modules longer than this")
    p.add_argument("--module", default="fakegpt/finetune/train.py", help="module whose fakegpt imports to list")
    p.add_argument(
        "--entry", default="fakegpt.finetune.train.finetune:cfg", help="module.function:param to walk the use of"
    )
    p.add_argument("--tree", action="store_true", help="print the walk as an indented call tree")
    p.add_argument("--root", type=Path, default=None, help="the checkout to read (default: this one)")
    args = p.parse_args(argv)
    if args.root is not None:
        global ROOT
        ROOT = args.root.resolve()
    print(report(args.top, args.max_lines, args.module, args.entry, args.tree))
    return 0


if __name__ == "__main__":
    sys.exit(main())
