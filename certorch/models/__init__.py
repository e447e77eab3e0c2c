"""certorch.models: the model zoo.

``build(name, dataset)`` returns an ``nn.Module`` that takes pixels in ``[0, 1]`` (its first
layer is :class:`certorch.nn.Normalize`). Families register themselves on import; to add a
family, write ``certorch/models/<family>.py`` using ``@register_model`` and add one import
line below.
"""
from certorch.models.registry import ModelInfo, build, count_params, list_models, model_info, register_model

# Family modules (import for the registration side effect). One line per family.
from certorch.models import tiny  # noqa: E402,F401
from certorch.models import wong  # noqa: E402,F401
from certorch.models import mixtrain  # noqa: E402,F401
from certorch.models import colt  # noqa: E402,F401
from certorch.models import crown_ibp  # noqa: E402,F401
from certorch.models import linf_dist  # noqa: E402,F401

__all__ = ["ModelInfo", "build", "count_params", "list_models", "model_info", "register_model"]
