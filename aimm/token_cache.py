"""On-disk cache of tokenised texts, keyed by fingerprint, through Hugging Face ``datasets``.

:mod:`aimm.encoding` tokenises every stage's training examples, its memory buffer and every
evaluated test split. :func:`cached_encode` stores each such list of token ids (and which rows
were truncated) as one Arrow file ``<cache>/tokenized/<key>.arrow``, written by
``datasets.Dataset.map(..., cache_file_name=..., new_fingerprint=key)``; the next call with the
same key loads that file instead of tokenising again (within a run: the test splits, evaluated
after every stage; across runs: everything).

The key (:func:`cache_key`) is a SHA-256 of everything the ids depend on: the texts, the
tokenizer (:func:`tokenizer_fingerprint`), the encoding parameters the caller passes
(``is_seq2seq``, max length, truncation mode, EOS id, ...) and :data:`ENCODING_VERSION`.

* Where: ``$AIMM_CACHE/tokenized`` (default ``~/.cache/aimm/tokenized``); clear it with
  ``rm -rf`` at any time.
* Off: ``AIMM_TOKEN_CACHE=0`` (or ``false`` / ``no`` / ``off``). An environment variable, not a
  run-config field: the cache never changes a result, so it is no run parameter.
* Fewer than :data:`MIN_CACHED` texts are not cached (the look-up costs more than it saves).
* Safety: ``datasets`` writes a temporary file in the cache folder and renames it into place, so
  a reader sees a whole file or none; concurrent runs writing the same key write identical
  files. A file that cannot be read, or whose rows or columns do not match (row count, column
  names and types, nulls, token ids outside ``[0, len(tokenizer))``, the texts' digests), is
  deleted and rebuilt; a cache that cannot be written only costs the saving. Errors of the tokenisation
  itself propagate unchanged.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import os
import tempfile
import weakref
from pathlib import Path
from typing import Callable, Sequence

from aimm.models import cache_root

log = logging.getLogger(__name__)

#: Bump whenever :mod:`aimm.encoding` changes how ids are made: old cache files then go unused.
ENCODING_VERSION = 2
#: Fewer texts than this are tokenised directly (see README, "Tokenisation cache").
MIN_CACHED = 64
ENV_SWITCH = "AIMM_TOKEN_CACHE"
_OFF = ("0", "false", "no", "off")
# a short text touching bytes, digits, case, spaces and non-ASCII: part of the cheap check that
# a memoised tokenizer fingerprint still describes the tokenizer
_PROBE = "Probe: 0123 ÄÖü ñ 漢字 <|im_end|> \t\n  x  Don't stop;"

Encoded = tuple[list[list[int]], list[bool]]  # ids per text, truncated or not


def enabled() -> bool:
    """False when ``$AIMM_TOKEN_CACHE`` is 0 / false / no / off."""
    return os.environ.get(ENV_SWITCH, "").strip().lower() not in _OFF


def cache_dir() -> Path:
    """``$AIMM_CACHE/tokenized`` (default ``~/.cache/aimm/tokenized``)."""
    return cache_root() / "tokenized"


def _sha(*parts: bytes) -> "hashlib._Hash":
    h = hashlib.sha256()
    for part in parts:
        h.update(len(part).to_bytes(8, "little"))
        h.update(part)
    return h


def _cheap_state(tokenizer) -> str:
    """What a memoised fingerprint is checked against: sizes, special tokens, the pipeline's
    small components and the ids of a probe text (catches swapped vocabularies and models)."""
    backend = getattr(tokenizer, "backend_tokenizer", None)
    parts = [type(tokenizer).__qualname__, str(getattr(tokenizer, "name_or_path", "")),
             repr(getattr(tokenizer, "special_tokens_map", None)),
             repr(getattr(tokenizer, "split_special_tokens", None)), str(len(tokenizer)),
             repr(tokenizer.encode(_PROBE, add_special_tokens=False))]
    if backend is not None:
        model = backend.model
        parts += [repr(backend.normalizer), repr(backend.pre_tokenizer),
                  repr(backend.post_processor), type(model).__name__,
                  repr(sorted((a, repr(getattr(model, a))) for a in dir(model)
                              if not a.startswith("_") and not callable(getattr(model, a))))]
    return "\x00".join(parts)


def _full_fingerprint(tokenizer) -> str | None:
    """SHA-256 of the whole tokenizer: the fast tokenizer's JSON, else its saved files."""
    backend = getattr(tokenizer, "backend_tokenizer", None)
    head = [type(tokenizer).__qualname__.encode(), str(tokenizer.name_or_path).encode(),
            repr(tokenizer.special_tokens_map).encode(),
            repr(getattr(tokenizer, "split_special_tokens", None)).encode()]
    if backend is not None:
        return _sha(*head, backend.to_str().encode()).hexdigest()
    with tempfile.TemporaryDirectory() as tmp:
        tokenizer.save_pretrained(tmp)
        files = sorted(Path(tmp).rglob("*"))
        return _sha(*head, *(f.relative_to(tmp).as_posix().encode() + b"\x00" + f.read_bytes()
                             for f in files if f.is_file())).hexdigest()


