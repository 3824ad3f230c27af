"""Fine-tune and evaluate Gemma 3 on Oxford-IIIT Pet: the program inside the Cloud Run GPU job."""


class UserError(Exception):
    """A problem the user can fix (a bad flag, a missing file): reported as one `Error:` line and one
    `Hint:` line, exit code 2.

    `recurs`: the same inputs fail the same way on every attempt, so inside a Cloud Run job the error is
    recorded and the task's later attempts exit at once with it (trainer/failure.py). False where another
    attempt, on another host, may get further (no GPU visible).
    """

    def __init__(self, message: str, hint: str = "", *, recurs: bool = True) -> None:
        super().__init__(message)
        self.message = message
        self.hint = hint
        self.recurs = recurs
