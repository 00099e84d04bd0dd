"""EXIF in JPEG and WebP: the A1111 infotext as the UserComment, as A1111 itself writes it.

EXIF 2.3 UserComment starts with an 8-byte character-code id. A1111 writes infotext through
piexif's `UserComment.dump(..., encoding="unicode")`: "UNICODE\\0" + UTF-16 big-endian, inside a
big-endian ("MM") TIFF block, which is also what Pillow's `Exif()` writes by default.
"""

from __future__ import annotations

from typing import Any

from PIL import ExifTags, Image

from app.metadata.infotext import format_infotext
from app.metadata.record import ImageMetadata

_USER_COMMENT_UNICODE = b"UNICODE\x00"
_USER_COMMENT_ASCII = b"ASCII\x00\x00\x00"


def exif_bytes(metadata: ImageMetadata | None) -> bytes:
    """The EXIF block for a JPEG or WebP: Software "imagefab", and the infotext with metadata."""
    exif = Image.Exif()
    exif[ExifTags.Base.Software] = "imagefab"
    if metadata is not None:
        user_comment = _USER_COMMENT_UNICODE + format_infotext(metadata).encode("utf-16-be")
        exif[ExifTags.IFD.Exif] = {ExifTags.Base.UserComment: user_comment}
    return exif.tobytes()


def read_exif(image: Image.Image) -> dict[str, Any]:
    """{"parameters": infotext} from a decoded image's EXIF UserComment; {} when it has none."""
    exif = image.getexif()
    comment = exif.get_ifd(ExifTags.IFD.Exif).get(ExifTags.Base.UserComment)
    if isinstance(comment, bytes) and (parameters := _decode_user_comment(comment, exif.endian)):
        return {"parameters": parameters}
    return {}


def _decode_user_comment(comment: bytes, endian: str | None) -> str:
    prefix, body = comment[:8], comment[8:]
    if prefix == _USER_COMMENT_UNICODE:
        # EXIF's UNICODE follows the TIFF block's byte order ("MM" from piexif/A1111 and from
        # us); a byte-order mark, which some writers add, overrides it.
        if body[:2] in (b"\xff\xfe", b"\xfe\xff"):
            return body.decode("utf-16", errors="replace")
        return body.decode("utf-16-le" if endian == "<" else "utf-16-be", errors="replace")
    if prefix == _USER_COMMENT_ASCII:
        return body.decode("ascii", errors="replace").rstrip("\x00")
    return comment.decode("utf-8", errors="replace").rstrip("\x00")
