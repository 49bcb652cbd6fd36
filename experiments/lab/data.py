"""Data that needs no download: byte corpora, random/fixed training windows and two synthetic probes.

* ``stdlib_corpus()``: the running interpreter's standard-library ``.py`` sources (found through ``sysconfig``),
  tests and generated files left out, files in sorted order, split into train/validation *by file* with a
  hash of the relative path. ``Corpus.checksum`` lets two runs check that they trained on the same bytes.
* ``file_corpus(path)``: any local byte file, e.g. enwik8 (first 90M / next 5M / last 5M bytes when the file is
  exactly 10^8 bytes, else 90 / 5 / 5 %).
* ``LMTask``: next-byte prediction on random windows of a corpus (drawn from a seeded ``torch.Generator``),
  validated on fixed, evenly spaced windows.
* ``associative_recall`` (multi-query associative recall, Zoology's MQAR, two tokens per pair: needs an
  induction head), ``pair_recall`` (the same with one token per pair: a one-hop lookup that probes retrieval
  capacity within CPU minutes) and ``lookback`` (copy the token a fixed distance back: only *position*
  identifies the answer), wrapped as ``SyntheticTask``.

Every batch is ``(x, y)``: inputs (B, N) int64 bytes and targets (B, N) int64, ``IGNORE`` (-100) where no
prediction is scored. Shape legend: B batch, N sequence length.
"""

from __future__ import annotations

import hashlib
import platform
import re
import sysconfig
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import Tensor

from .checks import check_int

__all__ = ["IGNORE", "Corpus", "stdlib_files", "is_validation_file", "stdlib_corpus", "file_corpus", "load_corpus",
           "unigram_bits", "random_windows", "fixed_windows", "associative_recall", "pair_recall",
           "pair_recall_distances", "lookback", "LMTask", "SyntheticTask", "SYNTHETIC_TASKS"]

IGNORE = -100  # target value that F.cross_entropy(ignore_index=-100) skips
ENWIK8_BYTES = 100_000_000
_EXCLUDED_DIRS = {"test", "tests", "idle_test", "site-packages", "dist-packages", "__pycache__"}
# Generated sources (codec tables, Sphinx topic dumps, token/keyword lists) say so in their first lines; they
# are data, not code, and the 750 kB pydoc topics file would dominate the validation split.
_GENERATED = re.compile(rb"(?i)(auto-?generated|automatically generated|generated (from|by|and used)"
                        rb"|this file is generated|do not edit)")


@dataclass
class Corpus:
    """Byte splits as uint8 tensors (1-D), with a name, the number of files per split and a checksum."""

    name: str
    train: Tensor
    val: Tensor
    test: Tensor | None = None
    files: tuple[int, int] | None = None  # (train files, validation files) for a file-split corpus
    checksum: str = ""                     # sha256 of train + val (+ test) bytes, first 16 hex digits
    source: str | None = None              # the file it was read from; None for the stdlib corpus

    @property
    def nbytes(self) -> int:
        return sum(t.numel() for t in (self.train, self.val, self.test) if t is not None)

    def describe(self) -> str:
        files = f", {self.files[0]}/{self.files[1]} files" if self.files else ""
        return (f"corpus {self.name}: {self.nbytes:,} bytes (train {self.train.numel():,}, val {self.val.numel():,}"
                f"{files}), sha256 {self.checksum}")


def _digest(*parts: bytes) -> str:
    h = hashlib.sha256()
    for p in parts:
        h.update(p)
    return h.hexdigest()[:16]


def _to_tensor(b: bytes) -> Tensor:
    return torch.frombuffer(bytearray(b), dtype=torch.uint8) if b else torch.zeros(0, dtype=torch.uint8)


def _is_generated(path: Path) -> bool:
    with open(path, "rb") as f:
        head = b"".join(f.readline() for _ in range(3))
    return bool(_GENERATED.search(head)) or path.name.startswith("_sysconfigdata")


def stdlib_files(root: str | Path | None = None) -> list[Path]:
    """The ``.py`` files under ``root`` (default: ``sysconfig``'s stdlib directory), relative and sorted, leaving
    out test directories, ``test_*.py``, installed packages and generated files."""
    root = Path(root if root is not None else sysconfig.get_paths()["stdlib"])
    if not root.is_dir():
        raise ValueError(f"root: not a directory: {root}")
    out = []
    for path in root.rglob("*.py"):
        rel = path.relative_to(root)
        if _EXCLUDED_DIRS.intersection(rel.parts[:-1]) or rel.name.startswith("test_") or not path.is_file():
            continue
        if not _is_generated(path):
            out.append(rel)
    return sorted(out, key=lambda p: p.as_posix())


