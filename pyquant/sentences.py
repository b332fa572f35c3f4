"""Real English sentences that ship with Python: the docstrings of standard
library modules and of their public functions and classes, and (a second,
different source) the prose of the language reference that ``help()`` shows.

Offline, deterministic for a given Python version, and real (written by
people, for people), which is what the model-quality evaluations need.
Each docstring sentence keeps the module it came from, so it can also label text tasks.
"""
from __future__ import annotations

import importlib
import inspect
import random
import re
import warnings

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
                for s in _SPLIT.split(re.sub(r"\s+", " ", doc)):
                    s = s.strip()
                    if _is_sentence(s):
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
    from pydoc_data.topics import topics

    docstrings = {s for s, _ in labelled_sentences()}
    found = set()
    for text in topics.values():
        for s in _SPLIT.split(re.sub(r"\s+", " ", text)):
            s = s.strip()
            if _is_sentence(s) and s not in docstrings:
                found.add(s)
    pool = sorted(found)
    n = len(pool) if n is None else n
    if not 0 <= n <= len(pool):
        raise ValueError(f"n must be between 0 and {len(pool)} (the reference sentences available), got {n}")
    random.Random(seed).shuffle(pool)
    return pool[:n]
