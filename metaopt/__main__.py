"""``python -m metaopt [overrides]``: compose ``conf/config.yaml`` and run :func:`metaopt.train.train`."""

from __future__ import annotations

import logging
import sys

import hydra
from omegaconf import DictConfig

from metaopt.config import config_dir
from metaopt.errors import MetaoptError


@hydra.main(version_base="1.3", config_path=str(config_dir()), config_name="config")
def _hydra_main(cfg: DictConfig) -> float:
    from hydra.core.hydra_config import HydraConfig
    from hydra.types import RunMode

    from metaopt.train import train

    try:
        return train(cfg)
    except MetaoptError as exc:
        if HydraConfig.get().mode == RunMode.MULTIRUN:
            raise  # the launcher records this job as failed and the sweep goes on
        logging.getLogger("metaopt").error("%s", exc)
        print(f"metaopt: error: {exc}", file=sys.stderr)
        sys.exit(2)


def main() -> None:
    _hydra_main()


if __name__ == "__main__":
    main()
