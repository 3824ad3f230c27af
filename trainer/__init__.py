"""Fine-tune and evaluate Gemma 3 on Oxford-IIIT Pet: the program inside the Cloud Run GPU job."""


class UserError(Exception):
    """A problem the user can fix (a bad flag, a missing file): reported as one `Error:` line, and a `Hint:`
    line when there is one, exit code 2."""

    def __init__(self, message: str, hint: str = "") -> None:
        super().__init__(message)
        self.hint = hint
