"""Provenance and safety: C2PA Content Credentials, an invisible watermark, content screening.

No Ray here; the C2PA SDK, OpenCV and ONNX Runtime are imported where they are used, so the
package imports cheaply. `signing` builds and signs manifests and reads them back, `devca` makes
a local development CA, `watermark` embeds and reads an image-id payload, `screening` checks
prompts and pixels, `verify` reports all of it for one file.
"""
