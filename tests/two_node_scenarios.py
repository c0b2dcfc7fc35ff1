"""Scenarios on a 2-node Ray cluster on one machine (ray.cluster_utils.Cluster), run as a script by
tests/test_two_nodes.py: a Cluster needs its own driver process, apart from the tests' embedded Ray.

    python tests/two_node_scenarios.py spread|remove-node SLIDES_DIR OUT_DIR
Prints one JSON line with what the test checks.
"""

from __future__ import annotations

import json
import os
import sys
import threading
import time
from pathlib import Path

import pyarrow.parquet as pq


def compress(address: str, slides: str, out: str, pool_size: int):
    from nic.compress.stage import run_compress
    from nic.config.base import build_config
    from nic.config.compress import CompressConfig

    cfg = build_config(CompressConfig, {"slides": [slides], "encoder": "mean-rgb", "out": out,
                                        "ray": {"address": address}, "pool_size": pool_size,
                                        "cpus_per_actor": 1, "batch_size": 64}, "two-node scenario")
    return run_compress(cfg)


def encoder_actor_nodes() -> set[str]:
    from ray.util.state import list_actors

    actors = list_actors(detail=True, limit=1000, raise_on_missing_output=False)
    # an actor waiting to be placed has no node yet
    return {a.node_id for a in actors if a.node_id and a.state == "ALIVE"
            and ("Map" in (a.class_name or "") or "Encoder" in (a.class_name or ""))}


def manifest(out: str) -> list[dict]:
    return pq.read_table(Path(out) / "slides.parquet").to_pylist()


def main() -> None:
    scenario, slides, out = sys.argv[1:4]
    os.environ.pop("RAY_ADDRESS", None)
    from ray.cluster_utils import Cluster

    # The dashboard serves the state API the watcher lists actors with.
    # Logical CPUs: room for the planning tasks beside the encoder actors (with 1 CPU per node the
    # two actors would hold every CPU and planning could never run), and on the head for both
    # actors plus planning once the worker node is gone (lost blocks are rebuilt by re-planning).
    cluster = Cluster(initialize_head=True, head_node_args={"num_cpus": 3, "include_dashboard": True})
    worker = cluster.add_node(num_cpus=2)
    cluster.wait_for_nodes()
    import ray

    ray.init(address=cluster.address, log_to_driver=False)
    result: dict = {"nodes": len([n for n in ray.nodes() if n["Alive"]])}
    try:
        if scenario == "spread":
            seen: set[str] = set()
            stop = threading.Event()

            def watch() -> None:
                while not stop.is_set():
                    try:
                        seen.update(encoder_actor_nodes())
                    except Exception:
                        pass
                    time.sleep(0.5)

            watcher = threading.Thread(target=watch, daemon=True)
            watcher.start()
            result["code"] = compress(cluster.address, slides, out, pool_size=2)
            stop.set()
            watcher.join()
            result["actor_nodes"] = len(seen)
        elif scenario == "remove-node":
            holder: dict = {}
            job = threading.Thread(target=lambda: holder.update(code=compress(cluster.address, slides, out, 2)))
            job.start()
            deadline = time.monotonic() + 600
            # remove the worker node once encoding is under way on it
            while time.monotonic() < deadline and worker.node_id not in encoder_actor_nodes():
                time.sleep(0.2)
            result["removed_while_encoding"] = worker.node_id in encoder_actor_nodes()
            cluster.remove_node(worker, allow_graceful=False)
            job.join(timeout=900)
            result["finished"] = not job.is_alive()
            result["code"] = holder.get("code")
        rows = manifest(out)
        stats = json.loads((Path(out) / "compress_run.json").read_text())
        retry = stats.get("retry") or {}
        result["first_pass_slides"] = stats.get("slides")
        result["first_pass_tiles"] = stats.get("tile_encodings")
        result["retry_slides"] = retry.get("slides", 0)
        result["retry_tiles"] = retry.get("tile_encodings", 0)
        result["retry_nested"] = retry.get("retry")
        result["total_tiles"] = sum(int(r["tiles"] or 0) for r in rows if r["status"] == "ok")
        result["rows"] = len(rows)
        result["unique_ids"] = len({r["slide_id"] for r in rows})
        result["statuses"] = sorted(r["status"] for r in rows)
        result["reasons"] = sorted({r["reason"] for r in rows if r["status"] != "ok"})
        result["tiles_match"] = all(
            r["status"] != "ok" or pq.ParquetFile(Path(out) / "tiles" / f"slide_id={r['slide_id']}" /
                                                  "part-0.parquet").metadata.num_rows == r["tiles"] * (8 if r.get("dihedral") else 1)
            for r in rows)
    finally:
        ray.shutdown()
        cluster.shutdown()
    print(json.dumps(result))


if __name__ == "__main__":
    main()
