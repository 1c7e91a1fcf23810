#!/bin/sh
# /opt/edge/bin/edge: the agent and its dependencies live in /opt/edge/lib, run by
# Debian's python3 (the package depends on python3 (>= 3.11), (<< 3.12)).
EDGE_HOME="${EDGE_HOME:-/opt/edge}"
PYTHONPATH="$EDGE_HOME/lib${PYTHONPATH:+:$PYTHONPATH}"
export PYTHONPATH
exec /usr/bin/python3 -P -m edge "$@"