def is_validation_file(rel: Path | str, val_percent: int = 10) -> bool:
    """Deterministic split by file: sha256 of the relative POSIX path, modulo 100, below ``val_percent``."""
    key = Path(rel).as_posix().encode()
    return int.from_bytes(hashlib.sha256(key).digest()[:8], "big") % 100 < val_percent


def stdlib_corpus(root: str | Path | None = None, val_percent: int = 10) -> Corpus:
    """The standard library's own sources as a byte corpus (see the module docstring). about 10 MB on CPython 3.11."""
    if not 0 < val_percent < 100:
        raise ValueError(f"val_percent: expected 0 < val_percent < 100, got {val_percent!r}")
    root = Path(root if root is not None else sysconfig.get_paths()["stdlib"])
    files = stdlib_files(root)
    splits: dict[bool, list[bytes]] = {False: [], True: []}
    for rel in files:
        splits[is_validation_file(rel, val_percent)].append((root / rel).read_bytes())
    train, val = b"".join(splits[False]), b"".join(splits[True])
    if not train or not val:
        raise ValueError(f"root: found too few source files under {root} to split ({len(files)})")
    return Corpus(f"stdlib-py{platform.python_version()}", _to_tensor(train), _to_tensor(val), None,
                  (len(splits[False]), len(splits[True])), _digest(train, val))


def file_corpus(path: str | Path) -> Corpus:
    """A local byte file split 90M/5M/5M (enwik8, exactly 10^8 bytes) or 90/5/5 % (anything else)."""
    path = Path(path)
    if not path.is_file():
        raise ValueError(f"data: no such file: {path}")
    raw = path.read_bytes()
    n = len(raw)
    if n == ENWIK8_BYTES:
        a, b = 90_000_000, 95_000_000
    else:
        a, b = int(n * 0.90), int(n * 0.95)
    if min(a, b - a, n - b) < 2:
        raise ValueError(f"data: {path} has {n} bytes, too few for a 90/5/5 split")
    return Corpus(path.name, _to_tensor(raw[:a]), _to_tensor(raw[a:b]), _to_tensor(raw[b:]), None, _digest(raw),
                  str(path.resolve()))


def debian_man_corpus(package: str = "manpages-dev", val_percent: int = 10) -> Corpus:
    """The manual pages a Debian package installed here (``dpkg -L``; roff source, decompressed), split by file
    as ``stdlib_corpus`` splits: English technical prose with markup, a different domain from Python code.
    ``manpages-dev`` (the Linux programmer's manual, sections 2 and 3): about 900 pages, 4.9 MB. Nothing is
    downloaded; a machine without the package gets an error naming it (``apt-get install manpages-dev``)."""
    import gzip
    import subprocess
    try:
        listed = subprocess.run(["dpkg", "-L", package], capture_output=True, text=True, check=True).stdout
    except (OSError, subprocess.CalledProcessError):
        raise ValueError(f"data: the Debian package {package!r} is not installed here (apt-get install {package})"
                         ) from None
    files = sorted(p for p in listed.split() if p.startswith("/usr/share/man/man") and p.endswith(".gz")
                   and Path(p).is_file() and not Path(p).is_symlink())
    splits: dict[bool, list[bytes]] = {False: [], True: []}
    for f in files:
        splits[is_validation_file(Path(f).name, val_percent)].append(gzip.decompress(Path(f).read_bytes()))
    train, val = b"".join(splits[False]), b"".join(splits[True])
    if not train or not val:
        raise ValueError(f"data: the package {package!r} installed too few manual pages to split ({len(files)})")
    return Corpus(f"debian-{package}", _to_tensor(train), _to_tensor(val), None,
                  (len(splits[False]), len(splits[True])), _digest(train, val), f"debian:{package}")


def load_corpus(path: str | Path | None = None) -> Corpus:
    """``stdlib_corpus()`` for None, ``debian_man_corpus(package)`` for 'debian:PACKAGE', else
    ``file_corpus(path)``."""
    if path is None:
        return stdlib_corpus()
    if str(path).startswith("debian:"):
        return debian_man_corpus(str(path).split(":", 1)[1])
    return file_corpus(path)


def unigram_bits(data: Tensor) -> float:
    """Entropy of the byte distribution of ``data`` in bits: the bits per byte of a model that learned only
    byte frequencies. A language model stuck near it has learned nothing about context."""
    p = torch.bincount(data.long(), minlength=256).double() / max(data.numel(), 1)
    p = p[p > 0]
    return float(-(p * p.log2()).sum())


