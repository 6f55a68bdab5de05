"""Reading images in and checking them: SimpleITK for NRRD/MetaImage/DICOM, nibabel for NIfTI.

MONAI's own ITK-based reader (:class:`monai.data.ITKReader`) needs the ``itk`` package;
:class:`SimpleITKReader` does the same job with SimpleITK and follows the same conventions
as :class:`monai.data.NibabelReader`, so a volume gives the same array and affine whether it
was saved as ``.nii.gz``, ``.nrrd``, ``.mha``/``.mhd`` or as a DICOM series:

- the array is indexed ``[x, y, z]`` (ITK index order, like a NIfTI array), channels last;
- ``affine``/``original_affine`` map voxel indices to RAS world coordinates (ITK works in LPS:
  the first two rows are negated, as in ``ITKReader(affine_lps_to_ras=True)``);
- ``spatial_shape``, ``original_channel_dim`` (NaN: no channel, -1: channels last),
  ``space`` (``"RAS"``) and ``spacing`` are set as MONAI's readers set them.

Every problem with a user's file surfaces as a :class:`~byol3d.errors.DataError` naming it:
unreadable files (here), unusable ones (:class:`ValidateImaged`: wrong channel count or
dimensionality, NaN/Inf), and :func:`find_data_error` digs such an error out of the
``RuntimeError`` MONAI wraps around anything raised inside a transform chain.

>>> from byol3d.data.readers import image_loader
>>> load = image_loader("image")
>>> load({"image": "ct.nrrd"})["image"].shape        # doctest: +SKIP
torch.Size([512, 512, 120])
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Hashable, Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import SimpleITK as sitk
import torch
from monai.config import KeysCollection, PathLike
from monai.data import ImageReader, MetaTensor, NibabelReader
from monai.data.utils import orientation_ras_lps
from monai.transforms import LoadImaged, MapTransform
from monai.utils import MetaKeys, SpaceKeys, ensure_tuple

from byol3d.data.dicom import series_files
from byol3d.data.sanity import FLAT_FRAME_STD, FLAT_FRAMES, SOURCE_DTYPE, frame_std, note_file
from byol3d.errors import DataError

logger = logging.getLogger("byol3d")


#: Single-file formats read by :class:`SimpleITKReader` (besides DICOM series folders).
SITK_SUFFIXES = (".nrrd", ".nhdr", ".mha", ".mhd")


def _sitk_message(err: Exception) -> str:
    """The informative last line of a (multi-line) SimpleITK exception."""
    lines = [line.strip() for line in str(err).splitlines() if line.strip()]
    return lines[-1] if lines else type(err).__name__


class SimpleITKReader(ImageReader):
    """Read ``.nrrd``/``.nhdr``/``.mha``/``.mhd`` files and DICOM series folders with SimpleITK.

    A drop-in for :class:`monai.data.ITKReader` (same array layout and metadata keys) that
    needs only SimpleITK. Register it on a :class:`monai.transforms.LoadImaged`, or use
    :func:`image_loader`, which does so.

    A directory is read as a DICOM series (``SimpleITK.ImageSeriesReader``, files sorted by
    GDCM along the slice normal), chosen and checked by :func:`byol3d.data.dicom.series_files`:
    ``series`` (a SeriesInstanceUID or part of a SeriesDescription) or the one with the most
    files (logged once when there are several); several slices at one position, missing
    slices and non-uniform spacing are errors naming the series. Rescale slope and
    intercept are applied (as float32 when they differ between slices).

    Args:
        channel_dim: the channel axis of the loaded array, stored as ``original_channel_dim``
            for ``EnsureChannelFirstd``. None (default): no channel for scalar images, the last
            axis for multi-component (vector) pixels or 4D images, as in MONAI's readers.
        series_meta: also store the DICOM tags of the first slice of a series in the
            metadata (keys such as ``"0008|0060"``). Off by default: it slows reading.
        affine_lps_to_ras: convert ITK's LPS affine to RAS (default True, consistent with
            ``NibabelReader``); False keeps LPS and sets ``space`` to ``"LPS"``.
        series: the DICOM series to read in a folder (``data.dicom_series``); None: the largest.

    Raises:
        DataError: from ``read`` when a file cannot be read (message names the file).
    """

    def __init__(
        self,
        channel_dim: str | int | None = None,
        series_meta: bool = False,
        affine_lps_to_ras: bool = True,
        series: str | None = None,
    ) -> None:
        super().__init__()
        self.channel_dim = float("nan") if channel_dim == "no_channel" else channel_dim
        self.series_meta = series_meta
        self.affine_lps_to_ras = affine_lps_to_ras
        self.series = series

    def verify_suffix(self, filename: Sequence[PathLike] | PathLike) -> bool:
        """True when every name is a DICOM folder or ends with one of :data:`SITK_SUFFIXES`."""
        for name in ensure_tuple(filename):
            name = str(name)
            if not (Path(name).is_dir() or name.lower().endswith(SITK_SUFFIXES)):
                return False
        return True

    def read(self, data: Sequence[PathLike] | PathLike, **kwargs: Any) -> Any:
        """Read one image (or a list, later stacked as channels) into ``SimpleITK.Image`` objects.

        Args:
            data: a file name, a DICOM series folder, or a sequence of them.
            kwargs: unused; accepted for the ``ImageReader`` interface.
        """
        images = []
        names = ensure_tuple(data)
        for name in names:
            name = str(name)
            try:
                if Path(name).is_dir():
                    images.append(self._read_series(name))
                else:
                    images.append(sitk.ReadImage(name))
            except RuntimeError as err:  # SimpleITK reports every failure as RuntimeError
                raise DataError(f"cannot read image {name}: {_sitk_message(err)}") from err
        return images if len(names) > 1 else images[0]

    def _read_series(self, folder: str) -> sitk.Image:
        reader = sitk.ImageSeriesReader()
        files, as_float = series_files(folder, self.series)
        reader.SetFileNames(files)
        if as_float:  # per-slice rescale: one integer type would round some slices
            reader.SetOutputPixelType(sitk.sitkFloat32)
        if self.series_meta:
            reader.MetaDataDictionaryArrayUpdateOn()
            reader.LoadPrivateTagsOn()
        image = reader.Execute()
        if self.series_meta:
            for key in reader.GetMetaDataKeys(0):
                image.SetMetaData(key, reader.GetMetaData(0, key))
        return image

    def get_data(self, img: Any) -> tuple[np.ndarray, dict]:
        """The array (``[x, y, z(, c)]``) and the metadata dict of one or more images.

        Several images are stacked as channels on a new first axis (``original_channel_dim``
        0), with the first image's metadata, as MONAI's readers do.
        """
        arrays, meta = [], {}
        # a SimpleITK.Image is iterable (over its pixels): never pass it to ensure_tuple
        for image in [img] if isinstance(img, sitk.Image) else list(img):
            array = self._get_array_data(image)
            header = self._get_meta_dict(image)
            header[MetaKeys.ORIGINAL_AFFINE] = self._get_affine(image)
            header[MetaKeys.AFFINE] = header[MetaKeys.ORIGINAL_AFFINE].copy()
            header[MetaKeys.SPACE] = SpaceKeys.RAS if self.affine_lps_to_ras else SpaceKeys.LPS
            header[MetaKeys.SPATIAL_SHAPE] = self._get_spatial_shape(image)
            if self.channel_dim is None:
                same = array.ndim == len(header[MetaKeys.SPATIAL_SHAPE])
                header[MetaKeys.ORIGINAL_CHANNEL_DIM] = float("nan") if same else -1
            else:
                header[MetaKeys.ORIGINAL_CHANNEL_DIM] = self.channel_dim
            if not meta:
                meta = header
            elif not np.allclose(
                meta[MetaKeys.AFFINE], header[MetaKeys.AFFINE]
            ) or not np.array_equal(meta[MetaKeys.SPATIAL_SHAPE], header[MetaKeys.SPATIAL_SHAPE]):
                raise DataError("images stacked as channels must share their shape and affine")
            arrays.append(array)
        meta[SOURCE_DTYPE] = np.result_type(*arrays).name
        if len(arrays) == 1:
            return arrays[0], meta
        if np.isnan(float(meta[MetaKeys.ORIGINAL_CHANNEL_DIM])):
            meta[MetaKeys.ORIGINAL_CHANNEL_DIM] = 0
            return np.stack(arrays, axis=0), meta
        return np.concatenate(arrays, axis=int(meta[MetaKeys.ORIGINAL_CHANNEL_DIM])), meta

    @staticmethod
    def _get_meta_dict(image: sitk.Image) -> dict:
        meta = {
            key: image.GetMetaData(key)
            for key in image.GetMetaDataKeys()
            if not key.startswith("ITK_")
        }
        meta["spacing"] = np.asarray(image.GetSpacing())
        return meta

    def _get_affine(self, image: sitk.Image) -> np.ndarray:
        """Voxel index -> world affine (LPS in ITK), converted to RAS unless disabled."""
        ndim = image.GetDimension()
        direction = np.asarray(image.GetDirection(), dtype=np.float64).reshape(ndim, ndim)
        spacing = np.asarray(image.GetSpacing(), dtype=np.float64)
        origin = np.asarray(image.GetOrigin(), dtype=np.float64)
        sr = min(max(ndim, 1), 3)
        affine = np.eye(sr + 1)
        affine[:sr, :sr] = direction[:sr, :sr] @ np.diag(spacing[:sr])
        affine[:sr, -1] = origin[:sr]
        return orientation_ras_lps(affine) if self.affine_lps_to_ras else affine

    def _get_spatial_shape(self, image: sitk.Image) -> np.ndarray:
        size = list(image.GetSize())
        if isinstance(self.channel_dim, int):
            size.pop(self.channel_dim)
        return np.asarray(size[: min(max(image.GetDimension(), 1), 3)])

    @staticmethod
    def _get_array_data(image: sitk.Image) -> np.ndarray:
        # SimpleITK arrays are [z, y, x(, c)]; MONAI (like nibabel) wants [x, y, z(, c)]
        array = sitk.GetArrayFromImage(image)
        if image.GetNumberOfComponentsPerPixel() == 1:
            return array.T
        return np.moveaxis(array.T, 0, -1)


class _NibabelReader(NibabelReader):
    """``NibabelReader`` that names the file in a ``DataError`` when it cannot be read."""

    def read(self, data: Sequence[PathLike] | PathLike, **kwargs: Any) -> Any:
        try:
            return super().read(data, **kwargs)
        except Exception as err:  # nibabel raises many types: ImageFileError, EOFError, ...
            raise DataError(f"cannot read image {_first(data)}: {_one_line(err)}") from err

    def get_data(self, img: Any) -> tuple[np.ndarray, dict]:
        try:  # the voxels are read lazily here: a truncated .nii.gz fails now, not in read()
            array, meta = super().get_data(img)
        except Exception as err:
            # name the file from the image: self.filenames may be another thread's (CacheDataset)
            first = img[0] if isinstance(img, (list, tuple)) else img
            raise DataError(f"cannot read image {first.get_filename()}: {_one_line(err)}") from err
        meta[SOURCE_DTYPE] = array.dtype.name  # after the header's scl_slope/scl_inter
        return array, meta


def _first(names: Sequence[PathLike] | PathLike) -> str:
    return str(ensure_tuple(names)[0])


def _one_line(err: Exception) -> str:
    text = str(err).strip().splitlines()
    return f"{type(err).__name__}: {text[0]}" if text else type(err).__name__


def image_loader(
    keys: KeysCollection, dicom_series: str | None = None, **kwargs: Any
) -> LoadImaged:
    """``LoadImaged`` that reads NIfTI with nibabel and everything else with SimpleITK.

    ``LoadImaged`` (with ``reader=None``) tries its registered readers from the last
    registered to the first and takes the first whose ``verify_suffix`` accepts the file, so
    the readers registered here take precedence over MONAI's defaults: a ``NibabelReader``
    for ``.nii``/``.nii.gz`` and :class:`SimpleITKReader` for ``.nrrd``/``.nhdr``/``.mha``/
    ``.mhd`` and DICOM series folders. Both raise :class:`~byol3d.errors.DataError` naming
    the file when it cannot be read.

    Args:
        keys: the data-dict keys holding file paths, e.g. ``"image"``.
        dicom_series: the series to read from DICOM folders (see :class:`SimpleITKReader`).
        kwargs: further ``LoadImaged`` arguments (``image_only=True`` unless given).

    Returns:
        The configured ``LoadImaged``; the loaded images are ``MetaTensor`` objects whose
        ``meta["filename_or_obj"]`` is the path.
    """
    kwargs.setdefault("image_only", True)
    loader = LoadImaged(keys=keys, reader=None, **kwargs)
    loader.register(SimpleITKReader(series=dicom_series))
    loader.register(_NibabelReader())
    return loader


def find_data_error(exc: BaseException) -> DataError | None:
    """The :class:`DataError` behind ``exc``, or None.

    MONAI wraps every exception raised inside a transform chain or a dataset in
    ``RuntimeError("applying transform ...")``; this follows ``__cause__``/``__context__``
    down to the user-data error so it can be reported in one line. The one place that walks
    such chains (:func:`data_errors_unwrapped` and ``check_files`` use it).
    """
    seen: set[int] = set()
    while exc is not None and id(exc) not in seen:
        if isinstance(exc, DataError):
            return exc
        seen.add(id(exc))
        exc = exc.__cause__ or exc.__context__
    return None


@contextlib.contextmanager
def data_errors_unwrapped() -> Iterator[None]:
    """Re-raise a :class:`DataError` buried in MONAI's wrapping exceptions as itself.

    >>> with data_errors_unwrapped():                     # doctest: +SKIP
    ...     preprocess({"image": "broken.nii.gz"})        # DataError, not RuntimeError

    Any other exception passes unchanged.
    """
    try:
        yield
    except Exception as exc:
        err = find_data_error(exc)
        if err is None:
            raise
        raise err from None


def as_tensor(img: Any) -> torch.Tensor:
    """A plain ``torch.Tensor`` of an image: a ``MetaTensor``'s data without its metadata,
    anything else through ``torch.as_tensor`` (no copy where none is needed)."""
    return img.as_tensor() if isinstance(img, MetaTensor) else torch.as_tensor(img)


def filename_of(img: Any, key: Hashable) -> str:
    """The source file of a loaded image (``meta["filename_or_obj"]``), else ``<key>``."""
    meta = getattr(img, "meta", None) or {}
    return str(meta.get("filename_or_obj", f"<{key}>"))


class ValidateImaged(MapTransform):
    """Reject images a run cannot use, with a :class:`DataError` naming the file.

    Expects channel-first images (after ``EnsureChannelFirstd``). Raises when the channel
    count is not ``in_channels`` (e.g. a 4D series with 5 time points), when the number of
    spatial dimensions is not ``spatial_dims`` (e.g. a 2D image in a 3D run), or when the
    image holds NaN or Inf. Warns (once per file) that a constant image is used anyway; 2D
    frames that are constant or near-black are only counted, in one line per run.

    Args:
        keys: keys of the images to check.
        in_channels: the expected number of channels.
        spatial_dims: the expected number of spatial dimensions (2 or 3).
        allow_missing_keys: do not raise if a key is missing.
    """

    def __init__(
        self,
        keys: KeysCollection,
        in_channels: int = 1,
        spatial_dims: int = 3,
        allow_missing_keys: bool = False,
    ) -> None:
        super().__init__(keys, allow_missing_keys)
        self.in_channels = in_channels
        self.spatial_dims = spatial_dims

    def __call__(self, data: Mapping[Hashable, Any]) -> dict[Hashable, Any]:
        d = dict(data)
        for key in self.key_iterator(d):
            img, name = d[key], filename_of(d[key], key)
            shape = tuple(img.shape)
            if len(shape) - 1 != self.spatial_dims:
                raise DataError(
                    f"{name}: expected a {self.spatial_dims}D image, got {len(shape) - 1} spatial "
                    f"dimensions (channel-first shape {shape})"
                )
            if shape[0] != self.in_channels:
                raise DataError(
                    f"{name}: expected {self.in_channels} channel(s), got {shape[0]} (channel-first shape "
                    f"{shape}; a 4D series such as time points or phases is not a single volume)"
                )
            values = as_tensor(img)
            if values.is_floating_point() and not bool(torch.isfinite(values).all()):
                raise DataError(f"{name}: the image contains NaN or Inf values")
            if self.spatial_dims == 2 and values.numel() and frame_std(values) < FLAT_FRAME_STD:
                note_file(FLAT_FRAMES, name, f"{name} is a constant or near-black frame: it is used anyway", named=0)  # fmt: skip
            elif values.numel() and bool(values.min() == values.max()):
                note_file(
                    "constant volumes",
                    name,
                    f"{name} is constant (every voxel {float(values.min()):g}): it is used "
                    "anyway, but its views carry no signal",
                )
        return d
