"""Benchmark `fakegpt prepare` on a large Telegram Desktop whole-account export against the same messages as CSV,
side by side in one run.

    python tools/bench_telegram_json.py              # a 1.2 GB result.json (the size of the target)
    python tools/bench_telegram_json.py --mb 200     # a quicker check

It writes, from the real corpora in ../shared/data, a whole-account `result.json` (six chats, one per channel,
the last under `left_chats`; personal information and contacts around them) until it reaches --mb, and beside
it a CSV holding exactly the messages the export carries text for, in the same order. Each copy of the
corpora is made unique (a copy number appended to every message), so duplicate removal cannot shrink the work.
The export has what real ones have: half the texts as lists of strings and entity objects, `text_entities`
beside every text (so each message's text is in the file twice), forwards, edits, and a service or media-only
message before every fifth message.

Then it runs `fakegpt prepare` in a child process on each file, alternating, `--repeat` times, and reports for
each: prepare's own time (meta.json's timing), the whole command's wall and CPU time, input MB/s, tokens/s,
the peak RSS of its largest process (os.wait4) and of its whole process tree (prepare parses an export over
32 MiB in a child process; /proc sampled every 50 ms). The bins of the two runs must be byte-identical. The
targets: peak RSS under 1 GB on the 1.2 GB export, and JSON throughput within 1.5x of CSV.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any, TextIO

import polars as pl

ROOT = Path(__file__).resolve().parents[1]
SHARED = Path(os.environ.get("FAKEGPT_SHARED_DATA", ROOT.parent / "shared" / "data"))
BASE_ID = 1_234_567_000  # channel c becomes chat BASE_ID + c
ENTITIES = ("bold", "italic", "text_link", "mention", "hashtag", "custom_emoji", "code", "plain")


def _message(mid: int, date: str, unix: int, text: str, i: int) -> dict[str, Any]:
    msg: dict[str, Any] = {"id": mid, "type": "message", "date": date, "date_unixtime": str(unix)}
    msg |= {"from": "Canal", "from_id": "channel1"}
    if i % 4 == 1:
        msg["forwarded_from"] = f"Fonte {i % 7}"
    if i % 6 == 2:
        msg |= {"edited": date, "edited_unixtime": str(unix + 60)}
    if i % 2:
        a, b = len(text) // 3, 2 * len(text) // 3
        kind = ENTITIES[i % len(ENTITIES)]
        parts: list[Any] = [text[:a], {"type": kind, "text": text[a:b]}, text[b:]]
        msg["text"] = parts
        msg["text_entities"] = [p if isinstance(p, dict) else {"type": "plain", "text": p} for p in parts]
    else:
        msg["text"] = text
        msg["text_entities"] = [{"type": "plain", "text": text}]
    return msg


def _no_text(mid: int, date: str, unix: int, i: int) -> dict[str, Any]:
    base = {"id": mid, "date": date, "date_unixtime": str(unix), "text": "", "text_entities": []}
    if i % 2:
        return {"type": "service", "actor": "Maria", "actor_id": "user7", "action": "pin_message", **base}
    return {"type": "message", "from": "Ana", "from_id": "user9", "photo": "photos/p.jpg", **base}


def _chat_copy(rows: pl.DataFrame, copy: int, mid: int, js: TextIO, csv: TextIO, chat_id: int, first: bool) -> int:
    """Write one copy of a channel's messages into the open chat's `messages` list and the CSV; returns the next id."""
    texts = (rows["message"] + f" #{copy}").to_list()
    out = []
    csv_rows = []
    for i, (date, unix, text) in enumerate(zip(rows["date"].to_list(), rows["unix"].to_list(), texts, strict=True)):
        if i % 5 == 0:
            out.append(json.dumps(_no_text(mid, date, unix, i), ensure_ascii=False))
            mid += 1
        out.append(json.dumps(_message(mid, date, unix, text, i), ensure_ascii=False))
        csv_rows.append((mid, date, text))
        mid += 1
    js.write(("" if first else ",\n") + ",\n".join(out))
    pl.DataFrame(
        {
            "id": [r[0] for r in csv_rows],
            "channel_id": [chat_id] * len(csv_rows),
            "date": [r[1] for r in csv_rows],
            "message": [r[2] for r in csv_rows],
        }
    ).write_csv(csv, include_header=False)
    return mid


def make_inputs(work: Path, mb: int) -> tuple[Path, Path, int]:
    """Write result.json (~`mb` MB) and input.csv with the same messages; returns their paths and message count."""
    base = pl.concat(
        [pl.read_csv(SHARED / f, infer_schema=False) for f in ("fakewhatsapp_br.csv", "fakebr_news.csv")]
    ).with_columns(unix=pl.col("date").str.to_datetime("%Y-%m-%dT%H:%M:%S", time_zone="UTC").dt.epoch("s"))
    channels = {c: base.filter(pl.col("channel_id") == str(c)) for c in range(1, 7)}
    # one copy of everything is ~2.1x its CSV bytes as JSON (text_entities repeats each text): ~42 MB
    copies = max(1, round(mb * 1e6 / (2.1 * sum(len(m.encode()) + 45 for m in base["message"].to_list()))))
    js_path, csv_path = work / "result.json", work / "input.csv"
    n = 0
    with open(js_path, "w", encoding="utf-8") as js, open(csv_path, "w", encoding="utf-8", newline="") as csv:
        csv.write("id,channel_id,date,message\n")
        js.write('{\n "about": "Here is the data you requested.",\n')
        js.write(
            ' "personal_information": {"user_id": 1, "first_name": "Pesquisa", "phone_number": "+55", "bio": ""},\n'
        )
        js.write(' "contacts": {"about": "...", "list": [{"first_name": "A", "phone_number": "1", "date": "2020"}]},\n')
        js.write(' "chats": {"about": "All chats.", "list": [\n')
        for c in range(1, 7):
            if c == 6:
                js.write(']},\n "left_chats": {"about": "Chats you left.", "list": [\n')
            elif c > 1:
                js.write(",\n")
            js.write(json.dumps({"name": f"Canal {c}", "type": "public_channel", "id": BASE_ID + c})[:-1])
            js.write(', "messages": [\n')
            mid = 1
            for copy in range(copies):
                mid = _chat_copy(channels[c], copy, mid, js, csv, BASE_ID + c, copy == 0)
                n += channels[c].height
            js.write("\n]}")
        js.write("\n]}\n}\n")
    return js_path, csv_path, n


def run_prepare(path: Path, out: Path, work: Path) -> dict[str, float]:
    """`fakegpt prepare PATH` in a child process: wall time, peak RSS (this child's alone) and meta.json's timing."""
    cmd = [sys.executable, "-m", "fakegpt", "prepare", str(path), "--out", str(out), "--force"]
    env = dict(os.environ, MLFLOW_TRACKING_URI=f"sqlite:///{work}/mlflow.db", PYTHONPATH=str(ROOT))
    t0 = time.perf_counter()
    # cwd: the run's artifacts (./mlruns) stay in the work folder, removed at the end
    proc = subprocess.Popen(cmd, env=env, cwd=work, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    tree_peak = 0
    while True:  # sample the RSS of prepare and its children (the JSON reader process) every 50 ms
        pid, status, usage = os.wait4(proc.pid, os.WNOHANG)
        if pid:
            break
        tree_peak = max(tree_peak, _tree_rss_kb(proc.pid))
        time.sleep(0.05)
    wall = time.perf_counter() - t0
    proc.returncode = os.waitstatus_to_exitcode(status)
    err = proc.stderr.read().decode() if proc.stderr else ""
    if proc.returncode:
        raise SystemExit(f"prepare failed on {path.name} ({proc.returncode}): {err.strip()[-500:]}")
    meta = json.loads((out / "meta.json").read_text())
    tokens = meta["train_tokens"] + meta["val_tokens"]
    return {
        "wall": wall,
        "prepare": meta["timing"]["seconds"],
        "cpu": usage.ru_utime + usage.ru_stime,
        "rss_mb": usage.ru_maxrss / 1024,  # KiB on Linux; the largest single process of the tree
        "tree_mb": tree_peak / 1024,  # the most the whole process tree held at once (sampled)
        "tokens": tokens,
        "messages": meta["train_messages"] + meta["val_messages"],
    }


def _tree_rss_kb(pid: int) -> int:
    """Resident KiB of `pid` and its descendants now (Linux /proc); 0 where it cannot be read."""
    total, todo = 0, [pid]
    while todo:
        p = todo.pop()
        try:
            status = Path(f"/proc/{p}/status").read_text()
            total += next((int(x.split()[1]) for x in status.splitlines() if x.startswith("VmRSS:")), 0)
            for task in Path(f"/proc/{p}/task").iterdir():
                todo += [int(c) for c in (task / "children").read_text().split()]
        except (OSError, ValueError):
            continue
    return total


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--mb", type=int, default=1200, help="size of result.json in MB (default 1200)")
    ap.add_argument("--repeat", type=int, default=1, help="runs per format; the fastest counts (default 1)")
    ap.add_argument("--keep", metavar="DIR", help="work in DIR and keep the files (default: a temp folder)")
    args = ap.parse_args()
    with tempfile.TemporaryDirectory(prefix="bench-telegram-json-") as tmp:
        work = Path(args.keep or tmp)
        work.mkdir(parents=True, exist_ok=True)
        t0 = time.perf_counter()
        js, csv, n = make_inputs(work, args.mb)
        sizes = {"json": js.stat().st_size, "csv": csv.stat().st_size}
        print(
            f"inputs: result.json {sizes['json'] / 1e6:.0f} MB, input.csv {sizes['csv'] / 1e6:.0f} MB, "
            f"{n} messages with text; written in {time.perf_counter() - t0:.0f} s; {os.cpu_count()} CPUs"
        )
        env = dict(os.environ, MLFLOW_TRACKING_URI=f"sqlite:///{work}/mlflow.db")
        subprocess.run(  # create the MLflow store once, outside the timed runs
            [sys.executable, "-c", "import mlflow; mlflow.search_experiments()"], env=env, check=True
        )
        runs: dict[str, list[dict[str, float]]] = {"json": [], "csv": []}
        for _ in range(args.repeat):
            for kind, path in (("json", js), ("csv", csv)):
                runs[kind].append(run_prepare(path, work / f"out-{kind}", work))
        for name in ("train.bin", "val.bin"):
            a, b = (work / "out-json" / name).read_bytes(), (work / "out-csv" / name).read_bytes()
            assert a == b, f"{name} differs between the JSON and the CSV run"
        best = {k: min(v, key=lambda r: r["prepare"]) for k, v in runs.items()}
        for kind in ("json", "csv"):
            r = best[kind]
            print(
                f"{kind:4}: prepare() {r['prepare']:7.1f} s  command {r['wall']:7.1f} s  CPU {r['cpu']:7.1f} s  "
                f"{sizes[kind] / 1e6 / r['prepare']:6.1f} MB/s of input  {r['messages'] / r['prepare']:8.0f} msg/s  "
                f"{r['tokens'] / r['prepare'] / 1e6:5.2f} M tokens/s  "
                f"peak RSS {max(x['rss_mb'] for x in runs[kind]):5.0f} MB (largest process), "
                f"{max(x['tree_mb'] for x in runs[kind]):5.0f} MB (process tree, sampled)"
            )
        ratio = best["json"]["prepare"] / best["csv"]["prepare"]
        cpu = min(r["cpu"] for r in runs["json"]) / min(r["cpu"] for r in runs["csv"])
        print(
            f"same bins: yes ({best['json']['tokens']} tokens, {best['json']['messages']} messages); "
            f"JSON/CSV time ratio {ratio:.2f} (target <= 1.5), CPU-time ratio {cpu:.2f} (steadier on a busy "
            f"machine); JSON peak RSS of the process tree "
            f"{max(x['tree_mb'] for x in runs['json']):.0f} MB (target < 1024)"
        )


if __name__ == "__main__":
    main()