_memo: "weakref.WeakKeyDictionary[object, tuple[str, str]]" = weakref.WeakKeyDictionary()


def tokenizer_fingerprint(tokenizer) -> str | None:
    """SHA-256 of the tokenizer (class, name, special tokens, vocabulary, merges, normalizer,
    pre-tokenizer, ...); None for an object that is no ``transformers`` tokenizer (not cached).

    Hashing the fast tokenizer's JSON takes ~0.07 s, so the result is memoised per tokenizer
    object and reused while :func:`_cheap_state` (sizes, special tokens, pipeline components,
    the ids of a probe text) is unchanged."""
    if not all(hasattr(tokenizer, a) for a in ("encode", "name_or_path", "save_pretrained",
                                                 "special_tokens_map", "__len__")):
        return None
    state = _cheap_state(tokenizer)
    memo = _memo.get(tokenizer)
    if memo is not None and memo[0] == state:
        return memo[1]
    full = _full_fingerprint(tokenizer)
    _memo[tokenizer] = (state, full)
    return full


def cache_key(texts: Sequence[str], tokenizer_fp: str, params: dict) -> str:
    """SHA-256 (hex) of the texts, the tokenizer fingerprint, ``params`` and the code version."""
    head = json.dumps({"version": ENCODING_VERSION, "tokenizer": tokenizer_fp, **params},
                      sort_keys=True).encode()
    return _sha(head, *(t.encode("utf-8", "surrogatepass") for t in texts)).hexdigest()


@contextlib.contextmanager
def _quiet_datasets():
    """No "Map: 100%" bar from ``datasets`` (its switch is global: restored afterwards)."""
    from datasets.utils import disable_progress_bars, enable_progress_bars, are_progress_bars_disabled

    was_off = are_progress_bars_disabled()
    disable_progress_bars()
    try:
        yield
    finally:
        if not was_off:
            enable_progress_bars()


def _text_check(text: str) -> int:
    """A 32-bit digest of one text, stored beside its ids: a file of other texts (same length
    and columns, e.g. copied or renamed) is never taken for this one."""
    return int.from_bytes(hashlib.sha256(text.encode("utf-8")).digest()[:4], "little", signed=True)


