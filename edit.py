"""Apply and evaluate knowledge edits with any method.

    python edit.py                                   # FT-L on smollm2_135m, the first 10 CounterFact records
    python edit.py dataset.limit=100                 # the 100-record table of the README
    python edit.py method=rome dataset.limit=200 edit.mode=single
    python edit.py -m method=ft,ft_l                 # Hydra multirun; compare with python -m kedit_pl.compare

A thin wrapper: the entry point is kedit_pl/cli/edit.py (also the console script kedit-edit)."""
from kedit_pl.cli.edit import main

if __name__ == "__main__":
    main()
