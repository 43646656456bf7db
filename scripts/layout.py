#!/usr/bin/env python3
"""Checks the layout of the Rust crates: import circles, file sizes and function lengths.

    python3 scripts/layout.py              # every check; exit 1 on any violation
    python3 scripts/layout.py edges        # print the module-level `use crate::` edges
    python3 scripts/layout.py sizes        # print non-test line counts and the longest functions
    python3 scripts/layout.py self-test    # the checks find a planted circle and a long fn

Import circles. Every .rs file under a crate's src/ is a module (lib.rs/main.rs is the crate
root, foo/mod.rs is the folder foo). An edge A -> B is any path `crate::...`, `super::...` or
`self::...` in A (in a `use` or inline) that names an item of module B. A path through a
re-export (`pub use x::Y` in lib.rs or a mod.rs) is followed to the module that defines Y, so
importing a re-exported name is an edge to its real home, and the re-export line itself is the
parent's edge down to its child. The check runs once per folder: the folder's own mod.rs (or the
crate root) and its direct children (files and sub-folders, each sub-folder standing for
everything below it) must form a graph without cycles. So arrows between rooms point one way,
and within a room the parent's mod.rs is above its children: a child that needs a type the
parent also uses takes it from a sibling, never from the parent.

Sizes. Test code (`#[cfg(test)]` items and modules, files named tests.rs or under a tests/
folder) is excluded. A non-test file may have at most MAX_FILE_LINES lines and a function at
most MAX_FN_LINES lines (from its `fn` line to its closing brace).
"""

import os
import re
import sys
from collections import defaultdict

ROOT = os.path.normpath(os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))
CIRCLE_CRATES = ["broker/src", "gateway/src", "bench/src"]
SIZE_CRATES = ["broker/src", "gateway/src", "firmware/src"]
MAX_FILE_LINES = 600
MAX_FN_LINES = 120


# ---------------------------------------------------------------------------------------------
# Reading Rust text: comments and strings blanked, test items removed.


def blank_comments_and_strings(text):
    """Same length and line breaks as `text`, with comments and string/char literals blanked."""
    out = []
    i, n = 0, len(text)
    while i < n:
        c = text[i]
        if text.startswith("//", i):
            j = text.find("\n", i)
            j = n if j < 0 else j
            out.append(" " * (j - i))
            i = j
        elif text.startswith("/*", i):
            depth, j = 1, i + 2
            while j < n and depth:
                if text.startswith("/*", j):
                    depth, j = depth + 1, j + 2
                elif text.startswith("*/", j):
                    depth, j = depth - 1, j + 2
                else:
                    j += 1
            out.append(re.sub(r"[^\n]", " ", text[i:j]))
            i = j
        elif c == "r" and re.match(r'r#*"', text[i:i + 10]) and (i == 0 or not (text[i - 1].isalnum() or text[i - 1] == "_")):
            m = re.match(r'r(#*)"', text[i:])
            close = '"' + m.group(1)
            j = text.find(close, i + len(m.group(0)))
            j = n if j < 0 else j + len(close)
            out.append('""' + re.sub(r"[^\n]", " ", text[i + 2:j]))
            i = j
        elif c == '"':
            j = i + 1
            while j < n and text[j] != '"':
                j += 2 if text[j] == "\\" else 1
            j = min(j + 1, n)
            out.append('"' + re.sub(r"[^\n]", " ", text[i + 1:j - 1]) + '"')
            i = j
        elif c == "'":
            # A char literal ('a', '\n', '\u{1F}') or a lifetime ('a); only literals are blanked.
            m = re.match(r"'(\\u\{[0-9a-fA-F]+\}|\\.|[^\\'])'", text[i:])
            if m:
                out.append("' '" + " " * (len(m.group(0)) - 3))
                i += len(m.group(0))
            else:
                out.append(c)
                i += 1
        else:
            out.append(c)
            i += 1
    return "".join(out)


def matching_brace(code, open_at):
    depth = 0
    for j in range(open_at, len(code)):
        if code[j] == "{":
            depth += 1
        elif code[j] == "}":
            depth -= 1
            if depth == 0:
                return j
    return len(code) - 1


