"""A Ray Tune sweep over any RL config keys (--param, or `params` in the sweep file; --kl-coef and --lr
for algorithm.kl_coef and trainer.lr): each trial a full RL run on its own actors, ASHA early stopping,
resumable; ranked by --metric (default: the held-out eval/gold or eval/reward when the run evaluates, else
reward/mean); ends with the results table and the best config as YAML.

python -m jobs.sweep --config jobs/configs/tiny_ppo.yaml --sweep jobs/configs/tiny_sweep.yaml [section.key=value ...]
python -m jobs.sweep --config jobs/configs/tiny_ppo.yaml --search random --kl-coef 0.001 0.3 --lr 1e-4 3e-3 \
    --num-samples 8 --max-concurrent-trials 2 --out runs/sweep-random
python -m jobs.sweep --config jobs/configs/tiny_ppo.yaml --param algorithm.clip_eps=0.1,0.2 \
    --param trainer.lr=loguniform:1e-4,3e-3 --num-samples 2 --metric eval/gold
ray job submit --working-dir . --runtime-env cluster/runtime_env.yaml -- python -m jobs.sweep --config ...

Run again with the same --out (and --name) to resume an interrupted sweep.
"""

from __future__ import annotations

import argparse
import json
import sys

from jobs.common import config_epilog, init_ray
from rlhf_ray.config import ConfigError, RLHFConfig
from rlhf_ray.runtime import setup_process_env
from rlhf_ray.tune import (
    SweepConfig,
    check_params,
    load_sweep_config,
    parse_param_flag,
    ranking,
    sweep_params,
)


def parse(argv: list[str] | None = None) -> tuple[argparse.Namespace, RLHFConfig, SweepConfig]:
    p = argparse.ArgumentParser(
        description=__doc__, epilog=config_epilog(), formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("--config", required=True, help="YAML config of one RL run (see jobs/configs/)")
    p.add_argument("--sweep", default=None, help="YAML of the sweep's settings (rlhf_ray.tune.SweepConfig)")
    p.add_argument("--search", choices=["grid", "random"], default=None)
    p.add_argument(
        "--param",
        dest="params",
        action="append",
        default=None,
        metavar="KEY=SPEC",
        help="search an RL config key: KEY=a,b (grid under --search grid, else choice) or "
        "KEY=grid|choice|uniform|loguniform:a,b (repeat the flag for more keys)",
    )
    p.add_argument("--kl-coef", dest="kl_coef", type=float, nargs="+", default=None, metavar="V")
    p.add_argument("--lr", type=float, nargs="+", default=None, metavar="V")
    p.add_argument("--num-samples", dest="num_samples", type=int, default=None)
    p.add_argument(
        "--metric",
        default=None,
        help="reported metric that ranks the trials (default: eval/gold, eval/reward or reward/mean)",
    )
    p.add_argument("--mode", choices=["max", "min"], default=None)
    p.add_argument("--max-concurrent-trials", dest="max_concurrent_trials", type=int, default=None)
    p.add_argument("--grace-period", dest="grace_period", type=int, default=None)
    p.add_argument("--no-asha", dest="asha", action="store_false", default=None)
    p.add_argument("--out", dest="output_dir", default=None, help="the sweep's directory")
    p.add_argument("--name", default=None, help="the Tune experiment's name")
    p.add_argument("--restart", dest="resume", action="store_false", default=None, help="do not resume")
    p.add_argument("--address", default=None, help="Ray cluster to join (default: $RAY_ADDRESS, else local)")
    p.add_argument("--num-cpus", type=int, default=None, help="logical CPUs of a local Ray")
    p.add_argument("overrides", nargs="*", help="dotted overrides of the RL config, e.g. run.total_steps=20")
    args = p.parse_args(argv)
    # the positional `overrides` are the RL config's (after the sweep file's own `overrides`)
    flags = {
        k: v for k, v in vars(args).items() if k in SweepConfig.__dataclass_fields__ and k != "overrides"
    }
    try:
        if flags.get("params") is not None:
            flags["params"] = {k: v for text in flags["params"] for k, v in parse_param_flag(text).items()}
        sweep = load_sweep_config(args.sweep, **flags)
        cfg = RLHFConfig.from_yaml(args.config, [*sweep.overrides, *args.overrides])
        check_params(cfg, sweep_params(sweep))  # before Ray starts: every searched value makes a valid run
    except ConfigError as exc:
        sys.exit(f"config error: {exc}")
    return args, cfg, sweep


def main(argv: list[str] | None = None) -> dict:
    args, cfg, sweep = parse(argv)
    setup_process_env()  # before DeepSpeed and vLLM are imported
    from rlhf_ray.trainer.sweep import run_sweep, trial_resources

    per_trial = trial_resources(cfg, sweep.trial_cpus).required_resources.get("CPU", 0.0)
    init_ray(args.address, args.num_cpus, needed_cpus=per_trial * sweep.max_concurrent_trials)
    searched = "; ".join(p.describe() for p in check_params(cfg, sweep_params(sweep)))
    print(f"sweep: {searched} (x{sweep.num_samples}), {per_trial:g} CPUs per trial")
    print(f"sweep: {ranking(cfg, sweep).describe()}")
    try:
        result = run_sweep(cfg, sweep)
    except ConfigError as exc:
        sys.exit(f"config error: {exc}")
    print(result.table)
    print(json.dumps(result.paths, indent=1))
    if not result.finished:
        sys.exit("the sweep was interrupted before every trial finished: run the same command to resume it")
    return {
        "rows": result.rows,
        "best": result.best,
        "metric": result.ranking.metric,
        "paths": result.paths,
        "restored": result.restored,
    }


if __name__ == "__main__":
    main()
