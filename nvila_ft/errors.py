"""The one base class of the errors that are the user's to fix.

The command line reports any `UserError` as one line naming the file, record, field or setting and the fix,
without a traceback. Each error kind subclasses it where it is raised (a config value, a policy, a checkpoint,
a data record, an export); kinds that were `ValueError`s stay `ValueError`s too.
"""

from __future__ import annotations


class UserError(Exception):
    """A mistake in the user's configuration, data or files, with a message that says how to fix it."""
