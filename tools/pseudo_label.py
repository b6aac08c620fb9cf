"""``python tools/pseudo_label.py ...`` = the console script ``severjax-pseudo-label ...`` (``severjax.cli.pseudo_label``; needs the
package installed: ``pip install -e .``)."""

from severjax.cli.pseudo_label import entry

if __name__ == "__main__":
    raise SystemExit(entry())
