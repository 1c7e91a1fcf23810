"""The control plane on the gateway: desired bundles, their verification, apply and rollback."""
