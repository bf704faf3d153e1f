"""Moved to limner.encoders (by role: clip, dino, faces); these re-exports keep the old import path
working until every importer uses the new one."""

from limner.encoders import CLIPEncoder as CLIPEncoder
from limner.encoders import DINOEncoder as DINOEncoder
from limner.encoders import InsightFaceEmbedder as InsightFaceEmbedder
from limner.encoders import WorldCLIP as WorldCLIP
from limner.encoders import WorldFaceEmbedder as WorldFaceEmbedder
from limner.images import ImageLike as ImageLike
