"""Apply and evaluate knowledge edits with any method (`kedit-edit`, or `python edit.py` in a clone).

    kedit-edit                                       # FT-L on smollm2_135m, the first 10 CounterFact records
    kedit-edit dataset.limit=100                     # the 100-record table of the README
    kedit-edit method=rome dataset.limit=200 edit.mode=single
    kedit-edit -m method=ft,ft_l                     # Hydra multirun; compare with kedit-compare
    kedit-edit hydra.searchpath=[file://my_conf] method=my_method   # a method of your own (docs/adding_a_method.md)
"""
import hydra
from omegaconf import DictConfig

from kedit_pl.cli import CONFIG_PATH
from kedit_pl.pipeline import cli, metric_value, run_edit


@hydra.main(config_path=CONFIG_PATH, config_name="edit", version_base="1.3")
def main(cfg: DictConfig) -> float:
    """Hydra entry point of `kedit-edit` / `edit.py`: run the edit job; return the optimized metric (sweeps)."""
    summary = cli(run_edit, cfg)
    return metric_value(summary, cfg.optimized_metric)


if __name__ == "__main__":
    main()
