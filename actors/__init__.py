"""The Ray actors: thin shells that put `rlhf_ray` library code on cluster resources (the RL roles, the
offline stages' trainer ranks, the glue worker), with what the driver needs to place, name and wait on them."""
