"""User-facing errors: one line, exit code 2, no traceback."""


class UserError(Exception):
    """Bad input from the user (config, data file, CLI argument).

    The message is printed as is, so it must name the file, line or key at fault.
    """

    exit_code = 2
