"""WASM plugins on the data path (DESIGN.md §7, plugins/README.md): the host, its
limits and capabilities, hot reload."""
