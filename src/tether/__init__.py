"""tether: keep research datasets in step between your workspace and the places data lives.

The same operations the CLI runs are callable from Python (notebooks, pipelines)::

    import tether
    result = tether.diff("densegen/my_dataset", "hpc")   # -> DiffResult with .push / .pull plans
    tether.push("densegen/my_dataset", "hpc")            # -> SyncResult with .plan and .record

Every call raises a subclass of :class:`tether.TetherError` on failure, carrying ``exit_code``
and ``hint``.
"""

from tether._version import __version__
from tether.errors import ExitCode, TetherError
from tether.plan import Action, Direction, Mode, Plan, Side, Status
from tether.sync import DiffResult, SyncResult, diff, lock_break, lock_status, pull, push
from tether.workspace import Workspace

__all__ = [
    "Action",
    "DiffResult",
    "Direction",
    "ExitCode",
    "Mode",
    "Plan",
    "Side",
    "Status",
    "SyncResult",
    "TetherError",
    "Workspace",
    "__version__",
    "diff",
    "lock_break",
    "lock_status",
    "pull",
    "push",
]
