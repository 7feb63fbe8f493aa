"""The one exception type users see: a mistake they can fix, told in one line."""


class UserError(Exception):
  """Bad input the user can fix (a missing file, a wrong flag, an empty folder).

  `flowers_main` prints the message on one line and exits with status 2,
  instead of a stack trace. The message names the thing and the fix.
  """
