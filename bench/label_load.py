"""Load test of ``rlhfkit label serve`` on loopback: N concurrent labellers x M submissions on a SQLite file.

    python bench/label_load.py [--labellers 50] [--per-labeller 40]

Prints submissions, lost, duplicated, p50/p95/max latency of the label POST and throughput.
"""

from __future__ import annotations

import argparse
import tempfile
from pathlib import Path

from rlhfkit.label.db import Database
from rlhfkit.label.export import stored_labels
from rlhfkit.label.testing import run_load, seed_load_db, start_server


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--labellers", type=int, default=50)
    p.add_argument("--per-labeller", type=int, default=40)
    p.add_argument("--overlap", type=int, default=3)
    a = p.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        db = Path(tmp) / "load.db"
        items = (a.labellers * a.per_labeller) // a.overlap + a.labellers
        tokens, pid = seed_load_db(db, a.labellers, items, a.overlap)
        proc, url = start_server(db)
        try:
            res = run_load(lambda: url, tokens, pid, a.per_labeller)
        finally:
            proc.terminate()
            proc.wait(10)
        labels = stored_labels(Database(str(db)), pid)
        keys = [lab["idempotency_key"] for lab in labels]
        lost = len(set(res["acked"]) - set(keys))
        print("| labellers x submissions | acked | stored | lost | duplicated | p50 ms | p95 ms | max ms | "
              "submissions/s |")
        print("|---|---|---|---|---|---|---|---|---|")
        print(f"| {a.labellers} x {a.per_labeller} | {len(res['acked'])} | {len(labels)} | {lost} | "
              f"{len(keys) - len(set(keys))} | {res['p50_ms']:.1f} | {res['p95_ms']:.1f} | {res['max_ms']:.1f} | "
              f"{len(res['acked']) / res['wall_s']:.0f} |")
        if res["errors"]:
            print("errors:", res["errors"][:5])


if __name__ == "__main__":
    main()
