"""Real English sentences that ship with Python: the docstrings of standard
library modules and of their public functions and classes, and (other
sources than docstrings) the prose of the language reference that ``help()``
shows and of IDLE's manual, news and Python's license.

Offline, deterministic for a given Python version, and real (written by
people, for people), which is what the model-quality evaluations need.
Each docstring sentence keeps the module it came from, so it can also label text tasks.
"""
from __future__ import annotations

import html
import importlib
import inspect
import random
import re
import sysconfig
import warnings
from pathlib import Path

SOURCE_MODULES = (
    "argparse", "asyncio", "collections", "csv", "datetime", "decimal", "email", "functools", "http.client",
    "inspect", "json", "logging", "os", "pathlib", "pickle", "re", "shutil", "socket", "sqlite3", "subprocess",
    "tarfile", "threading", "typing", "unittest", "urllib.request", "zipfile", "textwrap", "heapq", "statistics",
    "fractions", "difflib", "calendar", "locale", "gettext", "configparser", "tempfile", "glob", "fnmatch",
    "codecs", "string", "random", "uuid", "hashlib", "hmac", "secrets", "base64", "binascii", "struct", "array",
    "weakref", "copy", "pprint", "enum", "dataclasses", "contextlib", "abc", "io", "time", "sched", "queue",
    "selectors", "signal", "mmap", "ftplib", "smtplib", "imaplib", "poplib", "xml.dom.minidom",
    "xml.etree.ElementTree", "html.parser", "wave", "colorsys", "cmd", "shlex", "pdb", "timeit", "trace",
    "tracemalloc", "doctest", "pydoc", "zipimport", "importlib", "ast", "dis", "tokenize", "keyword", "operator",
    "itertools", "bisect", "numbers", "math", "cmath", "ctypes", "multiprocessing", "concurrent.futures",
    "optparse", "getopt", "mailbox", "mimetypes", "netrc", "plistlib", "lzma", "bz2", "gzip", "zlib", "filecmp",
    "stat", "platform", "sysconfig", "site", "warnings", "traceback", "gc", "venv",
)
_SPLIT = re.compile(r"(?<=[.!?])\s+(?=[A-Z])")


def _is_sentence(s: str) -> bool:
    return (40 <= len(s) <= 200 and s[0].isupper() and s.endswith(".")
            and sum(c.isalpha() or c == " " for c in s) / len(s) > 0.85)


def _sentences_of(text: str):
    """The sentences of a text, in order (whitespace folded, each passing ``_is_sentence``)."""
    for s in _SPLIT.split(re.sub(r"\s+", " ", text)):
        s = s.strip()
        if _is_sentence(s):
            yield s


def _first(pool: list[str], n: int | None, what: str) -> list[str]:
    """The first ``n`` of ``pool`` (None: all), or ValueError naming ``n`` and the pool's size."""
    n = len(pool) if n is None else n
    if not 0 <= n <= len(pool):
        raise ValueError(f"n must be between 0 and {len(pool)} (the {what} sentences available), got {n}")
    return pool[:n]


def _docstrings(module) -> list[str]:
    docs = [module.__doc__ or ""]
    for name, obj in sorted(vars(module).items()):
        if not name.startswith("_") and (inspect.isfunction(obj) or inspect.isclass(obj)):
            if isinstance(obj.__doc__, str):
                docs.append(obj.__doc__)
    return docs


def labelled_sentences() -> list[tuple[str, str]]:
    """All ``(sentence, module)`` pairs, each sentence once (first module wins), sorted."""
    seen: dict[str, str] = {}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        for name in SOURCE_MODULES:
            try:
                module = importlib.import_module(name)
            except Exception:  # a module this Python build lacks
                continue
            for doc in _docstrings(module):
                for s in _sentences_of(doc):
                    seen.setdefault(s, name)
    return sorted(seen.items())


def split_sentences(n_calibration: int, n_heldout: int, seed: int = 0) -> tuple[list[str], list[str]]:
    """Two disjoint lists of real sentences: calibration and held-out."""
    if n_calibration < 0 or n_heldout < 0:
        raise ValueError("n_calibration and n_heldout must be >= 0")
    pool = [s for s, _ in labelled_sentences()]
    if n_calibration + n_heldout > len(pool):
        raise ValueError(f"asked for {n_calibration + n_heldout} sentences, only {len(pool)} available")
    random.Random(seed).shuffle(pool)
    return pool[:n_calibration], pool[n_calibration:n_calibration + n_heldout]


def reference_sentences(n: int | None, seed: int = 0) -> list[str]:
    """``n`` sentences (None: all of them) of another source than the docstrings: the language
    reference's help topics (``pydoc_data.topics``: what ``help("if")`` prints), none also a
    docstring sentence."""
    return _first(_reference_pool({s for s, _ in labelled_sentences()}, seed), n, "reference")


def _reference_pool(docstrings: set[str], seed: int) -> list[str]:
    from pydoc_data.topics import topics

    pool = sorted({s for text in topics.values() for s in _sentences_of(text) if s not in docstrings})
    random.Random(seed).shuffle(pool)
    return pool


# Prose files in the standard library's directory, read where this Python ships them (some
# distributions package IDLE separately): IDLE's manual, its news and readme, Python's license.
PROSE_FILES = ("idlelib/help.html", "idlelib/NEWS.txt", "idlelib/NEWS2x.txt", "idlelib/README.txt", "LICENSE.txt")


def prose_sentences(n: int | None = None, seed: int = 0) -> list[str]:
    """``n`` sentences (None: all of them) of other sources than the docstrings: every
    :func:`reference_sentences` one (in its order), then those of :data:`PROSE_FILES` (HTML tags
    dropped) in an order shuffled by ``seed``, none also a docstring or reference sentence."""
    docstrings = {s for s, _ in labelled_sentences()}
    reference = _reference_pool(docstrings, seed)
    taken = docstrings | set(reference)
    stdlib = Path(sysconfig.get_paths()["stdlib"])
    found = set()
    for name in PROSE_FILES:
        path = stdlib / name
        if not path.is_file():
            continue
        text = path.read_text(encoding="utf-8", errors="replace")
        if name.endswith(".html"):
            text = html.unescape(re.sub(r"<[^>]+>", " ", text))
        found.update(s for s in _sentences_of(text) if s not in taken)
    more = sorted(found)
    random.Random(seed).shuffle(more)
    return _first(reference + more, n, "prose")
