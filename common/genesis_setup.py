"""Starting Genesis once per process, on the device the user asked for, and choosing a renderer."""

import os

import torch

_STARTED_ON = None


def resolve_device(device: str) -> torch.device:
    """Map `auto | cpu | cuda` to a torch device; `cuda` without a GPU is an error, not a silent fallback."""
    if device not in ("auto", "cpu", "cuda"):
        raise ValueError(f"unknown --device {device!r}: choose auto, cpu or cuda")
    if device == "cuda" and not torch.cuda.is_available():
        raise ValueError("--device cuda was asked for, but torch sees no CUDA device")
    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    return torch.device(device)


def resolve_renderer(renderer: str, device: torch.device, image_width: int | None = None) -> str:
    """`auto` gives Genesis's BatchRenderer (Madrona) on CUDA and the OpenGL Rasterizer on the CPU; `torch` is our
    own ray caster (common/diff_render.py), run without gradient. With `image_width`, also checks that the chosen
    renderer can draw images that wide (check_camera_width)."""
    if renderer not in ("auto", "batch", "rasterizer", "torch"):
        raise ValueError(f"unknown --renderer {renderer!r}: choose auto, batch, rasterizer or torch")
    if renderer == "batch" and device.type != "cuda":
        raise ValueError("--renderer batch needs CUDA (Genesis's BatchRenderer runs on the GPU only)")
    if renderer == "auto":
        renderer = "batch" if device.type == "cuda" else "rasterizer"
    if image_width is not None:
        check_camera_width(image_width, renderer)
    return renderer


def check_camera_width(width: int, renderer: str):
    """Genesis's Rasterizer aborts the whole process (`malloc(): invalid size`) when a camera's width is not a
    multiple of 4 (measured: 66, 70, 74 px crash; 64, 68, 72 work; any height works): refuse such widths up front."""
    if renderer == "rasterizer" and width % 4:
        raise ValueError(f"an image width of {width} px is not a multiple of 4, which crashes Genesis's Rasterizer; "
                         f"choose {width - width % 4} or {width - width % 4 + 4}, or --renderer torch")


def disable_msaa():
    """Turn off the Rasterizer's 4x multisampling, which costs 20-40 % of a CPU (llvmpipe) render.

    Genesis has no option for it: its pyrender asks OpenGL for GL_MAX_SAMPLES when it creates its framebuffers, so we
    make that query answer 0 (plain, single-sample buffers). Must run before the first render.
    """
    import genesis.ext.pyrender.renderer as pyrender_renderer
    from OpenGL.GL import GL_MAX_SAMPLES

    original = pyrender_renderer.glGetIntegerv
    if getattr(original, "_msaa_disabled", False):
        return

    def gl_get_integerv(pname, *args):
        return 0 if pname == GL_MAX_SAMPLES else original(pname, *args)

    gl_get_integerv._msaa_disabled = True
    pyrender_renderer.glGetIntegerv = gl_get_integerv


def performance_mode() -> bool:
    """Genesis's `performance_mode` (static arrays compiled for the scene's size, which Genesis recommends with
    gradients), at a longer first scene build per size (docs/genesis.md; its speed-up on a CPU is not measured side
    by side yet, docs/results.md). On unless the environment sets DVA_PERFORMANCE_MODE=0, as the test suite does
    (it builds scenes of many sizes)."""
    value = os.environ.get("DVA_PERFORMANCE_MODE", "1")
    if value not in ("0", "1"):
        raise ValueError(f"DVA_PERFORMANCE_MODE must be 0 or 1, got {value!r}")
    return value == "1"


def init_genesis(device: torch.device, precision: str = "32"):
    """`gs.init` once per process (a second call raises in Genesis); later calls must ask for the same set-up."""
    global _STARTED_ON
    import genesis as gs

    wanted = (device.type, precision)
    if _STARTED_ON is not None:
        if _STARTED_ON != wanted:
            raise RuntimeError(f"Genesis already runs with {_STARTED_ON}; cannot switch to {wanted} in one process")
        return gs
    gs.init(backend=gs.cuda if device.type == "cuda" else gs.cpu, precision=precision, logging_level="warning",
            performance_mode=performance_mode())
    try:
        disable_msaa()
    except (ImportError, OSError, AttributeError):  # no OpenGL here: only the Rasterizer needs it, and it will say so
        pass
    _STARTED_ON = wanted
    return gs


class low_poly_visuals:
    """Context manager: MJCF capsules and spheres loaded inside it get visual meshes of 160 and 80 faces instead of
    trimesh's defaults (4096 and 1280), which make a CPU render several times slower (docs/genesis.md).
    Genesis builds collision meshes of spheres and capsules with explicit sizes, which this leaves alone (our models
    have no cylinders, whose collision mesh would be coarser too)."""

    def __enter__(self):
        import types

        import genesis.utils.mjcf as mjcf
        import trimesh

        def capsule(radius, height, count=(8, 10), **kw):
            return trimesh.creation.capsule(radius=radius, height=height, count=count, **kw)

        def icosphere(subdivisions=1, radius=1.0, **kw):
            return trimesh.creation.icosphere(subdivisions=subdivisions, radius=radius, **kw)

        def cylinder(radius, height, sections=10, **kw):
            return trimesh.creation.cylinder(radius=radius, height=height, sections=sections, **kw)

        creation = types.SimpleNamespace(**{**vars(trimesh.creation), "capsule": capsule, "icosphere": icosphere,
                                            "cylinder": cylinder})
        self._module, self._original = mjcf, mjcf.trimesh
        mjcf.trimesh = types.SimpleNamespace(**{**vars(trimesh), "creation": creation})
        return self

    def __exit__(self, *exc):
        self._module.trimesh = self._original
        return False
