"""Peak memory and throughput of `fsku retrieve` (streamed in batches) as the number of queries grows.

    python benchmarks/bench_retrieve_stream.py [--sizes 10000,100000] [--kb DIR] [--chars 800] [--top-k 5]
        [--query-batch 256] [--bm25-only] [--baseline-old]

1. The KB: --kb, or the sample corpus (data/sample_corpus) built into a temporary folder with the
   default config (hybrid: Kiwi BM25 + e5-small int8 on CPU).
2. For each N in --sizes: N distinct queries of --chars characters, statute-like Korean text cut
   from the KB's own chunks (random chunks from random offsets, concatenated; seed --seed), in a
   temporary JSONL.
3. `python -m fsku.cli retrieve` over them as a subprocess, so its peak RSS (os.wait4's ru_maxrss)
   is its own; queries/s end to end (process start, KB and model load included) and for the search
   loop alone (from the command's log line).
4. Baseline: the smallest N. The ratio of peak RSS at the largest N to it is ~1.0 when memory does
   not grow with N. With --baseline-old, the old all-at-once path (every query read into memory,
   one kb.search call, the output written at the end) runs on the same files too; its memory grows
   with N (8.5 GB at 100k queries was measured before streaming), so mind the sizes.
"""
from __future__ import annotations

import argparse
import json
import os
import random
import re
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "src"))

from fsku.config import BuildKBConfig, RetrieveRunSettings  # noqa: E402

# the retrieve command before streaming, kept here as the baseline (same settings as the CLI's defaults)
OLD_PATH = """
import dataclasses, json, sys
from fsku.kb import KnowledgeBase
kb_dir, queries, out, top_k, bm25_only = sys.argv[1], sys.argv[2], sys.argv[3], int(sys.argv[4]), sys.argv[5] == "1"
rows = [json.loads(line) for line in open(queries, encoding="utf-8") if line.strip()]
kb = KnowledgeBase.load(kb_dir)
cfg = dataclasses.replace(kb.retrieve_defaults(), top_k=top_k, candidates=max(50, top_k),
                          **({"w_bm25": 1.0} if bm25_only else {}))
hits = kb.search([str(r["question"]) for r in rows], cfg)
with open(out, "w", encoding="utf-8") as fh:
    for r, hs in zip(rows, hits):
        fh.write(json.dumps({"qid": r["qid"], "hits": [{"chunk_id": h.chunk_id, "source": h.source, "text": h.text,
                 "score": h.score, "path": h.path, "method": h.method} for h in hs]}, ensure_ascii=False) + "\\n")
"""


def build_sample_kb(folder: Path) -> Path:
    from fsku.kb import build_knowledge_base

    out = folder / "kb"
    # the default config; a cache of its own so that the build never touches the project's .cache
    build_knowledge_base(BuildKBConfig(corpus=str(ROOT / "data" / "sample_corpus"), out=str(out),
                                       cache_dir=str(folder / "cache")), progress=False)
    return out


def write_queries(kb_dir: Path, n: int, chars: int, seed: int, path: Path) -> None:
    import pandas as pd

    texts = [t for t in pd.read_parquet(kb_dir / "chunks.parquet", columns=["text"])["text"] if t.strip()]
    rng = random.Random(seed)
    with path.open("w", encoding="utf-8") as fh:
        for i in range(n):
            parts, size = [], 0
            while size < chars:
                t = rng.choice(texts)
                piece = t[rng.randrange(len(t)):] + " "
                parts.append(piece)
                size += len(piece)
            fh.write(json.dumps({"qid": f"q{i}", "question": "".join(parts)[:chars]}, ensure_ascii=False) + "\n")


# Forks and waits for the measured command. A child's ru_maxrss starts at its parent's RSS when it
# forks (Linux keeps the high-water mark across exec), so the parent must be small: not this
# script, which has built a KB and loaded an embedder by then.
LAUNCHER = """
import json, os, sys
pid = os.fork()
if pid == 0:
    os.execv(sys.argv[2], sys.argv[2:])
_, status, usage = os.wait4(pid, 0)
with open(sys.argv[1], "w") as fh:
    json.dump({"maxrss_kb": usage.ru_maxrss, "rc": os.waitstatus_to_exitcode(status)}, fh)
"""


