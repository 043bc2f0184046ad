"""SyncDiffusion for ComfyUI: coherent panoramas from synchronized joint diffusions (NeurIPS 2023)."""
from comfy_api.latest import ComfyExtension, io

from .nodes import NODES


class SyncDiffusionExtension(ComfyExtension):
    async def get_node_list(self) -> list[type[io.ComfyNode]]:
        return list(NODES)


async def comfy_entrypoint() -> SyncDiffusionExtension:
    from .syncdiff_core.comfy.assets import register_lpips_folder

    register_lpips_folder()  # models/lpips, where the LPIPS trunk files go
    return SyncDiffusionExtension()
