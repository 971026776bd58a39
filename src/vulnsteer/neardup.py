"""Near-duplicate code: MinHash over normalised token shingles, banded for LSH, so that the same function renamed,
re-wrapped or with another constant is recognised as the same evidence across pair ids, splits and datasets.

Normalisation drops comments and white space and replaces variable names, numbers and string literals by a
placeholder; keywords, operators and called names (an identifier before `(`: the API a flaw hinges on) stay.
Items are compared by the set of their SHINGLE-token runs. Two items are near-duplicates when one of BANDS bands
of ROWS MinHash values agrees entirely: the chance is 1 - (1 - J^ROWS)^BANDS for shingle-set Jaccard J, i.e.
0.95 at J = 0.8, 0.9997 at J = 0.9, 0.24 at J = 0.6 and 0.06 at J = 0.5. The threshold sits at about 0.7-0.8
and errs towards merging: merging two distinct items costs a little power, missing a copy leaks a test item.
Every band is a leak key (`protocol.leak_keys`), so one relation (sharing a key) groups folds, checks held-out-ness
and compares with a vector file's stored keys. Fixed seeds: the same code gives the same keys on every machine.
"""

from __future__ import annotations

import hashlib
import re
from functools import lru_cache

import numpy as np

SHINGLE = 5
BANDS = 16
ROWS = 8
_PRIME = 4294967291  # the largest prime below 2^32: (a * x + b) mod p over 32-bit hashes is exact in uint64
_PARAMS = np.random.default_rng(20260529).integers(1, _PRIME, size=(2, BANDS * ROWS), dtype=np.uint64)

_COMMENT = re.compile(r"/\*.*?\*/|//[^\n]*", re.S)
_TOKEN = re.compile(r"\"(?:\\.|[^\"\\\n])*\"|'(?:\\.|[^'\\\n])*'|[A-Za-z_]\w*|\d[\w.]*|\S")
KEYWORDS = frozenset(
    """
    auto bool break case catch char class const continue default def del delete do double elif else enum except
    extern false final finally float for from func go goto if import in int interface is lambda long new nil none
    not null nullptr or pass private protected public raise register return self short signed sizeof static
    struct super switch this throw throws true try typedef union unsigned var void volatile while with yield
    and as assert async await elif global nonlocal package range string None True False
""".split()
)


def tokens(code: str) -> list[str]:
    """The code's tokens with variable names, numbers and literals abstracted (see the module docstring)."""
    found = _TOKEN.findall(_COMMENT.sub(" ", code))
    out = []
    for i, token in enumerate(found):
        if token[0] in "\"'":
            out.append('"')
        elif token[0].isdigit():
            out.append("0")
        elif (token[0].isalpha() or token[0] == "_") and token not in KEYWORDS:
            out.append(token if i + 1 < len(found) and found[i + 1] == "(" else "v")
        else:
            out.append(token)
    return out


def shingles(code: str) -> set[str]:
    """Runs of SHINGLE tokens (the whole token list when it is shorter)."""
    toks = tokens(code)
    if len(toks) <= SHINGLE:
        return {" ".join(toks)} if toks else set()
    return {" ".join(toks[i : i + SHINGLE]) for i in range(len(toks) - SHINGLE + 1)}


def jaccard(a: str, b: str) -> float:
    """Shingle-set Jaccard similarity of two pieces of code: what the bands estimate (for tests and docs)."""
    x, y = shingles(a), shingles(b)
    return len(x & y) / len(x | y) if x | y else 1.0


def signature(code: str) -> np.ndarray | None:
    """BANDS * ROWS MinHash values of the code's shingles; None for code without tokens."""
    found = shingles(code)
    if not found:
        return None
    hashed = np.array(
        [int.from_bytes(hashlib.blake2b(s.encode(), digest_size=4).digest(), "little") % _PRIME for s in found],
        dtype=np.uint64,
    )
    a, b = _PARAMS
    return ((a[:, None] * hashed[None, :] + b[:, None]) % np.uint64(_PRIME)).min(axis=1)


@lru_cache(maxsize=65536)
def band_keys(code: str) -> tuple[str, ...]:
    """One key per band of the code's MinHash signature: code that shares one is a near-duplicate. Cached: the
    protocol asks for an item's keys at every check."""
    sig = signature(code)
    if sig is None:
        return ()
    return tuple(f"band{j}\0{sig[j * ROWS : (j + 1) * ROWS].tobytes().hex()}" for j in range(BANDS))
