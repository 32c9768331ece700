"""The Ray actors of the RL stage: thin shells that put `rlhf_ray` library code on cluster resources."""