def random_windows(data: Tensor, length: int, batch_size: int, generator: torch.Generator) -> tuple[Tensor, Tensor]:
    """``batch_size`` windows of ``length + 1`` bytes at uniform random offsets: x (B, N), y (B, N) = x shifted."""
    if data.numel() < length + 2:
        raise ValueError(f"length: {length} does not fit in a split of {data.numel()} bytes")
    starts = torch.randint(0, data.numel() - length - 1, (batch_size,), generator=generator)
    w = data[starts[:, None] + torch.arange(length + 1)].long()  # (B, N + 1)
    return w[:, :-1], w[:, 1:]


def fixed_windows(data: Tensor, length: int, count: int) -> tuple[Tensor, Tensor]:
    """``count`` evenly spaced windows over ``data`` (the same every call): x (count, N), y (count, N)."""
    if data.numel() < length + 2:
        raise ValueError(f"length: {length} does not fit in a split of {data.numel()} bytes")
    starts = torch.linspace(0, data.numel() - length - 1, count).long()
    w = data[starts[:, None] + torch.arange(length + 1)].long()
    return w[:, :-1], w[:, 1:]


# ------------------------------------------------------------------------------------------- synthetic tasks
def associative_recall(batch_size: int, length: int, num_pairs: int, generator: torch.Generator,
                       vocab: int = 256) -> tuple[Tensor, Tensor]:
    """Multi-query associative recall (MQAR, Arora et al. 2023, "Zoology").

    Each sequence starts with ``num_pairs`` key-value pairs ``k1 v1 k2 v2 ...`` (distinct keys from the lower half
    of the vocabulary, values from the upper half), then fills the rest of ``length`` with queries ``k v``: keys
    drawn from the pairs with replacement, each followed by its value. The target after a query key is its
    value; nothing else is scored. Chance accuracy is ``2 / vocab``; solving it needs content-based lookup
    over the whole context, the classic weakness of linear attention. It first needs an induction head (a
    previous-token head feeding a matching head), which small models form only after thousands of steps: a
    2-layer, 64-wide softmax model had not after 2500 steps of 32 sequences (4 pairs); see ``pair_recall``.
    """
    if num_pairs < 1 or num_pairs > vocab // 2 or length < 2 * num_pairs + 2:
        raise ValueError(f"num_pairs: need 1 <= num_pairs <= {vocab // 2} and length >= 2 * num_pairs + 2, "
                         f"got num_pairs={num_pairs}, length={length}")
    B, P, half = batch_size, num_pairs, vocab // 2
    keys = torch.rand(B, half, generator=generator).argsort(-1)[:, :P]            # (B, P) distinct keys
    values = half + torch.randint(0, half, (B, P), generator=generator)         # (B, P)
    Q = (length - 2 * P) // 2
    pick = torch.randint(0, P, (B, Q), generator=generator)                     # (B, Q) which pair is queried
    qk, qv = keys.gather(1, pick), values.gather(1, pick)
    seq = torch.stack((torch.cat((keys, qk), 1), torch.cat((values, qv), 1)), -1).flatten(1)  # (B, 2P + 2Q)
    seq = torch.cat((seq, seq.new_zeros(B, length - seq.shape[1])), 1)          # odd length: one pad byte
    y = torch.full_like(seq, IGNORE)
    y[:, 2 * P:2 * (P + Q):2] = qv                                              # at each query key: its value
    return seq, y


def pair_recall(batch_size: int, length: int, num_pairs: int, generator: torch.Generator, keys: int = 32,
                values: int = 4) -> tuple[Tensor, Tensor]:
    """One-hop multi-query associative recall: each key-value pair is *one* token, then queries.

    The context holds ``num_pairs`` tokens ``key * values + value`` (distinct keys, values uniform), the rest of
    ``length`` is query tokens ``128 + key`` for keys of the context (with replacement); the target at a query is
    the context's pair token with that key. Unlike ``associative_recall`` no induction head is needed (the
    lookup is one attention hop), so a tiny model learns it in a few hundred steps and what is left is the
    retrieval capacity of the attention, which falls for linear attention as pairs are added. Chance is
    ``1 / (keys * values)``; knowing the key but not the value gives ``1 / values``.
    """
    if not (1 <= num_pairs <= keys and keys * values <= 128 and keys <= 128 and length > num_pairs):
        raise ValueError(f"num_pairs: need 1 <= num_pairs <= keys, keys * values <= 128 and length > num_pairs, got "
                         f"num_pairs={num_pairs}, keys={keys}, values={values}, length={length}")
    B, P = batch_size, num_pairs
    k = torch.rand(B, keys, generator=generator).argsort(-1)[:, :P]              # (B, P) distinct keys
    pairs = k * values + torch.randint(0, values, (B, P), generator=generator)   # (B, P) pair tokens < 128
    pick = torch.randint(0, P, (B, length - P), generator=generator)             # which pair each query asks for
    x = torch.cat((pairs, 128 + k.gather(1, pick)), 1)                           # (B, N)
    y = torch.full_like(x, IGNORE)
    y[:, P:] = pairs.gather(1, pick)
    return x, y


