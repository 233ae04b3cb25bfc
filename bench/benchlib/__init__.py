"""The benchmark harness behind ``bench/run.py``.

Modules, one job each, so a new remote kind or tool plugs in without touching the rest:

- ``datasets``: deterministic test data, generated once and reused while its checksums hold.
- ``measure``: run one command, return wall time, peak RSS and CPU time (``os.wait4``).
- ``remotes``: remote kinds (today a local folder; later sshd, an S3 server, a latency proxy).
- ``tools``: each tool under test (tether, rsync, cp, DVC) as the commands a user would type.
- ``cases``: what each case does before, during and after the timed step.
- ``targets``: the issue's performance targets as data, evaluated on the results.
- ``report``: the table and the JSON.
"""
