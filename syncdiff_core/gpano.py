"""Photo sphere metadata (Google's GPano fields in an XMP packet) for 360° panoramas, and its JPEG segment.

Plain Python: what 360° viewers read to show an image as an equirectangular panorama.
"""
from __future__ import annotations

XMP_KEY = "XML:com.adobe.xmp"
JPEG_XMP_HEADER = b"http://ns.adobe.com/xap/1.0/\x00"


def gpano_layout(width: int, height: int) -> dict[str, int]:
    """The equirectangular layout of a ``width`` x ``height`` panorama that spans 360° horizontally.

    The full sphere is ``width`` x ``width/2``; a wider-than-2:1 image (a cylindrical panorama, one row of windows) is
    a band centred on the horizon, with the vertical field of view its square pixels give (360° · height / width).
    """
    full_height = width // 2
    if height > full_height:
        raise ValueError(
            f"a 360° equirectangular panorama is at most half as tall as it is wide; the image is {width}x{height} "
            f"px (at most {full_height} px tall for this width)")
    return {
        "FullPanoWidthPixels": width,
        "FullPanoHeightPixels": full_height,
        "CroppedAreaImageWidthPixels": width,
        "CroppedAreaImageHeightPixels": height,
        "CroppedAreaLeftPixels": 0,
        "CroppedAreaTopPixels": (full_height - height) // 2,
    }


def gpano_xmp(width: int, height: int, initial_heading: float = 0.0) -> str:
    """An XMP packet with Google's photo sphere (GPano) fields for an equirectangular 360° panorama."""
    fields = {"ProjectionType": "equirectangular", "UsePanoramaViewer": "True", **gpano_layout(width, height),
              "PoseHeadingDegrees": f"{initial_heading:.1f}", "InitialViewHeadingDegrees": f"{initial_heading:.0f}"}
    body = "\n".join(f"   <GPano:{k}>{v}</GPano:{k}>" for k, v in fields.items())
    return (
        '<?xpacket begin="\ufeff" id="W5M0MpCehiHzreSzNTczkc9d"?>\n'
        '<x:xmpmeta xmlns:x="adobe:ns:meta/">\n'
        ' <rdf:RDF xmlns:rdf="http://www.w3.org/1999/02/22-rdf-syntax-ns#">\n'
        '  <rdf:Description rdf:about="" xmlns:GPano="http://ns.google.com/photos/1.0/panorama/">\n'
        f"{body}\n"
        "  </rdf:Description>\n"
        " </rdf:RDF>\n"
        "</x:xmpmeta>\n"
        '<?xpacket end="w"?>'
    )


def jpeg_with_xmp(jpeg: bytes, xmp: str) -> bytes:
    """Insert an XMP APP1 segment into a JPEG file, after SOI and the JFIF APP0 segment (if any)."""
    if jpeg[:2] != b"\xff\xd8":
        raise ValueError("not a JPEG stream")
    payload = JPEG_XMP_HEADER + xmp.encode("utf-8")
    if len(payload) + 2 > 0xFFFF:
        raise ValueError("XMP packet too large for one JPEG segment")
    pos = 2
    if jpeg[2:4] == b"\xff\xe0":  # JFIF APP0 must stay first
        pos = 4 + int.from_bytes(jpeg[4:6], "big")
    segment = b"\xff\xe1" + (len(payload) + 2).to_bytes(2, "big") + payload
    return jpeg[:pos] + segment + jpeg[pos:]