def _columns(dataset, texts: Sequence[str], vocab_size: int) -> Encoded:
    """``ids`` and ``cut`` columns of a cached dataset as Python lists, checked: ``n`` rows of
    the columns ``ids`` (lists of integers in ``[0, vocab_size)``), ``cut`` (booleans) and
    ``check`` (integers, :func:`_text_check` of each text), no nulls. Any mismatch raises
    ``ValueError`` (the caller then deletes and rebuilds the file)."""
    import pyarrow as pa

    table = dataset.data.table
    if dataset.num_rows != len(texts) or table.column_names != ["ids", "cut", "check"]:
        raise ValueError(f"expected {len(texts)} rows of ids, cut, check; found {dataset.num_rows} "
                         f"rows of {', '.join(table.column_names)}")
    types = {name: table.schema.field(name).type for name in table.column_names}
    ids_type = types["ids"]
    if not ((pa.types.is_list(ids_type) or pa.types.is_large_list(ids_type))
            and pa.types.is_integer(ids_type.value_type)
            and pa.types.is_boolean(types["cut"]) and pa.types.is_integer(types["check"])):
        raise ValueError("expected columns ids: list of integers, cut: bool, check: integer; found "
                         + ", ".join(f"{name}: {kind}" for name, kind in types.items()))
    ids = table.column("ids").combine_chunks()
    values = ids.flatten()  # the ids the rows hold (a sliced array's values without the rest)
    if table.column("cut").null_count or table.column("check").null_count or ids.null_count \
            or values.null_count:
        raise ValueError("the file holds null values")
    if len(values):
        flat_np = values.to_numpy()
        low, high = flat_np.min(), flat_np.max()
        if low < 0 or high >= vocab_size:
            raise ValueError(f"token ids out of range: {int(low)} to {int(high)}, the tokenizer has "
                             f"{vocab_size} tokens")
    if table.column("check").to_pylist() != [_text_check(t) for t in texts]:
        raise ValueError("the file holds the ids of other texts")
    flat = ids.values.to_numpy().tolist()
    offsets = ids.offsets.to_numpy().tolist()
    rows = [flat[a:b] for a, b in zip(offsets[:-1], offsets[1:])]
    return rows, table.column("cut").to_pylist()


def _map(texts: Sequence[str], key: str, path: Path, compute: Callable[[list[str]], Encoded],
         reuse: bool, failures: list, vocab_size: int) -> Encoded:
    """``datasets``' fingerprint cache: load ``path`` when ``reuse`` and it exists, else
    ``compute`` (batch by batch) and write it; either way checked by :func:`_columns`. Errors
    of ``compute`` land in ``failures``."""
    from datasets import Dataset, Features, List, Value

    def tokenise(batch: list[str]) -> dict:
        try:
            ids, cut = compute(batch)
        except BaseException as exc:
            failures.append(exc)
            raise
        return {"ids": ids, "cut": cut, "check": [_text_check(t) for t in batch]}

    features = Features({"ids": List(Value("int32")), "cut": Value("bool"),
                         "check": Value("int32")})
    with _quiet_datasets():
        out = Dataset.from_dict({"text": list(texts)}).map(
            tokenise, batched=True, batch_size=1000, input_columns="text", remove_columns=["text"],
            features=features, cache_file_name=str(path), new_fingerprint=key,
            load_from_cache_file=reuse)
    return _columns(out, texts, vocab_size)


def cached_encode(tokenizer, texts: Sequence[str], params: dict,
                  compute: Callable[[list[str]], Encoded]) -> Encoded:
    """``compute(texts)`` (ids per text, truncated flags), through the on-disk cache.

    ``params``: every encoding parameter besides texts and tokenizer that the ids depend on
    (JSON-serialisable). ``compute`` must be row-wise (it is called on batches of texts)."""
    texts = list(texts)
    if len(texts) < MIN_CACHED or not enabled():
        return compute(texts)
    tokenizer_fp = tokenizer_fingerprint(tokenizer)
    if tokenizer_fp is None:
        return compute(texts)
    key = cache_key(texts, tokenizer_fp, params)
    path = cache_dir() / f"{key}.arrow"
    failures: list = []
    vocab_size = len(tokenizer)
    if path.is_file():
        try:
            return _map(texts, key, path, compute, True, failures, vocab_size)
        except Exception as exc:
            if failures:  # the file was not used: tokenisation itself failed
                raise
            log.warning("%s: unreadable token cache file, rebuilt (%s)", path, exc)
            with contextlib.suppress(OSError):
                path.unlink()
    try:
        return _map(texts, key, path, compute, False, failures, vocab_size)
    except Exception as exc:
        if failures:
            raise
        log.warning("%s: token cache not written (%s); tokenising without it", path, exc)
    return compute(texts)


__all__ = ["ENCODING_VERSION", "ENV_SWITCH", "MIN_CACHED", "cache_dir", "cache_key",
           "cached_encode", "enabled", "tokenizer_fingerprint"]
