"""Reading a config file in a child process, for the process that serves (`strangler run`
and its reloads).

Validation needs YAML, `loader` and the validators pydantic builds for the models; once a
process has built them they stay, and a large file's parse and validation pass through
its heap (1,000 routes: ~8 MiB at the peak). So the serving process asks a fresh
interpreter, which runs `loader.load` and writes back, pickled, the `Config` or the tuple
of the file's `ConfigIssue`s; the serving process unpickles the `Config` without building
a validator (the models defer theirs), and an invalid file raises the very `ConfigError`
that `loader.load` would have. `strangler check`, `diff` and `explain` load in their own
process: they exit right after. (A reload thus briefly needs a second process: ~40 MiB
and 0.4 s for 1,000 routes.)

The child imports this very copy of `proxy` (its directory first on the path, the current
directory not on it: `-P`), whatever the serving process's working directory holds. One
that cannot start, fails or takes longer than `TIMEOUT` is reported as one issue of the
file, so a reload fails and changes nothing, like any other invalid file.
"""

from __future__ import annotations

import os
import pickle
import subprocess
import sys
from collections.abc import Sequence
from pathlib import Path

from proxy.config import Config, ConfigError, ConfigIssue

TIMEOUT = 120.0  # seconds; 1,000 routes take about one
_PACKAGE_ROOT = str(Path(__file__).resolve().parents[1])
_CHILD = """\
import sys
root = sys.argv.pop(1)
if root not in sys.path:
    sys.path.insert(0, root)
from proxy.offload import main
raise SystemExit(main(sys.argv[1:]))
"""


def load(path: str | os.PathLike[str], *, python: str | None = None) -> Config:
    """`loader.load(path)`, run in a child process (`python`, by default this interpreter):
    a `Config`, or `ConfigError`."""
    filename = os.fspath(path)
    command = [python or sys.executable, "-P", "-c", _CHILD, _PACKAGE_ROOT, filename]
    try:
        done = subprocess.run(
            command,
            stdin=subprocess.DEVNULL,
            capture_output=True,
            timeout=TIMEOUT,
            check=False,
        )
    except subprocess.TimeoutExpired:
        raise _failure(filename, f"validating it took longer than {TIMEOUT:g} s") from None
    except OSError as exc:
        raise _failure(filename, f"cannot start a process to validate it: {exc}") from None
    answer = _unpickle(done.stdout) if done.returncode == 0 else None
    if isinstance(answer, Config):
        return answer
    if isinstance(answer, tuple) and all(isinstance(i, ConfigIssue) for i in answer):
        raise ConfigError(answer)
    lines = done.stderr.decode(errors="replace").strip().splitlines()
    reason = lines[-1] if lines else f"exit status {done.returncode}"
    raise _failure(filename, f"the process validating it failed: {reason}")


def _unpickle(data: bytes) -> object:
    try:
        return pickle.loads(data)
    except (pickle.UnpicklingError, EOFError, ValueError, TypeError, AttributeError):
        return None


def _failure(filename: str, message: str) -> ConfigError:
    return ConfigError([ConfigIssue(filename, 0, "", message)])


def main(argv: Sequence[str]) -> int:
    """The child: load the one file named and write the pickled answer to stdout."""
    from proxy.loader import load as load_here

    if len(argv) != 1:
        print("usage: python -m proxy.offload FILE", file=sys.stderr)  # or through _CHILD
        return 2
    answer: Config | tuple[ConfigIssue, ...]
    try:
        answer = load_here(argv[0])
    except ConfigError as err:
        answer = err.issues
    sys.stdout.buffer.write(pickle.dumps(answer, protocol=pickle.HIGHEST_PROTOCOL))
    sys.stdout.buffer.flush()
    return 0


if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1:]))
