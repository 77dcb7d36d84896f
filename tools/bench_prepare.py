"""Benchmark `fakegpt prepare` against the tokenizer-alone bound, measured side by side in one run.

    python tools/bench_prepare.py                 # ~120 MB of real text, well-formed CSV
    python tools/bench_prepare.py --mb 1200       # the 1.2 GB peak-memory check
    python tools/bench_prepare.py --naive         # the same data as a naive export (repair path)
    python tools/bench_prepare.py --mb 1          # one copy of the corpora (20 MB): no text seen twice

It writes a large CSV from the real corpora in ../shared/data, repeated until it reaches --mb, each copy made
unique (a copy number appended to every message) so that duplicate removal cannot shrink the work. Then:

1. prepare, end to end, in a child process (`fakegpt prepare FILE --out DIR`), twice: prepare's own wall
   time (meta.json's timing, from the first byte read to meta.json written), the whole command's wall and
   CPU time (interpreter start-up, imports and the MLflow store included), and peak RSS;
2. the bound: tiktoken alone encoding the very same cleaned messages (read back from the bins prepare
   wrote, as the texts it tokenized) in large batches (chunks of 2,000 messages) with all cores, taking the
   faster of encode_batch and a thread pool over encode_to_numpy.

prepare's tokenizer (fakegpt/data/word_encoder.py) runs byte-pair merges once per distinct word, so it gains from the
words the copies share (as it does on any large corpus, where words recur); `--mb 1` measures one copy, where
no message repeats, for the conservative figure.

It prints both throughputs and their ratio (the target: prepare >= 80% of the bound, peak RSS under
1 GB on a 1.2 GB input). On a machine shared with other work the absolute numbers move; the ratio less so.

Then the same for a Hugging Face tokenizer (`fakegpt prepare FILE --tokenizer FOLDER`, the `tokenizers`
library's path): a byte-level BPE of 70,000 ids (uint32 bins) trained here on the shared corpora and saved to
the work folder (or `--hf-tokenizer FOLDER`), against that library's batch encoding alone of the same cleaned
messages, chunks of 2,000 messages on all cores (encode_batch_fast, encode_batch's ids without the character
offsets, as one call per chunk and on a thread pool, the faster); target: prepare >= 0.9 of it. `--skip-hf`
leaves this part out.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import polars as pl

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from fakegpt.data.tokenizer import EOT_TOKEN, get_encoding  # noqa: E402

SHARED = Path(os.environ.get("FAKEGPT_SHARED_DATA", ROOT.parent / "shared" / "data"))
SEP = "<|endoftext|>"
CHUNK = 2000


def make_input(path: Path, mb: int, naive: bool) -> int:
    """Write ~`mb` MB of CSV made of unique copies of the real corpora; returns its size in bytes."""
    base = pl.concat([pl.read_csv(SHARED / f, infer_schema=False) for f in ("fakewhatsapp_br.csv", "fakebr_news.csv")])
    n = 0
    with open(path, "wb") as f:
        f.write(b"id,channel_id,date,message\n")
        copy = 0
        while f.tell() < mb * 1_000_000:
            df = base.with_columns(
                id=(pl.int_range(pl.len()) + n + 1).cast(pl.String),
                message=pl.col("message") + pl.lit(f" #{copy}"),
            )
            n += df.height
            if naive:  # one physical line per record, message unquoted (what the naive repair reads)
                df = df.with_columns(message=pl.col("message").str.replace_all(r"\r\n|[\n\r\u2028\u2029\x85]", " "))
                lines = df.select(pl.concat_str(["id", "channel_id", "date", "message"], separator=","))
                f.write(("\n".join(lines.to_series().to_list()) + "\n").encode())  # simple; untimed
            else:
                df.write_csv(f, include_header=False)
            copy += 1
    return path.stat().st_size


def run_prepare(csv: Path, out: Path, threads: int, tokenizer: Path | None = None) -> dict:
    """Run `fakegpt prepare` in a child process: its wall time, CPU time, peak RSS and prepare's own timing."""
    cmd = [sys.executable, "-m", "fakegpt", "prepare", str(csv), "--out", str(out), "--force"]
    if threads:
        cmd += ["--threads", str(threads)]
    if tokenizer is not None:
        cmd += ["--tokenizer", str(tokenizer)]
    env = dict(os.environ, MLFLOW_TRACKING_URI=f"sqlite:///{out.parent}/mlflow.db", PYTHONPATH=str(ROOT))
    t0 = time.perf_counter()
    child = subprocess.Popen(cmd, env=env, cwd=out.parent)  # the store's ./mlruns in the work folder
    # Peak RSS: the child's own high-water mark (VmHWM), polled. The rusage that wait4 returns is no good here:
    # Linux carries over into it the RSS of the memory the child was started from, this process's (gigabytes
    # once the bound's texts are loaded).
    hwm = 0
    while True:
        hwm = max(hwm, _vm_hwm_kib(child.pid))
        pid, status, usage = os.wait4(child.pid, os.WNOHANG)
        if pid:
            break
        time.sleep(0.05)
    wall = time.perf_counter() - t0
    child.returncode = os.waitstatus_to_exitcode(status)
    if child.returncode:
        raise subprocess.CalledProcessError(child.returncode, cmd)
    meta = json.loads((out / "meta.json").read_text())
    return {
        "wall": wall,  # the whole command: interpreter start-up, imports, MLflow store, prepare
        "prepare": meta["timing"]["seconds"],  # prepare itself: first byte read to meta.json written
        "prepare_cpu": meta["timing"]["cpu_seconds"],
        "cpu": usage.ru_utime + usage.ru_stime,
        "rss_mb": hwm / 1024,
    }


