"""nnU-Net plans as config defaults, for ``model.encoder: nnunet``.

:func:`byol3d.config.load_config` reads the plans file of ``model.nnunet_plans`` and takes
the patch size, spacing and intensity rule from it for every key the config does not set.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from byol3d.errors import ConfigError
from byol3d.models.nnunet import NnUNetPlan, read_plans


def read_config_plans(flat: Mapping[str, Any]) -> NnUNetPlan:
    """The plans of ``model.nnunet_plans`` for ``model.nnunet_configuration`` (flat keys).

    Raises:
        ConfigError: no plans file set, or one that does not read.
    """
    plans = flat["model.nnunet_plans"]
    if not plans:
        raise ConfigError(
            "model.encoder nnunet needs model.nnunet_plans: the plans JSON file of your nnU-Net "
            "dataset (e.g. nnUNet_preprocessed/DatasetXXX/nnUNetResEncUNetLPlans.json)"
        )
    try:
        return read_plans(plans, flat["model.nnunet_configuration"])
    except ValueError as err:
        raise ConfigError(f"model.nnunet_plans: {err}") from None


def apply_plans_defaults(flat: dict[str, Any], explicit: set[str]) -> None:
    """nnU-Net's patch size, spacing and intensity rule for the keys the user did not set.

    CTNormalization gives ``hu_window`` = the plans' foreground 0.5 and 99.5 percentiles (mapped
    to [0, 1], where nnU-Net z-scores that range: an affine difference); ZScoreNormalization
    gives ``intensity: zscore``, nnU-Net's own rule.

    Args:
        flat: the flat config (``{"transforms.roi_size": ...}``), updated in place.
        explicit: the keys the config file or the command line set; these stay as they are.

    Raises:
        ConfigError: no plans file set, or one that does not read.
    """
    plan = read_config_plans(flat)
    if "transforms.roi_size" not in explicit:
        flat["transforms.roi_size"] = list(plan.patch_size)
    if "transforms.pixdim" not in explicit and plan.spacing is not None:
        flat["transforms.pixdim"] = list(plan.spacing)
    window = plan.ct_window()
    if "transforms.hu_window" not in explicit and window is not None:
        flat["transforms.hu_window"] = list(window)
    scheme = plan.normalization[:1]
    if "transforms.intensity" not in explicit and scheme == ("ZScoreNormalization",):
        flat["transforms.intensity"] = "zscore"  # per volume over the foreground, as nnU-Net
