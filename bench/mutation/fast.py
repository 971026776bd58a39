"""Run mutmut's mutants of chosen functions against a short list of tests, in one process (docs/protocol.md,
"Mutation testing"). mutmut 3 runs, per mutant, every selected test that calls the function, in a forked worker;
on a shared 2-core machine the protocol's functions, called by every small sweep, take minutes per mutant that
survives. Here each group of functions gets the tests that check it, pytest runs in-process with `-x`, and the
mutant is switched on through MUTANT_UNDER_TEST (mutmut's trampolines read it at each call).

Needs the mutated copy: run `bench/mutation.sh` (or `mutmut run`) once first, which writes mutants/.
Usage: python bench/mutation/fast.py GLOB [GLOB...] -- PYTEST ARGS   (from the project root; prints one line per
mutant, killed or SURVIVED, and a count)."""

from __future__ import annotations

import contextlib
import fnmatch
import io
import os
import re
import signal
import sys
import time
from pathlib import Path


def mutant_names(root: Path, globs: list[str]) -> list[str]:
    """The names of the mutants under root (mutants/src) matching any glob, as mutmut names them."""
    names = []
    for path in sorted(root.rglob("*.py")):
        module = ".".join(path.relative_to(root).with_suffix("").parts)
        for name in sorted(
            set(re.findall(r"'(x[\w\u01c1]*__mutmut_\d+)'", path.read_text())),
            key=lambda n: (n.rsplit("_", 1)[0], int(n.rsplit("_", 1)[1])),
        ):
            full = f"{module}.{name}"
            if any(fnmatch.fnmatchcase(full, g) for g in globs):
                names.append(full)
    return names


def main(argv: list[str]) -> int:
    split = argv.index("--") if "--" in argv else len(argv)
    globs, tests = argv[:split], argv[split + 1 :]
    os.chdir("mutants")
    sys.path.insert(0, str(Path("src").resolve()))
    import pytest

    from vulnsteer import neardup  # its cache would hand a mutant the unmutated keys

    def too_slow(*_) -> None:
        raise TimeoutError("the mutant ran past its time (an endless loop counts as killed, as in mutmut)")

    # The limit is in CPU seconds of this process (SIGPROF), not wall-clock ones: on a machine shared with other work
    # (or a paused run) a slow mutant is not a killed one.
    signal.signal(signal.SIGPROF, too_slow)

    def run(name: str, limit: float = 0.0) -> int:
        os.environ["MUTANT_UNDER_TEST"] = name
        neardup.band_keys.cache_clear()
        signal.setitimer(signal.ITIMER_PROF, limit)
        try:
            with contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(io.StringIO()):
                return int(pytest.main(["-q", "-x", "-p", "no:cacheprovider", "-p", "no:randomly", *tests]))
        except TimeoutError:
            return 1
        finally:
            signal.setitimer(signal.ITIMER_PROF, 0)

    started = time.process_time()
    if run("") != 0:
        print("the tests fail without a mutant: fix them first")
        return 1
    limit = 2 * (time.process_time() - started) + 5  # the clean run's CPU time, imports included, twice over
    names = mutant_names(Path("src"), globs)
    survived = 0
    for name in names:
        killed = run(name, limit) != 0
        survived += not killed
        print(("killed   " if killed else "SURVIVED ") + name, flush=True)
    print(f"{len(names) - survived} of {len(names)} killed")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