def pair_recall_distances(x: Tensor, num_pairs: int, values: int = 4) -> Tensor:
    """For ``pair_recall`` sequences x (B, N): the distance from each query to the pair token it asks for (B, N),
    -1 at the pair tokens themselves (the scored positions are exactly those >= 1)."""
    P = num_pairs
    keys = x[:, :P] // values                                                   # (B, P): the pairs' keys
    j = (x[:, P:, None] - 128 == keys[:, None, :]).to(torch.uint8).argmax(-1)   # (B, N - P): the pair asked for
    dist = torch.full_like(x, -1)
    dist[:, P:] = torch.arange(P, x.shape[1], device=x.device) - j
    return dist


def lookback(batch_size: int, length: int, distance: int, generator: torch.Generator,
             symbols: int = 16) -> tuple[Tensor, Tensor]:
    """Copy the token ``distance`` places back: x is random symbols, the target at position m is x[m - distance].

    Content carries no hint of which earlier token to copy; only its position relative to the current one
    (or both absolute positions) singles it out, so this task separates position schemes quickly. Positions
    m < distance are not scored. Chance accuracy is ``1 / symbols``.
    """
    if not 1 <= distance < length or not 2 <= symbols <= 256:
        raise ValueError(f"distance: need 1 <= distance < length and 2 <= symbols <= 256, got distance={distance}, "
                         f"length={length}, symbols={symbols}")
    x = torch.randint(0, symbols, (batch_size, length), generator=generator)  # (B, N)
    y = torch.full_like(x, IGNORE)
    y[:, distance:] = x[:, :-distance]                                         # y_m = x_{m - distance}
    return x, y


SYNTHETIC_TASKS = {"mqar": associative_recall, "pair-recall": pair_recall, "lookback": lookback}


class LMTask:
    """Next-byte prediction on ``corpus``: random training windows, ``eval_windows`` fixed validation windows."""

    metric = "bpb"

    def __init__(self, corpus: Corpus, length: int, eval_windows: int = 16):
        check_int("length", length)
        self.corpus, self.length, self.eval_windows = corpus, length, eval_windows
        self.unigram_bits = unigram_bits(corpus.train)
        fixed_windows(corpus.val, length, 1)  # fail now, not after training, if the split is too short

    def describe(self) -> dict:
        c = self.corpus
        return {"kind": "lm", "length": self.length, "corpus": c.name, "checksum": c.checksum, "data": c.source,
                "eval_windows": self.eval_windows, "unigram_bits": self.unigram_bits}

    def train_batch(self, batch_size: int, generator: torch.Generator) -> tuple[Tensor, Tensor]:
        return random_windows(self.corpus.train, self.length, batch_size, generator)

    def val_batch(self, length: int | None = None) -> tuple[Tensor, Tensor]:
        return fixed_windows(self.corpus.val, length or self.length, self.eval_windows)


class SyntheticTask:
    """A synthetic task of ``SYNTHETIC_TASKS`` (``name``) with fixed keyword arguments; validation is a fixed
    batch of ``eval_windows`` sequences drawn from its own fixed seed ``val_seed``."""

    metric = "accuracy"
    unigram_bits = None

    def __init__(self, name: str, length: int, eval_windows: int = 256, val_seed: int = 2**31 - 1, **kwargs):
        if name not in SYNTHETIC_TASKS:
            raise ValueError(f"name: expected one of {sorted(SYNTHETIC_TASKS)}, got {name!r}")
        self.name, self.length, self.kwargs, self.eval_windows = name, length, kwargs, eval_windows
        self.val_seed = val_seed
        self.make = SYNTHETIC_TASKS[name]
        self.make(1, length, generator=torch.Generator().manual_seed(0), **kwargs)  # validate the arguments now

    def describe(self) -> dict:
        return {"kind": self.name, "length": self.length, "eval_windows": self.eval_windows,
                "val_seed": self.val_seed, **self.kwargs}

    def train_batch(self, batch_size: int, generator: torch.Generator) -> tuple[Tensor, Tensor]:
        return self.make(batch_size, self.length, generator=generator, **self.kwargs)

    def val_batch(self, length: int | None = None) -> tuple[Tensor, Tensor]:
        g = torch.Generator().manual_seed(self.val_seed)
        return self.make(self.eval_windows, length or self.length, generator=g, **self.kwargs)
