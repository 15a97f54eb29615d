"""The one exception type for mistakes a user can make (bad task, size, path, checkpoint...).

Library code raises it with a one-line message that says what was wrong and how to mend it;
`cli.py` prints the message and exits with code 2.
"""


class UserError(Exception):
    """An input the user can get wrong. The message is one line, shown as-is."""
