"""What may leave the server for a browser: file names (never paths), the labels of a parallel layout,
and an error's root cause in one line.

Every string the sidebar receives goes through redact_tree() on its way out, error texts too, so
the directories of the machine's model store never reach a browser.
"""

from __future__ import annotations

import re
from typing import Any

_DEGREE_LABELS = {"dp_degree": "data parallel", "cfg_degree": "CFG parallel", "pipefusion_degree": "PipeFusion",
                  "ring_degree": "Ring", "ulysses_degree": "Ulysses"}
# The directories of an absolute path (POSIX, ~/ or a Windows drive); what follows them is the file name.
_SEGMENT = r"[^\s\\/'\"|<>:](?:[^\n\\/'\"|<>:]*[^\s\\/'\"|<>:])?"  # may hold spaces, not at its ends
_ABS_DIRS = re.compile(r"(?<![\w.])(?:[A-Za-z]:[\\/]|~?[\\/])(?:" + _SEGMENT + r"[\\/])+")
_MAX_TEXT = 4000


# --- names, never paths ----------------------------------------------------------------------
def file_name(path: str) -> str:
    """The last component of a path, whatever its separators; "random:..." sources stay as they are."""
    return re.split(r"[\\/]", str(path).rstrip("\\/"))[-1]


def redact(text: str) -> str:
    """`text` with the directories of absolute paths removed, so only file names remain."""
    return _ABS_DIRS.sub("", str(text))


def redact_tree(value: Any) -> Any:
    """`value` (JSON-like: dicts, lists, strings...) with every string redacted."""
    if isinstance(value, str):
        return redact(value)
    if isinstance(value, dict):
        return {k: redact_tree(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [redact_tree(v) for v in value]
    return value


def describe_model_key(key: str) -> dict:
    """A worker's cache key, turned into what may be shown.

    Transformers: "<source>|<dtype>|<attention kernel>|<layout>|compile=<bool>";
    VAEs: "vae|<path>|<dtype>". Anything else: the file name of the one field that looks like a path.
    """
    parts = str(key).split("|")
    if parts[0] == "vae" and len(parts) >= 3:
        return {"name": file_name("|".join(parts[1:-1])), "dtype": parts[-1]}
    if len(parts) >= 5 and parts[-1].startswith("compile="):
        return {"name": file_name("|".join(parts[:-4])), "dtype": parts[-4], "attention": parts[-3],
                "compiled": parts[-1] == "compile=True"}
    paths = [p for p in parts if "/" in p or "\\" in p]
    return {"name": file_name(paths[0] if paths else parts[0])}


def strategy_label(parallel: dict | None) -> str:
    """'Ulysses 2 x Ring 2' from a ParallelConfig dict; degrees of 1 left out."""
    used = [(k, v) for k, v in (parallel or {}).items() if isinstance(v, int) and v > 1]
    if not used:
        return "single rank"
    return " × ".join(f"{_DEGREE_LABELS.get(k, k.replace('_degree', ''))} {v}" for k, v in used)


# --- errors ----------------------------------------------------------------------------------
def _exception_line(text: str) -> str:
    """The last unindented line of a traceback ("RuntimeError: CUDA out of memory ..."), else the last line."""
    lines = [line.rstrip() for line in text.splitlines() if line.strip()]
    if not lines:
        return ""
    for line in reversed(lines):
        if not line[0].isspace() and not line.startswith(("Traceback", "During handling", "The above exception")):
            return line.strip()
    return lines[-1].strip()


def root_cause(error: BaseException | str, kind: str | None = None) -> dict:
    """{summary, detail, message}: what went wrong in one line, the root cause, the whole text (redacted)."""
    if isinstance(error, BaseException):
        error = str(error) or type(error).__name__
    text = redact(str(error)).strip()
    text = re.sub(r"^xDiT worker pool:\s*", "", text)
    what = f"xDiT {kind} failed" if kind else "xDiT request failed"
    head, sep, tail = text.partition("; last error:")
    if sep:  # a rank (or the launcher) died; the rank that died first comes first
        blocks = [b for b in re.split(r"(?m)^(?=rank \d+: )", tail.strip()) if b.strip()]
        first = blocks[0] if blocks else tail
        label = re.match(r"(rank \d+): ", first)
        body = first[label.end():] if label else first
        cause = _exception_line(body) or head
        detail = f"{label.group(1)}: {cause}" if label else cause
        summary = f"{what}: {head.strip()}"
    else:
        detail = _exception_line(text) if "Traceback" in text else (text.splitlines() or [""])[0]
        summary = what
    message = text if len(text) <= _MAX_TEXT else text[:_MAX_TEXT] + " …"
    return {"summary": summary[:300], "detail": detail[:1000], "message": message}
