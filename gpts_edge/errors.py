"""The project's own error type: one clear line for the user, exit code 2 from the CLI."""


class GptsError(Exception):
    """A problem the user can fix (bad file, bad option). Its message names what and where."""

    exit_code = 2
