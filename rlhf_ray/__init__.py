"""rlhf_ray: RLHF (SFT, reward model, PPO/GRPO/RLOO/REINFORCE++) as Ray actors with DeepSpeed and vLLM."""

__version__ = "0.1.0"
