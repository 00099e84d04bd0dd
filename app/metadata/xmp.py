"""The XMP packet: the IPTC digital source type "trainedAlgorithmicMedia" (the marker platforms read
to label AI-generated images) and, with metadata, the prompt, the image id and the full
`ImageMetadata` JSON. Written into PNG (iTXt `XML:com.adobe.xmp`), JPEG and WebP alike, even
without metadata: the image is AI-generated either way.
"""

from __future__ import annotations

import contextlib
import json
import re
import xml.etree.ElementTree as ET
from collections.abc import Mapping
from typing import Any

from app.metadata.record import ImageMetadata

DIGITAL_SOURCE_TYPE = "http://cv.iptc.org/newscodes/digitalsourcetype/trainedAlgorithmicMedia"
_NS_IPTC_EXT = "http://iptc.org/std/Iptc4xmpExt/2008-02-29/"
_NS_RDF = "http://www.w3.org/1999/02/22-rdf-syntax-ns#"
# imagefab publishes no namespace document; the reserved .invalid domain (RFC 2606) says so.
_NS_IMAGEFAB = "https://imagefab.invalid/ns/xmp/1.0/"

# Characters XML 1.0 cannot carry at all; a prompt may contain them, the packet must not.
_XML_INVALID = re.compile("[^\t\n\r\x20-\ud7ff\ue000-\ufffd\U00010000-\U0010ffff]")


def _xml_text(text: str) -> str:
    text = _XML_INVALID.sub("\ufffd", text)
    # &#13; keeps a carriage return that an XML parser would otherwise turn into a newline.
    return text.replace("&", "&amp;").replace("<", "&lt;").replace(">", "&gt;").replace("\r", "&#13;")


def _xml_attr(text: str) -> str:
    return _xml_text(text).replace('"', "&quot;").replace("\n", "&#10;").replace("\t", "&#9;")


def xmp_packet(metadata: ImageMetadata | None) -> bytes:
    """XMP declaring AI provenance; with metadata also the prompt, image id and full JSON."""
    properties = ""
    if metadata is not None:
        properties += (
            f'\n   <dc:description><rdf:Alt><rdf:li xml:lang="x-default">{_xml_text(metadata.prompt)}'
            f"</rdf:li></rdf:Alt></dc:description>"
            f"\n   <dc:identifier>{_xml_text(metadata.image_id)}</dc:identifier>"
            f"\n   <imagefab:Metadata>{_xml_text(metadata.to_json())}</imagefab:Metadata>"
        )
        properties += _xmp_rights(metadata.extra)
    packet = f"""<?xpacket begin="\ufeff" id="W5M0MpCehiHzreSzNTczkc9d"?>
<x:xmpmeta xmlns:x="adobe:ns:meta/">
 <rdf:RDF xmlns:rdf="{_NS_RDF}">
  <rdf:Description rdf:about=""
    xmlns:dc="http://purl.org/dc/elements/1.1/"
    xmlns:xmp="http://ns.adobe.com/xap/1.0/"
    xmlns:xmpRights="http://ns.adobe.com/xap/1.0/rights/"
    xmlns:plus="http://ns.useplus.org/ldf/xmp/1.0/"
    xmlns:Iptc4xmpExt="{_NS_IPTC_EXT}"
    xmlns:imagefab="{_NS_IMAGEFAB}"
    Iptc4xmpExt:DigitalSourceType="{_xml_attr(DIGITAL_SOURCE_TYPE)}"
    xmp:CreatorTool="imagefab">{properties}
  </rdf:Description>
 </rdf:RDF>
</x:xmpmeta>
<?xpacket end="w"?>"""
    return packet.encode("utf-8")


def _xmp_rights(extra: Mapping[str, str]) -> str:
    """IPTC rights fields from `extra`'s `rights.licence`, `rights.owner`, `rights.notes`:
    Copyright Notice (dc:rights), Rights Usage Terms (xmpRights:UsageTerms), Copyright Owner."""
    licence, owner, notes = (extra.get(f"rights.{key}", "") for key in ("licence", "owner", "notes"))
    out = ""
    if owner:
        out += (
            f'\n   <dc:rights><rdf:Alt><rdf:li xml:lang="x-default">© {_xml_text(owner)}</rdf:li></rdf:Alt></dc:rights>'
            f'\n   <plus:CopyrightOwner><rdf:Seq><rdf:li rdf:parseType="Resource">'
            f"<plus:CopyrightOwnerName>{_xml_text(owner)}</plus:CopyrightOwnerName></rdf:li></rdf:Seq></plus:CopyrightOwner>"
        )
    terms = "; ".join(part for part in (licence, notes) if part)
    if terms:
        out += f'\n   <xmpRights:UsageTerms><rdf:Alt><rdf:li xml:lang="x-default">{_xml_text(terms)}</rdf:li></rdf:Alt></xmpRights:UsageTerms>'
    if licence or owner:
        out += "\n   <xmpRights:Marked>True</xmpRights:Marked>"
    return out


def parse_xmp(xmp: bytes | str) -> dict[str, Any]:
    """Digital source type and imagefab JSON from an XMP packet; {} when it does not parse."""
    try:
        root = ET.fromstring(xmp)
    except ET.ParseError:
        return {}
    found: dict[str, Any] = {}
    source_key = f"{{{_NS_IPTC_EXT}}}DigitalSourceType"
    for description in root.iter(f"{{{_NS_RDF}}}Description"):
        # XMP allows a simple property as an attribute or as a child element.
        source = description.get(source_key)
        if source is None and (element := description.find(source_key)) is not None:
            source = element.text
        if source:
            found["digital_source_type"] = source.strip()
        element = description.find(f"{{{_NS_IMAGEFAB}}}Metadata")
        if element is not None and element.text:
            with contextlib.suppress(json.JSONDecodeError):
                found["imagefab"] = json.loads(element.text)
    return found
