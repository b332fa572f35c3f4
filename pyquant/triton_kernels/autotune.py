"""Autotuning over a small config space, with the choice cached on disk.

The first call for a (kernel, shape, dtype, ...) key on a GPU times every
candidate config with ``triton.testing.do_bench`` and keeps the fastest; the
choice is written to ``<cache dir>/<gpu name>.json`` so the next process reuses
it without tuning. The cache dir is ``$PYQUANT_TRITON_CACHE_DIR`` or
``~/.cache/pyquant/triton``. ``PYQUANT_TRITON_AUTOTUNE=0`` skips tuning and uses
the heuristic defaults; so does the interpreter (timings there mean nothing).
"""
from __future__ import annotations

import dataclasses
import json
import logging
import os
import re
import tempfile
import threading
from pathlib import Path
from typing import Callable

from .gemm_dequant import GemmConfig
from .gemv_splitk import GemvConfig

log = logging.getLogger(__name__)

CONFIG_TYPES = {"gemv": GemvConfig, "gemm": GemmConfig}
MAX_GEMV_TOKENS = 16


def cache_dir() -> Path:
    env = os.environ.get("PYQUANT_TRITON_CACHE_DIR")
    return Path(env) if env else Path.home() / ".cache" / "pyquant" / "triton"


def tuning_enabled() -> bool:
    return os.environ.get("PYQUANT_TRITON_AUTOTUNE", "1") != "0"


def sanitize(name: str) -> str:
    """A GPU name as a file name: ``NVIDIA H100 80GB HBM3`` -> ``NVIDIA_H100_80GB_HBM3``."""
    return re.sub(r"[^A-Za-z0-9._-]+", "_", name).strip("_") or "unknown"


def m_bucket(m: int) -> int:
    """Token counts sharing a tuned config: powers of two, capped at 512."""
    return min(512, 1 << max(0, m - 1).bit_length())


# ---------------------------------------------------------------------------- config spaces

