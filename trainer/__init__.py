"""Fine-tune and evaluate Gemma 3 on Oxford-IIIT Pet: the program inside the Cloud Run GPU job."""


class UserError(Exception):
    """A problem the user can fix (a bad flag, a missing file): reported as one line, exit code 2."""
