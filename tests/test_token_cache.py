"""The on-disk token cache (aimm/token_cache.py) behind aimm/encoding.py.

Cached ids and truncation counts must equal freshly tokenised ones bit for bit; a second call
must not run the tokenizer; every input the ids depend on must change the key; a bad cache
file must be rebuilt, never used; ``AIMM_TOKEN_CACHE=0`` must turn it off.
"""

from __future__ import annotations

import json
import logging
import os
from pathlib import Path

import pytest

from aimm import token_cache
from aimm.encoding import EncodedExamples, TruncationCounter, encode_prompts
from aimm.models import load_tokenizer, smollm2_tokenizer_dir

N = 80  # above token_cache.MIN_CACHED


def texts(n: int = N, tag: str = "") -> tuple[list[str], list[str]]:
    """Prompts of 5 to ~150 tokens (some cut at 48) and targets of 1 to ~12 tokens (some cut)."""
    prompts = [f"Classify {tag}{i}. Option: World, Sports.\n" + "Ünïcode wörds and more " * (i % 23)
               + "\nAnswer:" for i in range(n)]
    targets = [("Sports" if i % 2 else "World") + " extra" * (i % 7) for i in range(n)]
    return prompts, targets


@pytest.fixture(scope="module")
def tokenizer_dir() -> Path:
    """The tiny models' tokenizer (SmolLM2), found before ``cache`` moves ``$AIMM_CACHE``."""
    return smollm2_tokenizer_dir()


@pytest.fixture(scope="module")
def tokenizer(tokenizer_dir):
    return load_tokenizer(tokenizer_dir)


@pytest.fixture(autouse=True)
def cache(tmp_path, monkeypatch) -> Path:
    monkeypatch.setenv("AIMM_CACHE", str(tmp_path / "cache"))
    monkeypatch.delenv("AIMM_TOKEN_CACHE", raising=False)
    return tmp_path / "cache" / "tokenized"


def files(cache: Path) -> set[str]:
    return {p.name for p in cache.glob("*.arrow")} if cache.is_dir() else set()


class Spy:
    """Counts calls of the tokenizer class's ``__call__`` (what aimm.encoding uses)."""

    def __init__(self, monkeypatch, tokenizer):
        cls = type(tokenizer)
        original = cls.__call__
        self.calls = 0

        def spy(tok, *args, **kwargs):
            self.calls += 1
            return original(tok, *args, **kwargs)

        monkeypatch.setattr(cls, "__call__", spy)


def encode(tokenizer, prompts, targets, *, is_seq2seq=False, max_input_len=48, max_target_len=6,
           truncation="release"):
    counter = TruncationCounter()
    enc = EncodedExamples.from_texts(tokenizer, prompts, targets, is_seq2seq=is_seq2seq,
                                     max_input_len=max_input_len, max_target_len=max_target_len,
                                     counter=counter, truncation=truncation)
    return enc.prompt_ids, enc.target_ids, counter.as_dict()


@pytest.mark.parametrize("is_seq2seq", [False, True], ids=["causal", "seq2seq"])
@pytest.mark.parametrize("truncation", ["release", "middle"])
def test_cached_ids_equal_fresh_ids(tokenizer, cache, monkeypatch, is_seq2seq, truncation):
    prompts, targets = texts()
    kw = dict(is_seq2seq=is_seq2seq, truncation=truncation)
    monkeypatch.setenv("AIMM_TOKEN_CACHE", "0")
    fresh = encode(tokenizer, prompts, targets, **kw)
    assert not files(cache)
    assert fresh[2]["prompts_truncated"] > 0 and fresh[2]["targets_truncated"] > 0
    monkeypatch.setenv("AIMM_TOKEN_CACHE", "1")
    written = encode(tokenizer, prompts, targets, **kw)
    assert len(files(cache)) == 2  # prompts and targets
    read = encode(tokenizer, prompts, targets, **kw)
    assert written == fresh
    assert read == fresh
    assert all(type(i) is int for row in read[0] + read[1] for i in row)


def test_second_call_reads_the_cache(tokenizer, cache, monkeypatch):
    prompts, targets = texts()
    spy = Spy(monkeypatch, tokenizer)
    first = encode(tokenizer, prompts, targets)
    assert spy.calls >= 2
    spy.calls = 0
    second = encode(tokenizer, prompts, targets)
    assert spy.calls == 0
    assert second == first


