"""edge: an edge runtime for IoT gateways."""

__version__ = "0.1.0"
