"""Versioned remotes: content-addressed objects plus snapshots, tied to git commits.

One module per job: ``layout`` (remote paths and the snapshot format), ``cache`` (the local
content-addressed cache), ``lockfile`` (tether.lock and reading it at git revisions), ``gitrev``
(the git commands), ``localscan`` (the workspace's current state), ``store`` (push and fetch
through a Remote), ``checkout`` (cache to workspace), ``gc`` and ``scrub``. The CLI lives in
``tether.cli_versioned``.
"""