def run_measured(cmd: list[str], log_path: Path) -> tuple[float, float, int]:
    """(wall seconds, peak RSS in MB, exit status) of one command, started by a lean launcher."""
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}
    usage_path = log_path.with_suffix(".usage.json")
    with log_path.open("w", encoding="utf-8") as log:
        t = time.perf_counter()
        subprocess.run([sys.executable, "-c", LAUNCHER, str(usage_path), *cmd], cwd=ROOT, env=env, stdout=log,
                       stderr=subprocess.STDOUT, check=True)
        wall = time.perf_counter() - t
    usage = json.loads(usage_path.read_text(encoding="utf-8"))
    return wall, usage["maxrss_kb"] / 1024, usage["rc"]


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--sizes", default="10000,100000", help="comma-separated numbers of queries")
    p.add_argument("--kb", type=Path, help="knowledge base folder (default: the sample corpus, built into a temp folder)")
    p.add_argument("--chars", type=int, default=800, help="characters per query")
    p.add_argument("--top-k", type=int, default=5)
    p.add_argument("--query-batch", type=int, default=RetrieveRunSettings.query_batch)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--bm25-only", action="store_true", help="retrieve with w_bm25=1.0 (no query embedding: much faster)")
    p.add_argument("--baseline-old", action="store_true", help="also run the old all-at-once path on each size")
    a = p.parse_args()
    sizes = sorted(int(s) for s in a.sizes.split(","))

    with tempfile.TemporaryDirectory(prefix="bench-retrieve-") as tmp:
        tmp = Path(tmp)
        if a.kb is None:
            t = time.perf_counter()
            a.kb = build_sample_kb(tmp)
            print(f"sample KB built in {time.perf_counter() - t:.1f} s: {a.kb}")
        manifest = json.loads((a.kb / "manifest.json").read_text(encoding="utf-8"))
        print(f"KB {a.kb}: {manifest['stats']['chunks']} chunks, dense={manifest['embedding']['model']}; "
              f"queries of {a.chars} characters, top_k {a.top_k}, query_batch {a.query_batch}"
              + (", BM25 only" if a.bm25_only else ""))
        rows = []
        for n in sizes:
            queries, out = tmp / f"q{n}.jsonl", tmp / f"hits{n}.jsonl"
            write_queries(a.kb, n, a.chars, a.seed, queries)
            cmd = [sys.executable, "-m", "fsku.cli", "retrieve", "--kb", str(a.kb), "--queries", str(queries),
                   "--top-k", str(a.top_k), "--out", str(out), "--query-batch", str(a.query_batch), "--no-progress",
                   *(["--w-bm25", "1.0"] if a.bm25_only else [])]
            wall, rss, rc = run_measured(cmd, tmp / "log.txt")
            log_text = (tmp / "log.txt").read_text(encoding="utf-8")
            if rc != 0:
                print(log_text[-3000:])
                raise SystemExit(f"fsku retrieve failed on {n} queries (exit {rc})")
            lines = sum(1 for _ in out.open(encoding="utf-8"))
            assert lines == n, (lines, n)
            loop = re.search(r"([\d.]+) queries/s\)", log_text)
            row = {"n": n, "rss": rss, "wall": wall, "qps": n / wall, "loop_qps": float(loop.group(1)) if loop else None,
                   "out_mb": out.stat().st_size / 2**20}
            out.unlink()
            if a.baseline_old:
                wall, rss, rc = run_measured([sys.executable, "-c", OLD_PATH, str(a.kb), str(queries), str(out),
                                              str(a.top_k), "1" if a.bm25_only else "0"], tmp / "log.txt")
                if rc != 0:
                    print((tmp / "log.txt").read_text(encoding="utf-8")[-3000:])
                    raise SystemExit(f"the old path failed on {n} queries (exit {rc})")
                row.update(old_rss=rss, old_qps=n / wall)
                out.unlink()
            queries.unlink()
            rows.append(row)
            print(f"N={n:>7}: peak RSS {row['rss']:8.1f} MB  {row['qps']:7.1f} queries/s end to end "
                  f"({row['wall']:.1f} s; search loop {row['loop_qps'] or float('nan'):.1f} q/s)  output "
                  f"{row['out_mb']:.1f} MB" + (f"  | old path: peak RSS {row['old_rss']:8.1f} MB, {row['old_qps']:7.1f} "
                                               f"queries/s, RSS streamed/old {row['rss'] / row['old_rss']:.2f}"
                                               if a.baseline_old else ""), flush=True)
        small, large = rows[0], rows[-1]
        print(f"peak RSS at N={large['n']} / N={small['n']} (baseline: the smallest N; flat = 1.0): "
              f"{large['rss'] / small['rss']:.2f}")
        if a.baseline_old:
            print(f"old path, same ratio: {large['old_rss'] / small['old_rss']:.2f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
