"""What every command-line tool of the plugin shares.

- Argument types defined once: :func:`group_size_arg` (``N`` or
  ``image``), :func:`capacity_factor_arg`, :func:`on_off_arg`.
- :class:`HelpFormatter`: ``--help`` shows each option's default and keeps
  the description's and epilog's line breaks.
- :func:`add_debug_arg` and :func:`run_main`: an expected error (a missing
  file, a wrong width, an existing output) is one line ``error: ...`` on
  stderr and exit status 2; ``--debug`` shows the traceback; any other
  exception is a bug and keeps its traceback.
- SIGTERM (a scheduler's kill) is turned into ``KeyboardInterrupt``, so
  that the temporary ``.part`` files of :mod:`moe_plugin.fileio` are removed
  as on Ctrl-C.
- :func:`silence_mmcv_lite` (mmcv-lite's "install mmcv" warning, which no
  tool of the plugin needs) and :func:`quiet_mmengine` (MMEngine's
  initialisation logs, for tools that print their own summary).
"""
import argparse
import copy
import logging
import math
import signal
import sys
import warnings
from contextlib import contextmanager
from typing import Callable, Iterator, Optional, Sequence, Tuple, Type

#: ``--eval-group-size image`` / ``--group-size image``: each image is its
#: own routing group.
PER_IMAGE = 'image'

#: Errors that a user's input causes (files, shapes, values): one line.
EXPECTED_ERRORS: Tuple[Type[BaseException], ...] = (ValueError,
                                                    FileNotFoundError,
                                                    FileExistsError,
                                                    IsADirectoryError,
                                                    NotADirectoryError,
                                                    PermissionError)

#: The exit status of an expected error (argparse's own for bad usage).
ERROR_STATUS = 2


def group_size_arg(value: str):
    """``argparse`` type of a routing group: a whole number of images >= 1
    (decimal digits, leading zeros allowed: ``08`` is 8), or ``image``.

    Returns:
        int | str: the number, or :data:`PER_IMAGE`.
    """
    if value == PER_IMAGE:
        return PER_IMAGE
    if not value.isascii() or not value.isdigit() or int(value) < 1:
        raise argparse.ArgumentTypeError(
            f'expected a whole number of images >= 1 or {PER_IMAGE!r}, got '
            f'{value!r}')
    return int(value)


def capacity_factor_arg(value: str) -> float:
    """``argparse`` type of a capacity factor: a finite number > 0."""
    try:
        number = float(value)
    except ValueError:
        number = math.nan
    if not number > 0 or math.isinf(number):
        raise argparse.ArgumentTypeError(
            f'a capacity factor must be a number > 0, got {value!r}')
    return number


def on_off_arg(value: str) -> bool:
    """``argparse`` type of a switch: ``on`` or ``off``."""
    if value not in ('on', 'off'):
        raise argparse.ArgumentTypeError(
            f"expected 'on' or 'off', got {value!r}")
    return value == 'on'


class HelpFormatter(argparse.RawDescriptionHelpFormatter):
    """Keeps the description's and epilog's layout and appends
    ``(default: X)`` to each option with a default other than None / False
    whose help does not mention it already (options without a help text
    included)."""

    @staticmethod
    def _shows_default(action) -> bool:
        default = action.default
        return bool(action.option_strings) and not (
            'default' in (action.help or '') or default is None
            or default is False or default is argparse.SUPPRESS)

    @staticmethod
    def _default_text(action) -> str:
        default = action.default
        if isinstance(default, (list, tuple)):
            shown = ' '.join(str(v) for v in default)
        else:
            shown = str(default)
        return '(default: ' + shown.replace('%', '%%') + ')'

    def _format_action(self, action):
        if not (action.help or '').strip() and self._shows_default(action):
            action = copy.copy(action)
            action.help = self._default_text(action)
        return super()._format_action(action)

    def _get_help_string(self, action):
        text = action.help or ''
        if not self._shows_default(action):
            return text
        return f'{text.strip()} {self._default_text(action)}'


def add_debug_arg(parser: argparse.ArgumentParser) -> None:
    """``--debug``: show the traceback of an expected error."""
    parser.add_argument(
        '--debug',
        action='store_true',
        help='show the traceback of an error instead of one line')


def _terminate(signum, frame):
    raise KeyboardInterrupt(f'signal {signum}')


def handle_sigterm() -> None:
    """Make SIGTERM interrupt like Ctrl-C (``finally`` blocks run, so the
    temporary outputs are removed). Main thread only."""
    signal.signal(signal.SIGTERM, _terminate)


def silence_mmcv_lite() -> None:
    """Hide mmcv-lite's warning that its compiled ops are missing (the
    plugin uses none of them)."""
    warnings.filterwarnings(
        'ignore', message=r'Fail to import ``MultiScaleDeformableAttention``')


@contextmanager
def quiet_mmengine(level: int = logging.WARNING) -> Iterator[None]:
    """Show only MMEngine's warnings and errors inside the block (the
    logs of weight initialisation and checkpoint loading are hundreds of
    lines for a ViT)."""
    from mmengine.logging import MMLogger
    logger = MMLogger.get_current_instance()
    saved = logger.level, [h.level for h in logger.handlers]
    logger.setLevel(level)
    for handler in logger.handlers:
        handler.setLevel(max(handler.level, level))
    try:
        yield
    finally:
        logger.setLevel(saved[0])
        for handler, old in zip(logger.handlers, saved[1]):
            handler.setLevel(old)


def run_main(main: Callable[[Optional[Sequence[str]]], object],
             argv: Optional[Sequence[str]] = None,
             expected: Tuple[Type[BaseException], ...] = EXPECTED_ERRORS):
    """Run a tool's ``main(argv)`` as a command.

    An ``expected`` error ends the process with one line on stderr and exit
    status 2, unless ``--debug`` is in the arguments (then it propagates
    with its traceback). SIGTERM interrupts like Ctrl-C; mmcv-lite's warning
    is hidden.

    Returns:
        The value of ``main``.
    """
    silence_mmcv_lite()
    handle_sigterm()
    args = list(sys.argv[1:] if argv is None else argv)
    try:
        return main() if argv is None else main(argv)
    except expected as error:
        if '--debug' in args:
            raise
        message = str(error)
        if isinstance(error, KeyError) or not message:
            message = f'{type(error).__name__}: {message}'
        print(f'error: {message}', file=sys.stderr, flush=True)
        raise SystemExit(ERROR_STATUS)
    except KeyboardInterrupt:
        print('interrupted', file=sys.stderr, flush=True)
        raise SystemExit(130)
