"""``python tools/make_synthetic.py ...`` = the console script ``severjax-make-synthetic ...`` (``severjax.cli.make_synthetic``; needs the
package installed: ``pip install -e .``)."""

from severjax.cli.make_synthetic import entry

if __name__ == "__main__":
    raise SystemExit(entry())
