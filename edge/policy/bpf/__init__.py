"""The datapath's eBPF source (``policy.bpf.c``), its build script and the prebuilt
object (``policy.bpf.o``) the agent loads."""
