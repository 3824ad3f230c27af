"""The one exception type for problems the user can fix: a message and a hint."""


class UserError(Exception):
    """Shown as `Error: <message>` / `Hint: <hint>`, exit status 2, no traceback."""

    def __init__(self, message: str, hint: str = "") -> None:
        super().__init__(message)
        self.message = message
        self.hint = hint
