"""Built-in tuners: one module per tuner, its BPF program in bpf/<name>.bpf.c."""
