"""``python tools/score.py ...`` = the console script ``severjax-score ...`` (``severjax.cli.score``; needs the
package installed: ``pip install -e .``)."""

from severjax.cli.score import entry

if __name__ == "__main__":
    raise SystemExit(entry())
