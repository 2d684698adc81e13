"""The one exception type for user mistakes.

Anything the user can fix (a typo, a missing model, an unsupported device) is raised as
:class:`UserError`. Entry points print its message on one line and exit with status 2, without a
traceback; every other exception is a bug in lit-lora and keeps its traceback.
"""

from __future__ import annotations


class UserError(Exception):
    """A mistake in the user's config, data or environment, with a message that says what to change."""
