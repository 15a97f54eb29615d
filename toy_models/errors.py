"""`UserError` lives in `prefixlab_common.errors` (the bottom package, which every package may
import); it is re-exported here so that `from toy_models.errors import UserError` keeps working."""

from prefixlab_common.errors import UserError

__all__ = ["UserError"]
