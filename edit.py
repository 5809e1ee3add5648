"""Apply and evaluate knowledge edits with any method.

    python edit.py                                   # FT-L on smollm2_135m, the first 10 CounterFact records
    python edit.py dataset.limit=100                 # the 100-record table of the README
    python edit.py method=rome dataset.limit=200 edit.mode=single
    python edit.py -m method=ft,ft_l                 # Hydra multirun; compare with python -m kedit_pl.compare
"""
import hydra
from omegaconf import DictConfig

import kedit_pl.config  # noqa: F401  (registers the ${kedit_root:} resolver)
from kedit_pl.pipeline import cli, metric_value, run_edit


@hydra.main(config_path="conf", config_name="edit", version_base="1.3")
def main(cfg: DictConfig) -> float:
    summary = cli(run_edit, cfg)
    return metric_value(summary, cfg.optimized_metric)


if __name__ == "__main__":
    main()
