"""Visualizer backends of moe_plugin."""
import importlib.util
import warnings

from mmengine.visualization import TensorboardVisBackend
from mmpretrain.registry import VISBACKENDS


@VISBACKENDS.register_module()
class OptionalTensorboardVisBackend(TensorboardVisBackend):
    """MMEngine's ``TensorboardVisBackend`` where ``tensorboard`` is
    installed (``pip install moe_plugin[tensorboard]``); where it is not, a
    warning once and nothing more, so that one config logs to TensorBoard on
    machines that have it and still runs on those that do not
    (``LocalVisBackend`` writes the JSON in both cases).

    Args:
        save_dir (str): The root directory to save the files produced by the
            backend.
    """

    def __init__(self, save_dir: str):
        super().__init__(save_dir)
        self.available = importlib.util.find_spec('tensorboard') is not None
        if not self.available:
            warnings.warn(
                'tensorboard is not installed, so '
                'OptionalTensorboardVisBackend logs nothing; install the '
                'extra: pip install '
                "'moe_plugin[tensorboard]' (the JSON scalars are still "
                'written by LocalVisBackend)')

    def add_config(self, config, **kwargs) -> None:
        if self.available:
            super().add_config(config, **kwargs)

    def add_image(self, name, image, step=0, **kwargs) -> None:
        if self.available:
            super().add_image(name, image, step, **kwargs)

    def add_scalar(self, name, value, step=0, **kwargs) -> None:
        if self.available:
            super().add_scalar(name, value, step, **kwargs)

    def add_scalars(self, scalar_dict, step=0, file_path=None,
                    **kwargs) -> None:
        if self.available:
            super().add_scalars(scalar_dict, step, file_path, **kwargs)

    def close(self) -> None:
        if self.available:
            super().close()
