"""No Rust panic crosses into Python: every binding runs its body in `guard` (rust_src/py/src/guard.rs), which
turns a panic into a RuntimeError naming the call. pyo3's own PanicException derives from BaseException, which
ComfyUI's executor does not catch, so one unguarded panic would stop the queue instead of failing a node.

What Python sees on a panic is tested in Rust (`cargo test -p vramkit-py`: a test-only panicking binding, on
the calling thread and in a rayon worker, under an embedded interpreter); this file checks statically that
every binding goes through the guard, so a new binding without it fails here.
"""

from __future__ import annotations

import re
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
BINDINGS = ROOT / "rust_src" / "py" / "src"


def _strip_comments(src: str) -> str:
    return re.sub(r"//[^\n]*", "", src)


def _body_start(src: str, fn_end: int) -> int:
    """The index just past the `{` that opens the body of the fn whose name ends at `fn_end`."""
    depth = 0
    for i in range(fn_end, len(src)):
        c = src[i]
        if c in "(<[":
            depth += 1
        elif c in ")>]" and not (c == ">" and src[i - 1] == "-"):
            depth -= 1
        elif c == "{" and depth == 0:
            return i + 1
    raise AssertionError("no body found")


def _entries() -> list[tuple[str, str, str]]:
    """(file, fn name, the first 200 characters of its body) of every #[pyfunction] and #[pymethods] fn."""
    found = []
    for path in sorted(BINDINGS.rglob("*.rs")):
        src = _strip_comments(path.read_text())
        for m in re.finditer(r"#\[pyfunction\]", src):
            fn = re.compile(r"\bfn\s+(\w+)").search(src, m.end())
            assert fn, f"{path.name}: #[pyfunction] without a fn"
            start = _body_start(src, fn.end())
            found.append((path.name, fn.group(1), src[start:start + 200]))
        for m in re.finditer(r"#\[pymethods\]\s*impl\b[^{]*\{", src):
            depth, i = 1, m.end()
            while depth:  # the impl block
                depth += {"{": 1, "}": -1}.get(src[i], 0)
                i += 1
            block = src[m.end():i]
            for fn in re.finditer(r"\bfn\s+(\w+)", block):
                start = _body_start(block, fn.end())
                found.append((path.name, fn.group(1), block[start:start + 200]))
    return found


def test_every_binding_runs_in_the_panic_guard() -> None:
    entries = _entries()
    names = {name for _, name, _ in entries}
    # The bindings that exist today must be found (the scan itself works).
    assert {"fp8_cast", "quantize", "dequantize", "error_stats", "attention", "plan_attention",
            "plan_offload", "copy_bytes", "simd_level", "_test_panic"} <= names, names
    unguarded = []
    for file, name, body in entries:
        m = re.match(r'\s*guard\(\s*"([\w.]+)"\s*,\s*(move\s*)?\|\|', body)
        if not m or m.group(1).split(".")[-1] != name:
            unguarded.append(f"{file}: fn {name} must start with guard(\"{name}\", || ...) (found {body[:60]!r})")
    assert not unguarded, "\n".join(unguarded)


def test_the_module_init_is_guarded_and_panics_unwind() -> None:
    lib = _strip_comments((BINDINGS / "lib.rs").read_text())
    init = re.search(r"#\[pymodule\]\s*fn\s+_core\b", lib)
    assert init
    assert re.match(r'\s*guard\("<module init>"', lib[_body_start(lib, init.end()):])
    # catch_unwind catches nothing when panics abort.
    for manifest in [ROOT / "Cargo.toml", *ROOT.glob("rust_src/*/Cargo.toml")]:
        assert not re.search(r'panic\s*=\s*"abort"', manifest.read_text()), manifest

