"""The RL machinery: config, data, rollouts, rewards, advantages, the GRPO trainer, checkpoints and metrics."""
