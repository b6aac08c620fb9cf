"""``python tools/convert_weights.py ...`` = the console script ``severjax-convert-weights ...`` (``severjax.cli.convert_weights``; needs the
package installed: ``pip install -e .``)."""

from severjax.cli.convert_weights import entry

if __name__ == "__main__":
    raise SystemExit(entry())
