"""What the original example imported from aitemplate: target detection (target.py), compile
with cached implementation choices and graph capture (compile.py), device-event timing
(timing.py), results files (results.py), verification against TIMM (verify.py), the
command-line plumbing the thin scripts share (cli.py), and data-parallel runs under torchrun
(distributed.py)."""


class EngineError(RuntimeError):
    """A problem the user can act on; the message is one line."""
