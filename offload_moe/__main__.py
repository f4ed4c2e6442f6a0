"""``python -m offload_moe``: the ``offload-moe`` command."""

from .cli import main

main()