def gemv_space(bucket: int) -> list[GemvConfig]:
    """Block shapes for the GEMV at ``bucket`` tokens (split-K is added by :func:`with_splits`).

    FMA configs keep the ``[BLOCK_N, BLOCK_K, BLOCK_M]`` accumulator at 8K fp32
    values per 4 warps (64 registers a thread). ``tl.dot`` configs pad to 16 tokens;
    they are offered at every bucket because they also spare the ALUs the per-weight
    multiply-add, which can be the bottleneck of the FMA form even at one token.
    """
    out = []
    if bucket <= 8:
        for bk, warps in ((256, 4), (128, 4), (512, 8), (64, 4)):
            bn = (8192 * warps // 4) // (bk * bucket)
            if 16 <= bn <= 256:
                out.append(GemvConfig(block_n=bn, block_k=bk, num_warps=warps))
    out += [GemvConfig(block_n=bn, block_k=bk, use_dot=True, num_warps=w)
            for bn, bk, w in ((64, 128, 4), (128, 128, 4), (64, 256, 4), (128, 256, 8))]
    return out


def gemm_space(bucket: int) -> list[GemmConfig]:
    if bucket <= 32:
        shapes = ((32, 64, 128, 4, 4), (32, 128, 64, 4, 4), (32, 128, 128, 4, 3), (32, 256, 64, 8, 3))
    elif bucket <= 64:
        shapes = ((64, 64, 128, 4, 4), (64, 128, 64, 4, 3), (64, 128, 128, 8, 3), (64, 256, 64, 8, 3))
    else:
        shapes = ((128, 128, 64, 8, 3), (128, 256, 64, 8, 3), (64, 256, 64, 8, 3), (128, 64, 64, 4, 4),
                  (256, 128, 64, 8, 3))
    return [GemmConfig(block_m=bm, block_n=bn, block_k=bk, num_warps=w, num_stages=s) for bm, bn, bk, w, s in shapes]


def heuristic_split(n: int, k4: int, cfg: GemvConfig, sms: int) -> int:
    """Split K until there are about two programs per SM, keeping >= 2 K steps per split."""
    n_blocks = -(-n // cfg.block_n)
    steps = max(1, -(-k4 // (cfg.block_k // 4)))
    split = 1
    while n_blocks * split * 2 <= 2 * sms and split * 2 * 2 <= steps:
        split *= 2
    return split


def with_splits(cfgs: list[GemvConfig], n: int, k4: int, sms: int) -> list[GemvConfig]:
    """Each block shape with its heuristic split and the neighbours (half, double)."""
    out = []
    for c in cfgs:
        s = heuristic_split(n, k4, c, sms)
        for split in sorted({max(1, s // 2), s, s * 2}):
            out.append(dataclasses.replace(c, split_k=split))
    return out


def default_gemv(m: int, n: int, k4: int, sms: int) -> GemvConfig:
    """Untuned choice: FMA for 1-2 tokens, ``tl.dot`` above."""
    cfg = gemv_space(m_bucket(m))[0] if m <= 2 else GemvConfig(block_n=64, block_k=128, use_dot=True)
    return dataclasses.replace(cfg, split_k=heuristic_split(n, k4, cfg, sms))


def default_gemm(m: int) -> GemmConfig:
    return GemmConfig(64, 64, 64, num_warps=4) if m <= 64 else GemmConfig(128, 128, 64, num_warps=8)


# ---------------------------------------------------------------------------- the tuner

def _do_bench(fn: Callable[[], object]) -> float:
    import triton.testing

    return triton.testing.do_bench(fn, warmup=5, rep=20)


class Autotuner:
    """Chosen configs for one GPU, mirrored in a JSON file.

    ``bench(fn) -> ms`` times a candidate (``do_bench`` by default; tests pass a fake).
    """

    def __init__(self, path: Path, bench: Callable[[Callable[[], object]], float] | None = None):
        self.path = Path(path)
        self.bench = bench or _do_bench
        self.tunings = 0  # how many keys this instance had to tune (not found on disk)
        self._choices: dict[str, dict] | None = None
        self._lock = threading.Lock()

    def _load(self) -> dict[str, dict]:
        if self._choices is None:
            try:
                self._choices = json.loads(self.path.read_text())
            except FileNotFoundError:
                self._choices = {}
            except (OSError, ValueError) as e:  # a corrupt cache costs a re-tune, not a crash
                log.warning("ignoring unreadable autotune cache %s: %s", self.path, e)
                self._choices = {}
        return self._choices

    def lookup(self, kind: str, key: str):
        entry = self._load().get(f"{kind}|{key}")
        if entry is None:
            return None
        try:
            return CONFIG_TYPES[kind](**entry)
        except (TypeError, ValueError) as e:  # written by an older version of the configs
            log.warning("ignoring stale autotune entry %s|%s: %s", kind, key, e)
            return None

    def _save(self, kind: str, key: str, cfg) -> None:
        # Merge with what other processes wrote since we read, then replace atomically.
        self.path.parent.mkdir(parents=True, exist_ok=True)
        try:
            on_disk = json.loads(self.path.read_text())
        except (OSError, ValueError):
            on_disk = {}
        on_disk.update(self._load())
        on_disk[f"{kind}|{key}"] = dataclasses.asdict(cfg)
        fd, tmp = tempfile.mkstemp(dir=self.path.parent, prefix=self.path.name, suffix=".tmp")
        with os.fdopen(fd, "w") as f:
            json.dump(on_disk, f, indent=1, sort_keys=True)
        os.replace(tmp, self.path)
        self._choices = on_disk

    def choose(self, kind: str, key: str, candidates: list, run: Callable[[object], object]):
        """The cached config for ``key``, else the fastest of ``candidates`` (timed
        with ``run(cfg)``), which is then cached."""
        with self._lock:
            hit = self.lookup(kind, key)
            if hit is not None:
                return hit
            timed = []
            for cfg in candidates:
                try:
                    run(cfg)  # compile outside the timing
                    timed.append((self.bench(lambda cfg=cfg: run(cfg)), cfg))
                except Exception as e:  # e.g. out of shared memory on this GPU: skip the config
                    log.debug("autotune %s|%s: %s failed: %s", kind, key, cfg, e)
            if not timed:
                raise RuntimeError(f"autotune {kind}|{key}: every candidate config failed")
            best = min(timed, key=lambda t: t[0])[1]
            log.info("autotune %s|%s -> %s", kind, key, best)
            self.tunings += 1
            self._save(kind, key, best)
            return best


_tuners: dict[str, Autotuner] = {}


def tuner_for(gpu_name: str) -> Autotuner:
    """The process-wide tuner for one GPU model (file ``<cache dir>/<gpu name>.json``)."""
    path = cache_dir() / f"{sanitize(gpu_name)}.json"
    key = str(path)
    if key not in _tuners:
        _tuners[key] = Autotuner(path)
    return _tuners[key]