def _vm_hwm_kib(pid: int) -> int:
    """The peak resident set size of process `pid` so far, in KiB (0 once it is gone)."""
    try:
        with open(f"/proc/{pid}/status") as fh:
            return next((int(line.split()[1]) for line in fh if line.startswith("VmHWM:")), 0)
    except OSError:
        return 0


def cleaned_messages(out: Path) -> list[str]:
    """The messages prepare tokenized, decoded back from its bins (EOT dropped)."""
    enc = get_encoding()
    texts = []
    for name in ("train.bin", "val.bin"):
        tokens = np.fromfile(out / name, dtype=np.uint16)
        ends = np.flatnonzero(tokens == EOT_TOKEN)
        starts = np.concatenate(([0], ends[:-1] + 1))
        texts += [enc.decode(tokens[s:e].tolist()) for s, e in zip(starts, ends, strict=True)]
    return texts


def bound(texts: list[str], threads: int) -> tuple[int, float, float]:
    """Tokens, best wall seconds and its CPU seconds for tiktoken alone on `texts`, in chunks of CHUNK
    messages on all threads (the faster of encode_batch and a thread pool over encode_to_numpy)."""
    enc = get_encoding()
    chunks = [SEP.join(texts[i : i + CHUNK]) + SEP for i in range(0, len(texts), CHUNK)]
    best, best_cpu, n = float("inf"), 0.0, 0

    def timed(fn) -> tuple[int, float, float]:
        c0, t0 = _cpu(), time.perf_counter()
        tokens = fn()
        return tokens, time.perf_counter() - t0, _cpu() - c0

    def batch() -> int:
        return sum(len(x) for x in enc.encode_batch(chunks, num_threads=threads, allowed_special={SEP}))

    def numpy_pool() -> int:
        with ThreadPoolExecutor(threads) as pool:
            return sum(len(x) for x in pool.map(lambda c: enc.encode_to_numpy(c, allowed_special={SEP}), chunks))

    for _ in range(2):
        for fn in (batch, numpy_pool):
            n, wall, cpu = timed(fn)
            if wall < best:
                best, best_cpu = wall, cpu
    return n, best, best_cpu


