"""Entry points a user runs locally (`python -m jobs.ppo ...`) or with `ray job submit`."""