def test_evaluation_prompts_are_cached_too(tokenizer, cache, monkeypatch):
    prompts, _ = texts()
    spy = Spy(monkeypatch, tokenizer)
    counters = [TruncationCounter(), TruncationCounter()]
    a = encode_prompts(tokenizer, prompts, is_seq2seq=False, max_input_len=None, counter=counters[0])
    calls = spy.calls
    b = encode_prompts(tokenizer, prompts, is_seq2seq=False, max_input_len=None, counter=counters[1])
    assert spy.calls == calls and a == b
    assert counters[0].as_dict() == counters[1].as_dict() == {
        "prompts_truncated": 0, "targets_truncated": 0, "seen": N}


@pytest.mark.parametrize("change", [
    "text", "is_seq2seq", "max_input_len", "max_target_len", "truncation", "version"])
def test_every_input_of_the_ids_changes_the_key(tokenizer, cache, monkeypatch, change):
    prompts, targets = texts()
    encode(tokenizer, prompts, targets)
    before = files(cache)
    kw = {"is_seq2seq": dict(is_seq2seq=True), "max_input_len": dict(max_input_len=47),
          "max_target_len": dict(max_target_len=5), "truncation": dict(truncation="middle")}
    if change == "text":
        prompts = prompts[:-1] + [prompts[-1] + "!"]
        targets = targets[:-1] + [targets[-1] + "!"]
    if change == "version":
        monkeypatch.setattr(token_cache, "ENCODING_VERSION", token_cache.ENCODING_VERSION + 1)
    monkeypatch.setenv("AIMM_TOKEN_CACHE", "0")
    fresh = encode(tokenizer, prompts, targets, **kw.get(change, {}))
    monkeypatch.setenv("AIMM_TOKEN_CACHE", "1")
    assert encode(tokenizer, prompts, targets, **kw.get(change, {})) == fresh
    new = files(cache) - before
    # truncation and max_input_len do not touch the targets: their key stays
    assert len(new) == (1 if change in ("max_input_len", "truncation", "max_target_len") else 2)


@pytest.mark.parametrize("mutation", ["added_token", "normalizer", "other_tokenizer"])
def test_a_changed_tokenizer_changes_the_key(cache, monkeypatch, tokenizer_dir, mutation):
    """Also a tokenizer changed in place after its fingerprint was memoised."""
    from tokenizers.normalizers import Lowercase

    tok = load_tokenizer(tokenizer_dir)
    prompts, targets = texts(tag="QQZX ")
    encode(tok, prompts, targets)
    before = files(cache)
    if mutation == "added_token":
        tok.add_tokens(["QQZX"])
    elif mutation == "normalizer":
        tok.backend_tokenizer.normalizer = Lowercase()
    else:  # same vocabulary, another object with another special-token setting
        tok = load_tokenizer(tokenizer_dir)
        tok.pad_token = tok.bos_token
    cached = encode(tok, prompts, targets)
    monkeypatch.setenv("AIMM_TOKEN_CACHE", "0")
    fresh = encode(tok, prompts, targets)
    monkeypatch.delenv("AIMM_TOKEN_CACHE")
    assert cached == fresh
    assert files(cache) - before  # a new key, not the old file
    if mutation != "other_tokenizer":
        assert cached[0] != encode(load_tokenizer(tokenizer_dir), prompts, targets)[0]


