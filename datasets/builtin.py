from fedcl.client.data.builtin import *  # noqa: F403  TEMPORARY
from fedcl.client.data.builtin import load_builtin  # noqa: F401
