"""Locate where a model keeps facts (`kedit-locate`, or `python locate.py` in a clone); the method is a config group
(conf/locate/).

    kedit-locate locate=knowledge_neurons                       # KN: suppress/amplify, layer histogram, erase
    kedit-locate locate=knowledge_neurons locate.n_records=20 model=gemma3_270m
    kedit-locate locate=causal_trace locate.n_records=20        # causal tracing (= kedit-trace)
    kedit-locate locate=tracin locate.checkpoints=<teaching run>/checkpoints   # training-data influence:
    kedit-locate locate=tracin_cosine|embedding|bm25 ...        # (docs/training_data.md)
    kedit-locate locate=bm25 locate.task=illustrate              # top WikiText paragraphs for known facts
    kedit-locate ... resume=true hydra.run.dir=DIR              # continue an interrupted run
"""
import hydra
from omegaconf import DictConfig

from kedit_pl.cli import CONFIG_PATH
from kedit_pl.locate.run import run_locate
from kedit_pl.pipeline import cli


@hydra.main(config_path=CONFIG_PATH, config_name="locate", version_base="1.3")
def main(cfg: DictConfig) -> None:
    """Hydra entry point of `kedit-locate` / `locate.py`: run a locating job."""
    cli(run_locate, cfg)


if __name__ == "__main__":
    main()
