"""Command-line plumbing shared by lsm-train, lsm-eval, lsm-generate and lsm-plot.

Bad input (a flag, a config value or override, a data source, a workdir, a
checkpoint step) is answered in one line naming the field, the value and what
was expected, with exit code 2 and no traceback::

  lsm-train: error: model.n_heads=0: expected a positive int

``--traceback`` prints the traceback as well. Errors that are not the user's
(a failure inside a training step) keep their traceback.
"""

import re
import sys
import traceback
from collections.abc import Callable, Sequence

from absl import app, flags

FLAGS = flags.FLAGS
_TRACEBACK = flags.DEFINE_boolean(
    "traceback", False, "On bad input, print the Python traceback as well as "
    "the one-line error.")


class UsageError(ValueError):
  """Input the user can fix: printed as one line, exit code 2."""


# Exceptions that reach the user as one line. Library code in lsm raises
# ValueError naming the argument, its value and the expectation for bad input.
USER_ERRORS = (ValueError, FileNotFoundError, NotADirectoryError,
               IsADirectoryError, PermissionError, app.UsageError)


def one_line(message) -> str:
  """``message`` with its whitespace (newlines included) collapsed."""
  return " ".join(str(message).split())


_FIELD_MESSAGE = re.compile(
    r"^(?:\w+: )?(?:(?P<section>\w+)\.)?(?P<field>[\w.]+)=(?P<value>.*?)[;:] "
    r"(?P<rest>.*)$", re.DOTALL)


def section_message(section: str, error: Exception, values=None) -> str:
  """A config section's validation error as ``section.field=value: expected ...``.

  The typed sections raise e.g. ``LMConfig: n_heads=0; expected a positive int``
  or ``train.num_steps=-3; expected a positive int``; this names the field the
  way an override spells it. ``values`` (the section's dict) lets a message
  that names only the value ("unknown mixer 'foo'") name its field too.
  """
  text = re.sub(r"^\w+Config: ", "", one_line(error))
  if isinstance(error, TypeError):
    match = re.search(r"unexpected keyword argument '(\w+)'", text)
    if match:
      return f"{section}.{match.group(1)}: the {section} section has no such field"
    return f"{section}: {text}"
  match = _FIELD_MESSAGE.match(text)
  if not match:
    for key, value in (values or {}).items():
      if isinstance(value, (str, int, float)) and not isinstance(value, bool) \
          and f"{value!r}" in text:
        return f"{section}.{key}={value!r}: {text}"
    return f"{section}: {text}"
  name = match["field"]
  if match["section"] and match["section"] != section:
    name = f"{match['section']}.{name}"
  if not name.startswith(f"{section}."):
    name = f"{section}.{name}"
  return f"{name}={match['value']}: {match['rest']}"


def flag_error_message(error: Exception, argv: Sequence[str]) -> str:
  """One line for an error raised while absl / ml_collections parse ``argv``."""
  text = str(error)
  if "Error whilst parsing config file" in text:
    # ml_collections embeds the config file's traceback; its last line is the
    # config's own message ("ValueError: size='999m'; expected one of ...").
    flag = text.split(": Error whilst", 1)[0].removeprefix("flag ")
    last = [ln for ln in text.splitlines() if ln.strip()][-1].strip()
    last = re.sub(r"^\w+(Error|Exception): ", "", last)
    return f"{flag}: {last}"
  if isinstance(error, (AttributeError, KeyError)):
    # An override of a key the config does not have: ml_collections says only
    # the key ("'lrr'\nDid you mean "lr" ...").
    key = re.findall(r"\w+", text.split("\n", 1)[0].replace("\\n", " "))
    key = key[0] if key else text
    hint = re.search(r'Did you mean "(\w+)"', text.replace("\\", ""))
    for arg in argv:
      name = arg.split("=", 1)[0]
      if name.startswith("--config.") and name.split(".")[-1] == key:
        value = arg.split("=", 1)[1] if "=" in arg else ""
        return (f"{name}={value}: the config has no field "
                f"{name.removeprefix('--config.')}"
                + (f"; did you mean {hint.group(1)!r}?" if hint else ""))
    return f"a --config override names a key the config does not have: {key}"
  text = one_line(text)
  # absl: "flag --x=y: message" -> "--x=y: message".
  return text.removeprefix("flag ")


def fail(prog: str, message: str, *, exc: BaseException | None = None):
  """Prints ``prog: error: message`` (and the traceback with --traceback);
  exits with code 2."""
  if exc is not None and _wants_traceback():
    traceback.print_exception(exc)
  # An error listing several differences (e.g. a checkpoint that does not fit
  # the run) keeps one line per difference.
  lines = getattr(exc, "lines", None) or [one_line(message)]
  print(f"{prog}: error: " + "\n".join(lines), file=sys.stderr)
  sys.exit(2)


def _wants_traceback() -> bool:
  # Read from argv as well: a parse error comes before FLAGS holds the value.
  if FLAGS.is_parsed() and _TRACEBACK.value:
    return True
  return any(a in ("--traceback", "--traceback=true", "--traceback=True")
             for a in sys.argv[1:])


def run(main: Callable[[list[str]], None], prog: str,
        argv: Sequence[str] | None = None):
  """``absl.app.run(main)`` with one-line errors for bad input (exit code 2)."""
  argv = list(sys.argv if argv is None else argv)

  def parse(args):
    try:
      return FLAGS(args)
    except (flags.Error, AttributeError, KeyError, ValueError, OSError) as e:
      fail(prog, flag_error_message(e, args), exc=e)

  try:
    app.run(main, argv=argv, flags_parser=parse)
  except USER_ERRORS as e:
    fail(prog, str(e), exc=e)


def check_args(argv: Sequence[str], most: int = 1):
  """No positional arguments past the program name (absl passes them on)."""
  if len(argv) > most:
    raise UsageError(f"unexpected arguments {list(argv[most:])}; expected "
                     "only --flags")
