"""Adapters: PEFT injection and state (lora), file layouts and conversion (formats), and the
metadata written into every adapter file (metadata)."""