@pytest.mark.parametrize("damage", ["garbage", "half", "other_file", "empty"])
def test_a_bad_cache_file_is_rebuilt(tokenizer, cache, monkeypatch, caplog, damage):
    prompts, targets = texts()
    want = encode(tokenizer, prompts, targets)
    other_prompts, other_targets = texts(N + 7, tag="other ")
    encode(tokenizer, other_prompts, other_targets)  # valid files with other rows
    key = token_cache.cache_key(prompts, token_cache.tokenizer_fingerprint(tokenizer), dict(
        kind="prompts", is_seq2seq=False, max_len=48, truncation="release",
        eos=tokenizer.eos_token_id, tail=8))
    path = cache / f"{key}.arrow"
    assert path.is_file()
    data = path.read_bytes()
    others = sorted(files(cache) - {path.name})
    path.write_bytes({"garbage": b"\x00not arrow" * 50, "half": data[: len(data) // 2],
                      "other_file": (cache / others[0]).read_bytes(), "empty": b""}[damage])
    with caplog.at_level(logging.WARNING, logger="aimm.token_cache"):
        got = encode(tokenizer, prompts, targets)
    assert got == want
    assert "unreadable token cache file, rebuilt" in caplog.text
    assert path.read_bytes() == data  # rewritten, same bytes
    spy = Spy(monkeypatch, tokenizer)
    assert encode(tokenizer, prompts, targets) == want and spy.calls == 0


def rewrite(path: Path, **columns) -> None:
    """Rewrite the cache file ``path`` (an Arrow stream, as ``datasets`` writes it) with some
    columns replaced: ``name=(pyarrow type, function of the old column's values)``."""
    import pyarrow as pa

    table = pa.ipc.open_stream(pa.py_buffer(path.read_bytes())).read_all()  # not mapped: rewritten
    arrays = {name: table.column(name) for name in table.column_names}
    for name, (kind, change) in columns.items():
        arrays[name] = pa.array(change(arrays[name].to_pylist()), type=kind)
    new = pa.table(arrays)
    with pa.OSFile(str(path), "wb") as sink, pa.ipc.new_stream(sink, new.schema) as writer:
        writer.write_table(new)


def damaged_columns(damage: str, vocab_size: int) -> dict:
    import pyarrow as pa

    ids32 = pa.list_(pa.int32())
    return {
        "negative": dict(ids=(ids32, lambda rows: [[-7] for _ in rows])),
        "one_negative": dict(ids=(ids32, lambda rows: [r[:-1] + [-1] for r in rows[:1]] + rows[1:])),
        "too_large": dict(ids=(ids32, lambda rows: rows[:-1] + [[vocab_size]])),
        "null_row": dict(ids=(ids32, lambda rows: [None] + rows[1:])),
        "null_cut": dict(cut=(pa.bool_(), lambda cut: [None] + cut[1:])),
    }[damage]


@pytest.mark.parametrize("damage", ["negative", "one_negative", "too_large", "null_row",
                                    "null_cut"])
def test_a_cache_file_with_bad_values_is_rebuilt(tokenizer, cache, monkeypatch, caplog, damage):
    """Readable files of the right rows, types and texts, but with ids no tokenizer makes
    (outside ``[0, len(tokenizer))``) or nulls: rebuilt, never used."""
    prompts, targets = texts()
    want = encode(tokenizer, prompts, targets)
    paths = sorted(cache.glob("*.arrow"))
    assert len(paths) == 2
    data = {p: p.read_bytes() for p in paths}
    for path in paths:
        rewrite(path, **damaged_columns(damage, len(tokenizer)))
        assert path.read_bytes() != data[path]
    with caplog.at_level(logging.WARNING, logger="aimm.token_cache"):
        got = encode(tokenizer, prompts, targets)
    assert got == want
    assert caplog.text.count("unreadable token cache file, rebuilt") == 2
    assert all(p.read_bytes() == data[p] for p in paths)  # rewritten, same bytes
    spy = Spy(monkeypatch, tokenizer)
    assert encode(tokenizer, prompts, targets) == want and spy.calls == 0


@pytest.mark.parametrize("damage", ["float_ids", "null_id", "string_cut", "float_check",
                                    "int_cut"])
def test_columns_refuses_other_types_and_nulls(damage):
    """``_columns`` itself (``datasets`` also refuses most of these on load, by its features)."""
    import pyarrow as pa
    from datasets import Dataset

    rows = ["a", "b", "c"]
    columns = {"ids": pa.array([[1, 2], [3], []], pa.list_(pa.int32())),
               "cut": pa.array([False, True, False]),
               "check": pa.array([token_cache._text_check(t) for t in rows], pa.int32())}
    good = Dataset(pa.table(columns))
    assert token_cache._columns(good, rows, 4) == ([[1, 2], [3], []], [False, True, False])
    columns.update({
        "float_ids": dict(ids=pa.array([[1.0, 2.0], [3.0], []], pa.list_(pa.float64()))),
        "null_id": dict(ids=pa.array([[1, None], [3], []], pa.list_(pa.int32()))),
        "string_cut": dict(cut=pa.array(["False", "True", ""])),
        "float_check": dict(check=pa.array([float(token_cache._text_check(t)) for t in rows])),
        "int_cut": dict(cut=pa.array([0, 1, 0], pa.int8())),
    }[damage])
    with pytest.raises(ValueError, match="expected columns|null values"):
        token_cache._columns(Dataset(pa.table(columns)), rows, 4)


def test_a_cache_file_with_every_id_in_range_is_used(tokenizer, cache, monkeypatch):
    """The range check's bounds are inclusive of 0 and len(tokenizer) - 1: such a file is read
    as it is."""
    import pyarrow as pa

    prompts, targets = texts()
    encode(tokenizer, prompts, targets)
    top = len(tokenizer) - 1
    for path in cache.glob("*.arrow"):
        rewrite(path, ids=(pa.list_(pa.int32()), lambda rows: [[0, top]] + rows[1:]))
    spy = Spy(monkeypatch, tokenizer)
    prompt_ids, target_ids, _ = encode(tokenizer, prompts, targets)
    assert spy.calls == 0
    assert prompt_ids[0] == [0, top] and target_ids[0] == [0, top]


def test_a_run_rebuilds_cache_files_with_ids_out_of_range(cache, tmp_path, monkeypatch,
                                                          tokenizer_dir, caplog):
    """A run's cache files rewritten to hold the id -7 (their check column kept): the next run
    rebuilds them and completes equal to the golden run (it once died in torch.embedding)."""
    import pyarrow as pa
    from tests.test_golden_runs import GOLDEN, assert_like_golden, compared_files, golden_run

    (cache.parent).mkdir(parents=True)
    (cache.parent / "smollm2-135m-tokenizer").symlink_to(tokenizer_dir)
    monkeypatch.setattr(token_cache, "MIN_CACHED", 1)
    golden_run("seq_lora", tmp_path / "cold")
    data = {p: p.read_bytes() for p in cache.glob("*.arrow")}
    assert data
    for path in data:
        rewrite(path, ids=(pa.list_(pa.int32()), lambda rows: [[-7] for _ in rows]))
    with caplog.at_level(logging.WARNING, logger="aimm.token_cache"):
        run_dir = golden_run("seq_lora", tmp_path / "damaged")
    assert caplog.text.count("unreadable token cache file, rebuilt") == len(data)
    assert {p: p.read_bytes() for p in cache.glob("*.arrow")} == data
    for rel in compared_files(run_dir):
        assert_like_golden(run_dir / rel, GOLDEN / "seq_lora" / rel, f"damaged cache: {rel}")


@pytest.mark.parametrize("value", ["0", "false", "off", "No"])
def test_disabled_by_environment(tokenizer, cache, monkeypatch, value):
    monkeypatch.setenv("AIMM_TOKEN_CACHE", value)
    prompts, targets = texts()
    spy = Spy(monkeypatch, tokenizer)
    a = encode(tokenizer, prompts, targets)
    b = encode(tokenizer, prompts, targets)
    assert a == b and spy.calls == 4 and not files(cache)


def test_small_inputs_are_not_cached(tokenizer, cache):
    prompts, targets = texts(token_cache.MIN_CACHED - 1)
    encode(tokenizer, prompts, targets)
    assert not files(cache)


def test_unwritable_cache_costs_only_the_saving(tokenizer, cache, tmp_path, monkeypatch, caplog):
    blocker = tmp_path / "not_a_dir"
    blocker.write_text("x")
    monkeypatch.setenv("AIMM_CACHE", str(blocker))
    prompts, targets = texts()
    with caplog.at_level(logging.WARNING, logger="aimm.token_cache"):
        got = encode(tokenizer, prompts, targets)
    monkeypatch.setenv("AIMM_TOKEN_CACHE", "0")
    assert got == encode(tokenizer, prompts, targets)
    assert "token cache not written" in caplog.text


def test_tokenisation_errors_propagate(tokenizer, cache):
    prompts, _ = texts()
    with pytest.raises(ValueError, match="unknown truncation 'left'"):
        encode_prompts(tokenizer, prompts, is_seq2seq=False, max_input_len=8, truncation="left")
    assert not files(cache)


def test_concurrent_writers_of_one_key_are_safe(tokenizer, cache, tokenizer_dir, monkeypatch):
    """Three writers (threads, each with its own tokenizer) tokenise, write and read the same
    keys at once: every result is right, one file per key, no temporary file left."""
    import threading

    prompts, targets = texts(500)
    monkeypatch.setenv("AIMM_TOKEN_CACHE", "0")
    want = encode(tokenizer, prompts, targets)
    monkeypatch.delenv("AIMM_TOKEN_CACHE")
    tokenizers = [load_tokenizer(tokenizer_dir) for _ in range(3)]
    start = threading.Barrier(3)
    got, errors = [], []

    def worker(tok):
        try:
            start.wait()
            for _ in range(3):
                got.append(encode(tok, prompts, targets))
        except BaseException as exc:  # reported below
            errors.append(exc)

    threads = [threading.Thread(target=worker, args=(t,)) for t in tokenizers]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors
    assert len(got) == 9 and all(g == want for g in got)
    assert len(files(cache)) == 2
    assert [p.name for p in cache.iterdir() if not p.name.endswith(".arrow")] == []


@pytest.mark.parametrize("case", ["seq_lora", "aimmerging"])
def test_golden_runs_identical_through_the_cache(case, cache, tmp_path, monkeypatch, tokenizer_dir):
    """The golden runs cache nothing (fewer than MIN_CACHED texts): with MIN_CACHED = 1 every
    encoding of the run goes through the cache, written by the first run and read by the
    second; both must still equal the goldens byte for byte."""
    from tests.test_golden_runs import GOLDEN, assert_like_golden, compared_files, golden_run

    (cache.parent).mkdir(parents=True)
    (cache.parent / "smollm2-135m-tokenizer").symlink_to(tokenizer_dir)
    monkeypatch.setattr(token_cache, "MIN_CACHED", 1)
    for attempt in ("cold", "warm"):
        before = files(cache)
        run_dir = golden_run(case, tmp_path / attempt)
        assert (files(cache) == before) == (attempt == "warm") and files(cache)
        for rel in compared_files(run_dir):
            assert_like_golden(run_dir / rel, GOLDEN / case / rel, f"{case} ({attempt} cache): {rel}")


def test_benchmark_reports_fresh_miss_and_hit_times(tmp_path, monkeypatch, tokenizer_dir):
    from benchmarks import token_cache as bench
    from conftest import make_tiny_benchmark

    data = make_tiny_benchmark(tmp_path / "bench", n_train=70, n_test=70)
    monkeypatch.setenv("AIMM_CACHE", str(tokenizer_dir.parent))  # its tokenizer; the run moves it
    out = bench.main(["--data-dir", str(data), "--benchmark", "long_sequence", "--tasks",
                      "sst-2,agnews", "--max-train", "70", "--max-test", "70",
                      "--out", str(tmp_path / "tc.json")])
    assert json.loads((tmp_path / "tc.json").read_text())["tasks"] == ["sst-2", "agnews"]
    assert [(s["task"], s["split"], s["n"]) for s in out["splits"]] == [
        ("sst-2", "train", 70), ("sst-2", "test", 70), ("agnews", "train", 70), ("agnews", "test", 70)]
    assert all(s[k] > 0 for s in out["splits"] for k in ("fresh_s", "miss_write_s", "hit_s"))
    assert [len(rows) for rows in out["stages"].values()] == [2, 2, 2]
    assert out["cache_bytes"] > 0
    assert os.environ["AIMM_CACHE"] == str(tokenizer_dir.parent)  # restored


class FilesOnly:
    """A tokenizer without ``backend_tokenizer`` (like a slow one): fingerprinted by its saved
    files."""

    def __init__(self, tok):
        self.tok = tok
        self.name_or_path = tok.name_or_path
        self.eos_token_id, self.pad_token_id = tok.eos_token_id, tok.pad_token_id

    def __call__(self, *a, **k):
        return self.tok(*a, **k)

    def __len__(self):
        return len(self.tok)

    def encode(self, *a, **k):
        return self.tok.encode(*a, **k)

    def save_pretrained(self, path):
        return self.tok.save_pretrained(path)

    @property
    def special_tokens_map(self):
        return self.tok.special_tokens_map


def test_a_tokenizer_without_backend_is_keyed_by_its_saved_files(cache, tokenizer_dir):
    tok = load_tokenizer(tokenizer_dir)
    slow = FilesOnly(tok)
    first = token_cache.tokenizer_fingerprint(slow)
    assert first is not None and token_cache.tokenizer_fingerprint(slow) == first
    assert first != token_cache.tokenizer_fingerprint(tok)  # another class
    prompts, targets = texts()
    assert encode(slow, prompts, targets) == encode(tok, prompts, targets)
    tok.add_tokens(["QQZX"])
    assert token_cache.tokenizer_fingerprint(slow) != first
    assert token_cache.tokenizer_fingerprint(object()) is None
