"""kvmem under other frameworks. Each module imports its framework only when imported:
``kvmem.integrations.transformers`` needs torch and Hugging Face transformers."""
