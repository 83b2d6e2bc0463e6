"""Importers from public and in-house layouts into the sonogen dataset format."""

from sonogen.data.importers.busi import import_busi
from sonogen.data.importers.dicom import import_dicom
from sonogen.data.importers.folder import import_folder
from sonogen.data.importers.pocus import import_pocus

__all__ = ["import_busi", "import_dicom", "import_folder", "import_pocus"]
