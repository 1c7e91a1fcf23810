"""Self-update: agent releases side by side (A/B), a launcher that picks one, rollback.

:mod:`edge.release.slots` keeps the releases and the state that says which one runs;
:mod:`edge.release.boot` is the launcher (``/opt/edge/bin/edge``) that starts it. The
control plane pushes a release as ``agent.release`` in a desired bundle
(:class:`edge.config.agent.ReleaseConfig`); :mod:`edge.sync.controller` installs it,
restarts onto it and commits it or goes back after the health window.
"""