def strip_test_items(code):
    """Blanks every item under `#[cfg(test)]` (keeps line breaks so line numbers hold).

    The item ends at the first `;` or `,` outside brackets (`mod tests;`, a struct field, a
    statement), at the end of its first top-level `{...}` block (a module, fn or impl), or
    before a `}` that closes the enclosing block (the last field of a struct literal)."""
    out = list(code)
    for m in re.finditer(r"#\[cfg\(test\)\]", code):
        j, depth, end = m.end(), 0, len(code) - 1
        while j < len(code):
            c = code[j]
            if c in "([":
                depth += 1
            elif c in ")]":
                depth -= 1
            elif c == "{" and depth == 0:
                end = matching_brace(code, j)
                break
            elif c == "}" and depth == 0:
                end = j - 1
                break
            elif c in ";," and depth == 0:
                end = j
                break
            j += 1
        for k in range(m.start(), end + 1):
            if out[k] != "\n":
                out[k] = " "
    return "".join(out)


def test_module_files(src, code, rel):
    """Files declared as `#[cfg(test)] mod x;` in this file."""
    names = re.findall(r"#\[cfg\(test\)\]\s*(?:pub(?:\([^)]*\))?\s+)?mod\s+(\w+)\s*;", code)
    return names


# ---------------------------------------------------------------------------------------------
# Modules of a crate.


class Crate:
    def __init__(self, src):
        self.src = src
        self.modules = {}  # tuple path -> relative file
        self.code = {}  # tuple path -> code without comments, strings, tests
        self.test_files = set()
        root = "lib.rs" if os.path.exists(os.path.join(src, "lib.rs")) else "main.rs"
        self._load((), root)

    def _load(self, path, rel):
        full = os.path.join(self.src, rel)
        with open(full, encoding="utf-8") as f:
            raw = blank_comments_and_strings(f.read())
        for name in test_module_files(self.src, raw, rel):
            self.test_files.add(name)
        code = strip_test_items(raw)
        self.modules[path] = rel
        self.code[path] = code
        here = os.path.dirname(rel) if rel.endswith(("mod.rs", "lib.rs", "main.rs")) else rel[:-3]
        for m in re.finditer(r"^\s*(?:pub(?:\([^)]*\))?\s+)?mod\s+(\w+)\s*;", code, re.M):
            name = m.group(1)
            for cand in (os.path.join(here, name + ".rs"), os.path.join(here, name, "mod.rs")):
                if os.path.exists(os.path.join(self.src, cand)):
                    self._load(path + (name,), cand)
                    break

    # Re-exports: (module, name) -> full path the name stands for.
    def reexports(self):
        table = {}
        for mod, code in self.code.items():
            for stmt in re.finditer(r"\bpub(?:\([^)]*\))?\s+use\s+([^;]+);", code):
                for p in expand_use(stmt.group(1)):
                    full = absolute(mod, p, self)
                    if full is None or not full:
                        continue
                    table[(mod, full[-1])] = full
        return table

    def resolve(self, full, table, depth=0):
        """The module that defines the item a full path names."""
        # Longest prefix that is a module.
        for k in range(len(full), -1, -1):
            prefix = tuple(full[:k])
            if prefix in self.modules:
                rest = full[k:]
                if rest and (prefix, rest[0]) in table and depth < 10:
                    target = table[(prefix, rest[0])]
                    if tuple(target) != tuple(full):
                        return self.resolve(list(target) + list(rest[1:]), table, depth + 1)
                return prefix
        return None

    def edges(self):
        table = self.reexports()
        out = set()
        for mod, code in self.code.items():
            paths = []
            for stmt in re.finditer(r"\buse\s+([^;]+);", code):
                paths.extend(expand_use(stmt.group(1)))
            no_use = re.sub(r"\buse\s+[^;]+;", " ", code)
            for m in re.finditer(r"(?<![\w:])((?:crate|super|self)(?:::\w+)+)", no_use):
                paths.append(m.group(1).split("::"))
            # Relative paths through a child module (`writer::Writer::new` in store/mod.rs).
            for m in re.finditer(r"(?<![\w:])(\w+)((?:::\w+)+)", no_use):
                if mod + (m.group(1),) in self.modules:
                    paths.append(["crate"] + list(mod) + (m.group(1) + m.group(2)).split("::"))
            for p in paths:
                full = absolute(mod, p, self)
                if full is None:
                    continue
                target = self.resolve(full, table)
                if target is not None and target != mod:
                    out.add((mod, target))
        return out


