"""The KServe predictor of sonogen generators (``python -m serving`` in the serving image, ``sonogen serve`` here)."""

import sys

# kserve parses sys.argv when it is first imported; the command lines that start a server are not its flags
_argv, sys.argv = sys.argv, sys.argv[:1]
try:
    import kserve  # noqa: F401
finally:
    sys.argv = _argv
