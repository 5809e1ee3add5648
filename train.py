"""Train a learned editor (MEND, SERAC); then edit with it via edit.py method.checkpoint=PATH.

    python train.py method=mend dataset=zsre
    python train.py method=mend dataset=zsre train.resume=true hydra.run.dir=<the interrupted run>

A thin wrapper: the entry point is kedit_pl/cli/train.py (also the console script kedit-train)."""
from kedit_pl.cli.train import main

if __name__ == "__main__":
    main()
