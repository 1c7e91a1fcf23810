#!/bin/sh
# /opt/edge/bin/edge: the agent and its dependencies live in /opt/edge/lib, run by
# Debian's python3 (the package depends on python3 (>= 3.11), (<< 3.12)). The launcher
# (edge.release.boot, always from /opt/edge/lib) runs edge on the release that
# EDGE_RELEASES says (self-update: README "Updating"); the factory one when none.
EDGE_HOME="${EDGE_HOME:-/opt/edge}"
PYTHONPATH="$EDGE_HOME/lib${PYTHONPATH:+:$PYTHONPATH}"
export PYTHONPATH
# the unit sets EDGE_RELEASES; by hand, the service's releases when this user may read them
if [ -z "${EDGE_RELEASES+set}" ] && [ -r /var/lib/edge/releases/state.json ]; then
  EDGE_RELEASES=/var/lib/edge/releases
  export EDGE_RELEASES
fi
exec /usr/bin/python3 -P -m edge.release.boot "$@"
