"""Train a learned editor (MEND, SERAC); then edit with it via edit.py method.checkpoint=PATH.

    python train.py method=mend dataset=zsre
    python train.py method=mend dataset=zsre train.resume=true hydra.run.dir=<the interrupted run>
"""
import hydra
from omegaconf import DictConfig

import kedit_pl.config  # noqa: F401  (registers the ${kedit_root:} resolver)
from kedit_pl.pipeline import cli, run_train


@hydra.main(config_path="conf", config_name="train", version_base="1.3")
def main(cfg: DictConfig) -> float | None:
    result = cli(run_train, cfg)
    return result.get("best_score")


if __name__ == "__main__":
    main()
