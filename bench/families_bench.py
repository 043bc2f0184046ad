"""The real-size SDXL and Flux models of the GPU benchmarks, under the name ``bench.memory_bench`` imports them by:
they are built by ``devtools.models.build_real_size``; the families' speed benchmark is
``python -m bench.gpu_bench --family sdxl`` (or ``flux``)."""
from devtools.models import build_real_size


def build(name: str, opts):
    """(model, VAE, positive, negative) of ``name`` at its real size (``opts.tiny``: the tiny test model)."""
    return build_real_size(name, tiny=opts.tiny)
