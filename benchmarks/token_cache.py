"""What the token cache (aimm/token_cache.py) saves: tokenisation time with it off, cold, warm.

Per split (each task's train split through ``EncodedExamples.from_texts``, each test split
through ``encode_prompts`` as evaluation does): fresh (``AIMM_TOKEN_CACHE=0``), miss (tokenise
and write) and hit (read). Then per stage of a sequential run (stage k encodes task k's train
split and evaluates tasks 1..k) with the cache off, empty (first run) and full (re-run). Only the
tokenizer is loaded (SmolLM2's; no model weights); the cache lives in a temporary folder.

    python -m benchmarks.token_cache --out benchmarks/results/cpu-2core/token_cache.json
"""

from __future__ import annotations

import argparse
import os
import tempfile
import time
from pathlib import Path

from benchmarks._common import environment, write_json


def _timed(fn) -> float:
    start = time.perf_counter()
    fn()
    return round(time.perf_counter() - start, 4)


def measure(data: dict, tokenizer, *, max_input_len: int, max_target_len: int) -> dict:
    from aimm.encoding import EncodedExamples, TruncationCounter, encode_prompts

    tasks = list(data)

    def train(name: str) -> None:
        d = data[name]
        EncodedExamples.from_texts(tokenizer, [e.input for e in d.train], [e.output for e in d.train],
                                   is_seq2seq=False, max_input_len=max_input_len,
                                   max_target_len=max_target_len, counter=TruncationCounter())

    def test(name: str) -> None:
        encode_prompts(tokenizer, [e.input for e in data[name].test], is_seq2seq=False,
                       max_input_len=None, counter=TruncationCounter())  # release: no cut at eval

    def switch(on: bool) -> None:
        os.environ["AIMM_TOKEN_CACHE"] = "1" if on else "0"

    splits = []
    for name in tasks:
        for split, fn in (("train", train), ("test", test)):
            switch(False)
            fresh = _timed(lambda: fn(name))
            switch(True)
            miss = _timed(lambda: fn(name))
            hit = _timed(lambda: fn(name))
            n = len(data[name].train if split == "train" else data[name].test)
            splits.append(dict(task=name, split=split, n=n, fresh_s=fresh, miss_write_s=miss,
                               hit_s=hit, fresh_over_hit=round(fresh / hit, 1)))
    stages = {}
    with tempfile.TemporaryDirectory() as empty:
        os.environ["AIMM_CACHE"] = empty  # the "first run" starts from an empty cache
        for mode in ("off", "first_run", "re_run"):
            switch(mode != "off")
            stages[mode] = [dict(stage=k + 1, train_s=_timed(lambda: train(tasks[k])),
                                 eval_s=_timed(lambda: [test(t) for t in tasks[: k + 1]]))
                            for k in range(len(tasks))]
    totals = {mode: round(sum(s["train_s"] + s["eval_s"] for s in rows), 3)
              for mode, rows in stages.items()}
    return dict(splits=splits, stages=stages, stage_totals_s=totals,
                all_splits_s={key: round(sum(s[key] for s in splits), 3)
                              for key in ("fresh_s", "miss_write_s", "hit_s")})


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--data-dir", default=None, help="release data (default: aimm's search order)")
    p.add_argument("--benchmark", default="standard_cl")
    p.add_argument("--order", type=int, default=1)
    p.add_argument("--tasks", default=None, help="comma-separated, instead of --order")
    p.add_argument("--max-train", type=int, default=1000)
    p.add_argument("--max-test", type=int, default=None)
    p.add_argument("--max-input-len", type=int, default=512)
    p.add_argument("--max-target-len", type=int, default=128)
    p.add_argument("--out", required=True)
    args = p.parse_args(argv)

    from aimm.data import load_tasks, resolve_order
    from aimm.models import load_tokenizer, smollm2_tokenizer_dir

    tokenizer = load_tokenizer(smollm2_tokenizer_dir())  # before AIMM_CACHE moves
    tasks = args.tasks.split(",") if args.tasks else resolve_order(args.benchmark, args.order)
    data = load_tasks(args.data_dir, args.benchmark, tasks, max_train=args.max_train,
                      max_test=args.max_test)
    saved = {k: os.environ.get(k) for k in ("AIMM_CACHE", "AIMM_TOKEN_CACHE")}
    try:
        with tempfile.TemporaryDirectory() as cache:
            os.environ["AIMM_CACHE"] = cache
            env = environment("cpu", tokenizer="smollm2-135m", tokenizers_parallelism=os.environ.get(
                "TOKENIZERS_PARALLELISM"))
            result = measure(data, tokenizer, max_input_len=args.max_input_len,
                             max_target_len=args.max_target_len)
            cache_bytes = sum(f.stat().st_size for f in Path(cache).rglob("*.arrow"))
    finally:
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v
    env["loadavg_end"] = list(os.getloadavg())
    out = dict(environment=env, benchmark=args.benchmark, tasks=tasks, max_train=args.max_train,
               max_test=args.max_test, cache_bytes=cache_bytes, **result)
    write_json(args.out, out)
    return out


if __name__ == "__main__":
    main()
