"""bpftune: BPF-driven auto-tuning of Linux network sysctls."""

__version__ = "0.1.0"
