"""The embedded default's tiny world: two-digit additions, their tokenizer, and a small pretrained Qwen2 base."""
