"""Zero-trust network policy (DESIGN.md §8): plain policy values, the failsafe set and
a pure-Python reference evaluator. Nothing here imports pydantic or YAML: documents are
validated in the config child (:mod:`edge.config.policy`), which hands the agent a
:class:`~edge.policy.spec.PolicySettings`. :mod:`edge.policy.tables` compiles a policy
into the contents of the kernel datapath's BPF maps (the datapath itself is not built
yet)."""
