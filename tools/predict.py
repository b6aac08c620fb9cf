"""``python tools/predict.py ...`` = the console script ``severjax-predict ...`` (``severjax.cli.predict``; needs the
package installed: ``pip install -e .``)."""

from severjax.cli.predict import entry

if __name__ == "__main__":
    raise SystemExit(entry())
