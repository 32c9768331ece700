"""What every job shares: `--config FILE` plus dotted overrides, and connecting to (or starting) Ray."""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
import textwrap
from collections.abc import Callable
from typing import Any

from rlhf_ray.config import ConfigError, RLHFConfig, config_reference, field_help
from rlhf_ray.runtime import runtime_env_vars, setup_process_env


def config_epilog() -> str:
    """Every config key with its type, default and help, grouped by section: the `--help` epilog of a job
    (with `argparse.RawDescriptionHelpFormatter`)."""
    sections = field_help(RLHFConfig)
    lines = ["config keys (set them in the --config YAML, or as section.key=value after the flags):"]
    current = None
    for key, type_str, default, help_ in config_reference():
        section = key.split(".", 1)[0]
        if section != current:
            current = section
            lines += ["", f"{section}: {sections[section]}"]
        lines.append(f"  {key}: {type_str} = {default}")
        lines += textwrap.wrap(help_, width=108, initial_indent=" " * 6, subsequent_indent=" " * 6)
    return "\n".join(lines)


def parse_args(description: str, argv: list[str] | None = None) -> tuple[argparse.Namespace, RLHFConfig]:
    parser = argparse.ArgumentParser(
        description=description,
        epilog=config_epilog(),
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--config", required=True, help="YAML config (see jobs/configs/)")
    parser.add_argument(
        "--address", default=None, help="Ray cluster to join (default: $RAY_ADDRESS, else a local Ray)"
    )
    parser.add_argument(
        "--num-cpus",
        type=int,
        default=None,
        help="logical CPUs of a local Ray (default: what the roles need)",
    )
    parser.add_argument(
        "overrides", nargs="*", help="dotted overrides, e.g. algorithm.kl_coef=0.05 trainer.lr=1e-5"
    )
    args = parser.parse_args(argv)
    try:
        cfg = RLHFConfig.from_yaml(args.config, args.overrides)
    except ConfigError as exc:
        sys.exit(f"config error: {exc}")
    return args, cfg


def init_ray(address: str | None, num_cpus: int | None, needed_cpus: float = 0.0) -> None:
    """Join the cluster at `address` (or $RAY_ADDRESS, as under `ray job submit`), else start a local Ray
    sized for the roles. Local Ray binds its services to 127.0.0.1 and keeps the dashboard off."""
    import ray

    setup_process_env()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    address = address or os.environ.get("RAY_ADDRESS")
    env = {"env_vars": runtime_env_vars()}
    if address:
        try:
            ray.init(address=address, runtime_env=env)
        except ConnectionError as exc:
            sys.exit(
                f"cannot reach the Ray cluster at {address!r}: {exc}. Start it with `ray start --head` "
                f"(see cluster/README.md), or leave --address/RAY_ADDRESS unset to run locally"
            )
        return
    cpus = num_cpus or max(os.cpu_count() or 1, int(needed_cpus + 0.999))
    ray.init(
        address="local",
        num_cpus=cpus,
        include_dashboard=False,
        _node_ip_address="127.0.0.1",
        object_store_memory=int(os.environ.get("RLHF_RAY_OBJECT_STORE_BYTES", 2 * 1024**3)),
        runtime_env=env,
    )


def run_offline_job(
    description: str, argv: list[str] | None, run: Callable[..., dict[str, Any]], dpo: bool = False
) -> dict[str, Any]:
    """The body of an offline stage's job (SFT, reward model, DPO): stage flags and config, Ray sized for
    the ranks, `run(cfg, **flags)`, the summary printed as JSON."""
    from rlhf_ray.trainer.offline import parse_stage_flags

    flags, rest = parse_stage_flags(argv, dpo=dpo)
    args, cfg = parse_args(description, rest)
    init_ray(args.address, args.num_cpus, needed_cpus=cfg.trainer.num_ranks * cfg.placement.policy.num_cpus)
    summary = run(cfg, **flags)
    print(json.dumps(summary, indent=1))
    return summary
