"""``python tools/tune.py ...`` = the console script ``severjax-tune ...`` (``severjax.cli.tune``; needs the
package installed: ``pip install -e .``)."""

from severjax.cli.tune import entry

if __name__ == "__main__":
    raise SystemExit(entry())
