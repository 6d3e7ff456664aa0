"""Errors that end a run with one line and a known exit code."""


class InputError(Exception):
    """Bad input from the user (a file, a flag, a path): reported in one line, exit code 2.

    ``agreed`` marks an error that every rank raised together (after a bcast or allgather),
    so one rank reports it and all exit cleanly; any other error on one rank aborts the job.
    """

    exit_code = 2

    def __init__(self, message: str, agreed: bool = False) -> None:
        super().__init__(message)
        self.agreed = agreed