def make_hf_tokenizer(folder: Path, vocab_size: int = 70_000) -> Path:
    """A byte-level BPE of `vocab_size` ids trained on the shared corpora (padded with added tokens if they hold
    too few merges), saved as a Hugging Face tokenizer folder with EOS "<|end|>"."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    texts = pl.concat(
        [pl.read_csv(SHARED / f, infer_schema=False)["message"] for f in ("fakewhatsapp_br.csv", "fakebr_news.csv")]
    ).to_list()
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=["<|end|>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(texts, trainer)
    tok.add_tokens([f"<extra_{i}>" for i in range(max(0, vocab_size - tok.get_vocab_size()))])
    PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<|end|>").save_pretrained(folder)
    return folder


def hf_bound(texts: list[str], folder: Path, threads: int) -> tuple[int, float, float]:
    """Tokens (EOS per message included), best wall seconds and its CPU seconds for the `tokenizers` library
    alone on `texts`: chunks of CHUNK messages, no special tokens added, encode_batch_fast as one call per
    chunk (the library's own threads) and on a thread pool, the faster of the two."""
    from tokenizers import Tokenizer

    tok = Tokenizer.from_file(str(folder / "tokenizer.json"))
    chunks = [texts[i : i + CHUNK] for i in range(0, len(texts), CHUNK)]
    best, best_cpu, n = float("inf"), 0.0, 0

    def count(encode, chunk: list[str]) -> int:
        return sum(len(e.ids) for e in encode(chunk, add_special_tokens=False)) + len(chunk)

    # encode_batch_fast gives encode_batch's ids without computing character offsets: the faster of the two
    for _ in range(2):
        for encode in (tok.encode_batch_fast,):
            for pooled in (False, True):
                c0, t0 = _cpu(), time.perf_counter()
                if pooled:
                    with ThreadPoolExecutor(threads) as pool:
                        n = sum(pool.map(lambda c, e=encode: count(e, c), chunks))
                else:
                    n = sum(count(encode, c) for c in chunks)
                wall = time.perf_counter() - t0
                if wall < best:
                    best, best_cpu = wall, _cpu() - c0
    return n, best, best_cpu


def _cpu() -> float:
    t = os.times()
    return t.user + t.system


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--mb", type=int, default=120, help="input size in MB (default 120)")
    ap.add_argument("--naive", action="store_true", help="write the input as a naive export")
    ap.add_argument("--threads", type=int, default=0, help="threads for both sides (default: all cores)")
    ap.add_argument("--repeat", type=int, default=2, help="prepare runs; the fastest counts (default 2)")
    ap.add_argument("--skip-bound", action="store_true", help="only run prepare (the peak-memory check)")
    ap.add_argument("--keep", metavar="DIR", help="work in DIR and keep the files (default: a temp folder)")
    ap.add_argument("--hf-tokenizer", metavar="FOLDER", help="the Hugging Face tokenizer (default: one trained here)")
    ap.add_argument("--skip-hf", action="store_true", help="leave out the Hugging Face tokenizer rows")
    args = ap.parse_args()
    threads = args.threads or os.cpu_count() or 1
    with tempfile.TemporaryDirectory(prefix="bench-prepare-") as tmp:
        work = Path(args.keep or tmp)
        work.mkdir(parents=True, exist_ok=True)
        csv = work / ("input-naive.csv" if args.naive else "input.csv")
        t0 = time.perf_counter()
        size = make_input(csv, args.mb, args.naive)
        print(
            f"input: {csv.name} {size / 1e6:.0f} MB written in {time.perf_counter() - t0:.1f} s; "
            f"{os.cpu_count()} CPUs, {threads} threads"
        )
        out = work / "prepared"
        # Create the MLflow store first: a fresh SQLite store runs its migrations once (about 2 s), a cost of
        # the store, not of each prepare run.
        env = dict(os.environ, MLFLOW_TRACKING_URI=f"sqlite:///{work}/mlflow.db")
        subprocess.run(
            [sys.executable, "-c", "import mlflow; mlflow.search_experiments()"],
            env=env,
            check=True,
            capture_output=True,
        )
        runs = [run_prepare(csv, out, args.threads) for _ in range(args.repeat)]
        if args.skip_bound:
            r = runs[0]
            print(
                f"prepare(): {r['prepare']:.1f} s, command {r['wall']:.1f} s (CPU {r['cpu']:.1f} s), "
                f"peak RSS {max(x['rss_mb'] for x in runs):.0f} MB on {size / 1e9:.2f} GB of CSV"
            )
            return
        texts = cleaned_messages(out)
        tokens = sum(int(np.fromfile(out / n, dtype=np.uint16).size) for n in ("train.bin", "val.bin"))
        n, best, best_cpu = bound(texts, threads)
        assert n == tokens, (n, tokens)  # the bound encodes exactly what prepare wrote
        run = min(runs, key=lambda r: r["prepare"])
        command = min(r["wall"] for r in runs)
        e2e, ceiling = tokens / run["prepare"], n / best
        print(
            f"prepare()          : {run['prepare']:7.2f} s  {e2e / 1e6:6.2f} M tokens/s  "
            f"{size / 1e6 / run['prepare']:6.1f} MB/s  (best of {len(runs)}; read to meta.json written; "
            f"CPU {run['prepare_cpu']:.1f} s)"
        )
        print(
            f"fakegpt prepare    : {command:7.2f} s  {tokens / command / 1e6:6.2f} M tokens/s  "
            f"(the whole command, best of {len(runs)}: start-up, imports, MLflow run)"
        )
        print(
            f"tiktoken alone     : {best:7.2f} s  {ceiling / 1e6:6.2f} M tokens/s  (CPU {best_cpu:.1f} s; "
            f"{len(texts)} messages, {tokens} tokens)"
        )
        print(
            f"ratio prepare/bound: {e2e / ceiling:.2f} (prepare()), {best / command:.2f} (whole command)   "
            f"CPU-time ratio bound/prepare(): "
            f"{best_cpu / run['prepare_cpu']:.2f}   peak RSS of the command: "
            f"{max(r['rss_mb'] for r in runs):.0f} MB"
        )
        if not args.skip_hf:
            bench_hf(args, work, csv, texts, threads)


def bench_hf(args: argparse.Namespace, work: Path, csv: Path, texts: list[str], threads: int) -> None:
    """The Hugging Face tokenizer rows: `fakegpt prepare --tokenizer FOLDER` against the library alone."""
    t0 = time.perf_counter()
    folder = Path(args.hf_tokenizer) if args.hf_tokenizer else make_hf_tokenizer(work / "hf-tokenizer")
    made = "given" if args.hf_tokenizer else f"trained in {time.perf_counter() - t0:.1f} s"
    out = work / "prepared-hf"
    runs = [run_prepare(csv, out, args.threads, folder) for _ in range(args.repeat)]
    meta = json.loads((out / "meta.json").read_text())
    dtype = np.dtype(meta["dtype"])
    tokens = sum(int(np.fromfile(out / n, dtype=dtype).size) for n in ("train.bin", "val.bin"))
    n, best, best_cpu = hf_bound(texts, folder, threads)
    assert n == tokens, (n, tokens)  # the same messages (decoded from the GPT-2 bins), the same ids
    run = min(runs, key=lambda r: r["prepare"])
    command = min(r["wall"] for r in runs)
    e2e, ceiling = tokens / run["prepare"], n / best
    print(f"tokenizer {folder} ({made}): {meta['vocab_size']} ids, EOS {meta['eot_token']}, {meta['dtype']} bins")
    print(
        f"prepare --tokenizer: {run['prepare']:7.2f} s  {e2e / 1e6:6.2f} M tokens/s  (best of {len(runs)}; "
        f"CPU {run['prepare_cpu']:.1f} s; the whole command {command:.2f} s)"
    )
    print(f"tokenizers alone   : {best:7.2f} s  {ceiling / 1e6:6.2f} M tokens/s  (CPU {best_cpu:.1f} s; {n} tokens)")
    ratio = e2e / ceiling
    print(
        f"ratio prepare/bound: {ratio:.2f} ({'meets' if ratio >= 0.9 else 'misses'} the 0.9 bound; "
        f"{best / command:.2f} for the whole command)   peak RSS of the command: "
        f"{max(r['rss_mb'] for r in runs):.0f} MB"
    )


if __name__ == "__main__":
    main()
