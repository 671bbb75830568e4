"""Held-out kernel error versus training cost for ScaLLA training configurations.

A thin wrapper over :func:`fastlla.apps.fidelity.main` (also ``python -m fastlla fidelity``)::

    python bench/fidelity/curves.py --configs default,lastlayer --iterations 2000 --plot
    python bench/fidelity/curves.py --list
"""

from fastlla.apps.fidelity import main

if __name__ == "__main__":
    main()
