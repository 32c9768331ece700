"""Weight sync: time per sync and bytes moved, for both transports (`rollout.weight_sync=object_store` and
`broadcast`), on the tiny model and SmolLM2-135M.

One set of roles per model (policy trainer rank, one vLLM rollout engine, ...), started as an RL run
would start them; both transports are opened on it and their syncs alternate (object store, broadcast,
object store, ...), so other load on the machine hits both alike. Each sync is the driver's call as the
RL loop makes it (`rlhf_ray.trainer.weight_sync`); besides its wall time: the engine's own in-place reload
(`RolloutEngine.stats()['last_update_s']`), and from Ray's timeline the sender's and receiver's method
times. Bytes = the parameters sent (a tied output head is not sent), from the trainer's weight manifest.

python -m bench.weight_sync                # tiny + SmolLM2, 10 syncs per transport (~6 min)
python -m bench.weight_sync --quick        # tiny only, 5 syncs per transport (~2 min)
"""

from __future__ import annotations

import argparse
import json
import os
import time
from typing import Any

from bench.common import RESULTS, machine, snapshot, spread, workload_overrides, write_result


def measure(workload: str, syncs: int) -> dict[str, Any]:
    import ray

    from actors.placement import needed_cpus
    from bench.timeline import ROLE_OF
    from rlhf_ray.config import RLHFConfig
    from rlhf_ray.runtime import runtime_env_vars, setup_process_env
    from rlhf_ray.trainer.roles import start_roles
    from rlhf_ray.trainer.weight_sync import BroadcastSync, ObjectStoreSync
    from rlhf_ray.weight_transport import manifest_nbytes

    setup_process_env()
    config, overrides = workload_overrides(workload)
    cfg = RLHFConfig.from_yaml(
        config, [*overrides, "trainer.num_ranks=1", "run.output_dir=/tmp/rlhf_bench_sync"]
    )
    ray.init(
        address="local",
        num_cpus=max(os.cpu_count() or 1, int(needed_cpus(cfg) + 0.999)),
        include_dashboard=False,
        _node_ip_address="127.0.0.1",
        object_store_memory=1024**3,
        runtime_env={"env_vars": runtime_env_vars()},
        log_to_driver=False,
    )
    start = snapshot()
    try:
        roles = start_roles(cfg)
        timeout = cfg.run.call_timeout_s
        manifest = roles.policy.weight_manifest(timeout)
        nbytes = manifest_nbytes(manifest)  # in the weights' own dtype (bf16 travels as bf16)
        transports = {
            "object_store": ObjectStoreSync(roles, timeout),
            "broadcast": BroadcastSync(roles, timeout),
        }
        engine = roles.engines[0]
        times: dict[str, list[dict[str, float]]] = {k: [] for k in transports}
        for i in range(syncs + 1):  # the first round warms both up and is not counted
            for name, sync in transports.items():
                t0 = time.time()
                sync.sync()
                t1 = time.time()
                reload_s = ray.get(engine.stats.remote())["last_update_s"]
                if i > 0:
                    times[name].append(
                        {"start": t0, "end": t1, "wall_s": t1 - t0, "engine_reload_s": reload_s}
                    )
        time.sleep(2.0)
        events = ray.timeline()
        for rows in times.values():
            for row in rows:
                lo, hi = row.pop("start") * 1e6, row.pop("end") * 1e6
                for side in ("sync_send", "sync_receive"):
                    row[f"{side}_s"] = (
                        sum(
                            e.get("dur", 0.0)
                            for e in events
                            if ROLE_OF.get(e.get("cat", "")) == side and lo <= e["ts"] <= hi
                        )
                        / 1e6
                    )
        roles.shutdown()
    finally:
        ray.shutdown()
    out: dict[str, Any] = {
        "model": cfg.model.policy_path,
        "tensors": len(manifest),
        "bytes": nbytes,
        "load": {"start": start, "end": snapshot()},
    }
    for name, rows in times.items():
        wall = [r["wall_s"] for r in rows]
        out[name] = {
            "syncs": len(rows),
            "wall_s": spread(wall),
            "engine_reload_s": spread([r["engine_reload_s"] for r in rows]),
            "sender_task_s": spread([r["sync_send_s"] for r in rows]),
            "receiver_task_s": spread([r["sync_receive_s"] for r in rows]),
            "mb_per_s": nbytes / 1e6 / spread(wall)["median"],
        }
    return out


def main(argv: list[str] | None = None) -> dict[str, Any]:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--workloads", nargs="+", choices=["tiny", "smollm2"], default=None)
    p.add_argument("--syncs", type=int, default=None, help="timed syncs per transport")
    p.add_argument("--quick", action="store_true", help="tiny only, 5 syncs per transport")
    args = p.parse_args(argv)
    names = args.workloads or (["tiny"] if args.quick else ["tiny", "smollm2"])
    syncs = args.syncs or (5 if args.quick else 10)
    name_out = "weight_sync_quick" if args.quick else "weight_sync"
    previous = RESULTS / f"{name_out}.json"
    # a run of some workloads keeps the other workloads' earlier figures in the same file
    kept = json.loads(previous.read_text()).get("workloads", {}) if previous.is_file() else {}
    result: dict[str, Any] = {
        "machine": machine(),
        "workloads": {k: v for k, v in kept.items() if k not in names},
    }
    print("| model | bytes | transport | wall s (median [min-max]) | engine reload s | MB/s |")
    print("|---|---:|---|---:|---:|---:|")
    for name in names:
        res = measure(name, syncs)
        result["workloads"][name] = res
        for t in ("object_store", "broadcast"):
            w = res[t]["wall_s"]
            print(
                f"| {name} | {res['bytes'] / 1e6:.1f} MB | {t} | {w['median']:.3f} [{w['min']:.3f}-{w['max']:.3f}] | "
                f"{res[t]['engine_reload_s']['median']:.3f} | {res[t]['mb_per_s']:.0f} |",
                flush=True,
            )
    path = write_result(name_out, result)
    print(f"wrote {path}")
    return result


if __name__ == "__main__":
    main()