def expand_use(tree):
    """`crate::{a::X, b::{Y, Z}}` -> [['crate','a','X'], ['crate','b','Y'], ['crate','b','Z']]."""
    tree = re.sub(r"\s+as\s+", "@", tree)  # `X as Y` keeps X, the name imported
    tree = re.sub(r"\s+", "", tree)
    results = []

    def walk(prefix, s):
        depth, parts, cur = 0, [], ""
        for ch in s:
            if ch == "{":
                depth += 1
            elif ch == "}":
                depth -= 1
            if ch == "," and depth == 0:
                parts.append(cur)
                cur = ""
            else:
                cur += ch
        if cur:
            parts.append(cur)
        for part in parts:
            if "{" in part:
                head, inner = part.split("{", 1)
                walk(prefix + [x for x in head.split("::") if x], inner[:-1])
            else:
                results.append(prefix + [seg.split("@")[0] for seg in part.split("::")])

    walk([], tree)
    return results


def absolute(mod, p, crate):
    """An absolute module path for a use path seen in `mod`, or None if it is external."""
    if not p:
        return None
    p = [s for s in p if s]
    if p[0] == "crate":
        return p[1:]
    if p[0] in ("self", "super"):
        # `self`/`super` are relative to the module the file defines.
        base = list(mod)
        i = 0
        while i < len(p) and p[i] in ("self", "super"):
            if p[i] == "super":
                if not base:
                    return None
                base = base[:-1]
            i += 1
        return base + p[i:]
    # A bare first segment naming a child module of `mod` (2018 edition relative path).
    if tuple(mod) + (p[0],) in crate.modules:
        return list(mod) + p
    # Or a top-level module named from the crate root.
    if mod == () and (p[0],) in crate.modules:
        return p
    return None


# ---------------------------------------------------------------------------------------------
# Circles.


def folder_cycles(crate, edges):
    """For each folder, the cycles among its mod file and its direct children."""
    folders = [m for m in crate.modules if any(len(o) == len(m) + 1 and o[:len(m)] == m for o in crate.modules)]
    found = []
    for folder in folders:
        graph = defaultdict(set)
        for a, b in edges:
            ra, rb = represent(folder, a), represent(folder, b)
            if ra is None or rb is None or ra == rb:
                continue
            graph[ra].add(rb)
        for scc in strongly_connected(graph):
            if len(scc) > 1:
                found.append((folder, sorted(scc), graph))
    return found


def represent(folder, mod):
    """The node that stands for `mod` in `folder`'s graph: '(self)', a child name, or None."""
    if mod == folder:
        return "(" + ("crate" if not folder else folder[-1]) + ")"
    if len(mod) > len(folder) and mod[:len(folder)] == folder:
        return mod[len(folder)]
    return None


def strongly_connected(graph):
    index, low, stack, on, out = {}, {}, [], set(), []
    counter = [0]
    nodes = set(graph) | {b for bs in graph.values() for b in bs}

    def visit(v):
        index[v] = low[v] = counter[0]
        counter[0] += 1
        stack.append(v)
        on.add(v)
        for w in graph.get(v, ()):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            comp = []
            while True:
                w = stack.pop()
                on.discard(w)
                comp.append(w)
                if w == v:
                    break
            out.append(comp)

    sys.setrecursionlimit(10000)
    for v in sorted(nodes):
        if v not in index:
            visit(v)
    return out


def name(mod):
    return "crate" if not mod else "::".join(mod)


# ---------------------------------------------------------------------------------------------
# Sizes.


def is_test_file(crate, rel):
    base = os.path.basename(rel)[:-3]
    return base == "tests" or "/tests/" in "/" + rel or base in crate.test_files


def long_functions(code):
    out = []
    for m in re.finditer(r"\bfn\s+(\w+)", code):
        brace = code.find("{", m.end())
        semi = code.find(";", m.end())
        if brace < 0 or (0 <= semi < brace):
            continue  # a declaration without a body (trait method, extern)
        # Generic bounds can hold `{` only in const generics; good enough for this code base.
        end = matching_brace(code, brace)
        first = code.count("\n", 0, m.start()) + 1
        last = code.count("\n", 0, end) + 1
        out.append((m.group(1), first, last - first + 1))
    return out


def non_blank_lines(code):
    return sum(1 for line in code.split("\n") if line.strip())


