"""Locate where a model keeps facts; the method is a config group (conf/locate/).

    python locate.py locate=knowledge_neurons                       # KN: suppress/amplify, layer histogram, erase
    python locate.py locate=knowledge_neurons locate.n_records=20 model=gemma3_270m
    python locate.py locate=causal_trace locate.n_records=20        # causal tracing (= python trace.py)
    python locate.py locate=tracin locate.checkpoints=<teaching run>/checkpoints   # training-data influence:
    python locate.py locate=tracin_cosine|embedding|bm25 ...        # (docs/training_data.md)
    python locate.py locate=bm25 locate.task=illustrate              # top WikiText paragraphs for known facts
    python locate.py ... resume=true hydra.run.dir=DIR              # continue an interrupted run

A thin wrapper: the entry point is kedit_pl/cli/locate.py (also the console script kedit-locate)."""
from kedit_pl.cli.locate import main

if __name__ == "__main__":
    main()
