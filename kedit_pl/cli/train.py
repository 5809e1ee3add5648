"""Train a learned editor (MEND, KE, SERAC) (`kedit-train`, or `python train.py` in a clone); then edit with it via
`kedit-edit method.checkpoint=PATH`.

    kedit-train method=mend dataset=zsre
    kedit-train method=mend dataset=zsre train.resume=true hydra.run.dir=<the interrupted run>
"""
import hydra
from omegaconf import DictConfig

from kedit_pl.cli import CONFIG_PATH
from kedit_pl.pipeline import cli, run_train


@hydra.main(config_path=CONFIG_PATH, config_name="train", version_base="1.3")
def main(cfg: DictConfig) -> float | None:
    """Hydra entry point of `kedit-train` / `train.py`: train a learned editor."""
    result = cli(run_train, cfg)
    return result.get("best_score")


if __name__ == "__main__":
    main()