def file_lines(crate, mod):
    """Lines of the file that are not test code (the file's own line count minus test items)."""
    rel = crate.modules[mod]
    with open(os.path.join(crate.src, rel), encoding="utf-8") as f:
        total = f.read().rstrip("\n").count("\n") + 1
    raw = blank_comments_and_strings(open(os.path.join(crate.src, rel), encoding="utf-8").read())
    stripped = strip_test_items(raw)
    # Lines entirely inside removed test items do not count.
    removed = 0
    for a, b in zip(raw.split("\n"), stripped.split("\n")):
        if a.strip() and not b.strip():
            removed += 1
    return total - removed


def self_test():
    """Plants what the checks must find in a scratch crate; exit 1 if one is missed."""
    import tempfile

    with tempfile.TemporaryDirectory() as tmp:
        files = {
            "lib.rs": "mod a;\nmod b;\nmod c;\npub use c::Z;\n",
            # a -> b through a grouped use, b -> a through an inline path: a circle.
            "a.rs": "use crate::{b::{X}};\npub struct Y;\n",
            "b.rs": "pub struct X;\nfn f() -> crate::a::Y { crate::a::Y }\n",
            # A re-exported name is an edge to its real home; a test-only field is not code.
            "c.rs": "pub struct Z { #[cfg(test)] t: u8, }\nfn long() {\n" + "    let _ = 1;\n" * 130 + "}\n"
            + "#[cfg(test)]\nmod tests {\n    fn long_test() {\n" + "        let _ = 1;\n" * 200 + "    }\n}\n",
        }
        for name, text in files.items():
            with open(os.path.join(tmp, name), "w", encoding="utf-8") as f:
                f.write(text)
        crate = Crate(tmp)
        edges = crate.edges()
        cycles = folder_cycles(crate, edges)
        fns = {f[0]: f[2] for f in long_functions(crate.code[("c",)])}
        checks = [
            ("a circle a <-> b", any(set(scc) == {"a", "b"} for _, scc, _ in cycles)),
            ("the re-export edge crate -> c", ((), ("c",)) in edges),
            ("fn long is 132 lines", fns.get("long") == 132),
            ("test code is not counted", "long_test" not in fns),
        ]
    missed = [what for what, ok in checks if not ok]
    for what in missed:
        print(f"layout self-test: missed {what}", file=sys.stderr)
    if not missed:
        print("layout self-test: every planted problem found")
    return 1 if missed else 0


def main(argv):
    mode = argv[1] if len(argv) > 1 else "check"
    if mode == "self-test":
        return self_test()
    failures = []
    for src in sorted(set(CIRCLE_CRATES + SIZE_CRATES)):
        crate = Crate(os.path.join(ROOT, src))
        if src in CIRCLE_CRATES:
            edges = crate.edges()
            if mode == "edges":
                for a, b in sorted(edges):
                    print(f"{src}: {name(a)} -> {name(b)}")
            for folder, scc, graph in folder_cycles(crate, edges):
                members = set(scc)
                detail = ", ".join(f"{a} -> {b}" for a in scc for b in sorted(graph[a]) if b in members)
                failures.append(f"{src}: import circle in {name(folder)}: {detail}")
        if src in SIZE_CRATES:
            for mod, rel in sorted(crate.modules.items(), key=lambda kv: kv[1]):
                if is_test_file(crate, rel):
                    continue
                lines = file_lines(crate, mod)
                fns = long_functions(crate.code[mod])
                if mode == "sizes":
                    longest = max(fns, key=lambda f: f[2]) if fns else ("-", 0, 0)
                    print(f"{lines:5} {src}/{rel}  (longest fn {longest[0]}: {longest[2]})")
                if lines > MAX_FILE_LINES:
                    failures.append(f"{src}/{rel}: {lines} non-test lines (limit {MAX_FILE_LINES})")
                for fn, line, length in fns:
                    if length > MAX_FN_LINES:
                        failures.append(f"{src}/{rel}:{line}: fn {fn} is {length} lines (limit {MAX_FN_LINES})")
    if mode in ("edges", "sizes"):
        print()
    for f in failures:
        print(f, file=sys.stderr)
    if failures:
        print(f"layout: {len(failures)} problem(s)", file=sys.stderr)
        return 1
    print("layout: no import circle; files and functions within limits")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv))
