"""The local web page, REST API and /metrics of the agent (DESIGN.md §9)."""
