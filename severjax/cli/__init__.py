"""The command-line tools, one module each (``severjax.cli.<tool>``, console script ``severjax-<tool>``).

Every tool module has ``main(argv=None)`` (runs the tool, returns its result; errors raise) and
``entry() -> int`` (the console script: one-line user errors, exit status 2). ``flags`` holds the flags
the prediction tools share, ``errors`` the entry wrapper.
"""
