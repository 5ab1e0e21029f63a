"""Every file pydicom and nibabel ship as test data, through `validate-data` as a user's dataset would take it.

Each file is one record's image (and, when it holds several frames, another record's video). A file either renders
equal to an independent reference made with the library's own functions (tests/medical_reference.py) within one
grey level per channel, or is refused on one line that names it, with the expected kind. The tables below list
every file; a file the installed libraries ship that is not in them (or an entry that names no file) fails the
test, so a new library version is classified by a person, not waved through.

RENDER: rendered, checked against the reference. FRAMES: several frames (a multi-frame DICOM or a volume): as an
image its middle frame with a note in the report, as a video the sampled frames, both checked.
"""

from __future__ import annotations

import fnmatch
import json
from pathlib import Path

import numpy as np
import pytest

from nvila_ft.data.llava import LlavaJson
from nvila_ft.data.media import load_image, load_video
from nvila_ft.data.media_base import sample_frame_indices
from nvila_ft.data.validation import validate_source
from tests.medical_reference import dicom_frames, nifti_slices

pydicom = pytest.importorskip("pydicom")
nibabel = pytest.importorskip("nibabel")
RENDER, FRAMES = "render", "frames"
PYDICOM_ROOT = Path(pydicom.__file__).parent / "data" / "test_files"
NIBABEL_ROOT = Path(nibabel.__file__).parent
NIBABEL_FOLDERS = ("tests/data", "nicom/tests/data", "gifti/tests/data", "externals/tests/data")

# corrupt_media: not an image, or an image that cannot be decoded; unsupported_media: intact, but nothing nvila-ft
# shows (no pixel data: reports, plans, DICOMDIRs, waveforms; a 4-D or CIFTI volume; a volume format other than
# NIfTI; a compressed file other than .nii.gz)
PYDICOM_FILES = {
    "693_J2KI.dcm": RENDER,
    "CT_small.dcm": RENDER,
    "ExplVR_BigEnd.dcm": RENDER,
    "ExplVR_BigEndNoMeta.dcm": "corrupt_media",
    "ExplVR_LitEndNoMeta.dcm": "corrupt_media",
    "GDCMJ2K_TextGBR.dcm": RENDER,
    "J2K_pixelrep_mismatch.dcm": RENDER,
    "JPEG-lossy.dcm": "corrupt_media",
    "JPEG2000-embedded-sequence-delimiter.dcm": "corrupt_media",
    "JPEG2000.dcm": RENDER,
    "JPEGLSNearLossless_08.dcm": RENDER,
    "JPEGLSNearLossless_16.dcm": RENDER,
    "JPGExtended.dcm": RENDER,
    "MR_small.dcm": RENDER,
    "MR_small_RLE.dcm": RENDER,
    "MR_small_bigendian.dcm": RENDER,
    "MR_small_expb.dcm": RENDER,
    "MR_small_implicit.dcm": RENDER,
    "MR_small_jp2klossless.dcm": RENDER,
    "MR_small_jpeg_ls_lossless.dcm": RENDER,
    "MR_small_padded.dcm": RENDER,
    "MR_truncated.dcm": "corrupt_media",
    "README.txt": "corrupt_media",
    "SC_jpeg_no_color_transform.dcm": RENDER,
    "SC_jpeg_no_color_transform_2.dcm": RENDER,
    "SC_rgb_dcmtk_+eb+cr.dcm": RENDER,
    "SC_rgb_dcmtk_+eb+cy+n1.dcm": RENDER,
    "SC_rgb_dcmtk_+eb+cy+n2.dcm": RENDER,
    "SC_rgb_dcmtk_+eb+cy+np.dcm": RENDER,
    "SC_rgb_dcmtk_+eb+cy+s2.dcm": RENDER,
    "SC_rgb_dcmtk_+eb+cy+s4.dcm": RENDER,
    "SC_rgb_gdcm_KY.dcm": RENDER,
    "SC_rgb_jls_lossy_line.dcm": RENDER,
    "SC_rgb_jls_lossy_sample.dcm": RENDER,
    "SC_rgb_jpeg.dcm": RENDER,
    "SC_rgb_jpeg_app14_dcmd.dcm": RENDER,
    "SC_rgb_jpeg_dcmd.dcm": RENDER,
    "SC_rgb_jpeg_dcmtk.dcm": RENDER,
    "SC_rgb_jpeg_gdcm.dcm": RENDER,
    "SC_rgb_jpeg_lossy_gdcm.dcm": RENDER,
    "SC_rgb_rle.dcm": RENDER,
    "SC_rgb_rle_16bit.dcm": RENDER,
    "SC_rgb_rle_16bit_2frame.dcm": FRAMES,
    "SC_rgb_rle_2frame.dcm": FRAMES,
    "SC_rgb_rle_32bit.dcm": RENDER,
    "SC_rgb_rle_32bit_2frame.dcm": FRAMES,
    "SC_rgb_small_odd.dcm": RENDER,
    "SC_rgb_small_odd_big_endian.dcm": RENDER,
    "SC_rgb_small_odd_jpeg.dcm": RENDER,
    "SC_ybr_full_422_uncompressed.dcm": RENDER,
    "UN_sequence.dcm": "corrupt_media",
    "badVR.dcm": "corrupt_media",
    "crayons.icc": "corrupt_media",
    "dicomdirtests/77654033/CR1/6154": RENDER,
    "dicomdirtests/77654033/CR2/6247": RENDER,
    "dicomdirtests/77654033/CR3/6278": RENDER,
    "dicomdirtests/77654033/CT2/17106": RENDER,
    "dicomdirtests/77654033/CT2/17136": RENDER,
    "dicomdirtests/77654033/CT2/17166": RENDER,
    "dicomdirtests/77654033/CT2/17196": RENDER,
    "dicomdirtests/98892001/CT2N/6293": RENDER,
    "dicomdirtests/98892001/CT2N/6924": RENDER,
    "dicomdirtests/98892001/CT5N/2062": RENDER,
    "dicomdirtests/98892001/CT5N/2392": RENDER,
    "dicomdirtests/98892001/CT5N/2693": RENDER,
    "dicomdirtests/98892001/CT5N/3023": RENDER,
    "dicomdirtests/98892001/CT5N/3353": RENDER,
    "dicomdirtests/98892003/MR1/15820": RENDER,
    "dicomdirtests/98892003/MR1/4919": RENDER,
    "dicomdirtests/98892003/MR1/5641": RENDER,
    "dicomdirtests/98892003/MR2/15970": RENDER,
    "dicomdirtests/98892003/MR2/4950": RENDER,
    "dicomdirtests/98892003/MR2/4981": RENDER,
    "dicomdirtests/98892003/MR2/5011": RENDER,
    "dicomdirtests/98892003/MR2/6273": RENDER,
    "dicomdirtests/98892003/MR2/6605": RENDER,
    "dicomdirtests/98892003/MR2/6935": RENDER,
    "dicomdirtests/98892003/MR700/4467": RENDER,
    "dicomdirtests/98892003/MR700/4528": RENDER,
    "dicomdirtests/98892003/MR700/4558": RENDER,
    "dicomdirtests/98892003/MR700/4588": RENDER,
    "dicomdirtests/98892003/MR700/4618": RENDER,
    "dicomdirtests/98892003/MR700/4648": RENDER,
    "dicomdirtests/98892003/MR700/4678": RENDER,
    "dicomdirtests/DICOMDIR": "unsupported_media",
    "dicomdirtests/DICOMDIR-bigEnd": "unsupported_media",
    "dicomdirtests/DICOMDIR-empty.dcm": "unsupported_media",
    "dicomdirtests/DICOMDIR-implicit": "unsupported_media",
    "dicomdirtests/DICOMDIR-nooffset": "unsupported_media",
    "dicomdirtests/DICOMDIR-nopatient": "unsupported_media",
    "dicomdirtests/DICOMDIR-reordered": "unsupported_media",
    "dicomdirtests/README.txt": "corrupt_media",
    "dicomdirtests/TINY_ALPHA/DICOMDIR": "unsupported_media",
    "dicomdirtests/TINY_ALPHA/README": "corrupt_media",
    "empty_charset_LEI.dcm": "unsupported_media",
    "examples_jpeg2k.dcm": RENDER,
    "examples_overlay.dcm": RENDER,
    "examples_palette.dcm": RENDER,
    "examples_rgb_color.dcm": RENDER,
    "examples_ybr_color.dcm": FRAMES,
    "image_dfl.dcm": RENDER,
    "liver_1frame.dcm": RENDER,
    "liver_expb_1frame.dcm": RENDER,
    "meta_missing_tsyntax.dcm": "corrupt_media",
    "nested_priv_SQ.dcm": "corrupt_media",
    "no_meta.dcm": "corrupt_media",
    "no_meta_group_length.dcm": "corrupt_media",
    "priv_SQ.dcm": "corrupt_media",
    "reportsi.dcm": "unsupported_media",
    "reportsi_with_empty_number_tags.dcm": "unsupported_media",
    "rtdose.dcm": FRAMES,
    "rtdose_1frame.dcm": RENDER,
    "rtdose_expb.dcm": FRAMES,
    "rtdose_expb_1frame.dcm": RENDER,
    "rtdose_rle.dcm": FRAMES,
    "rtdose_rle_1frame.dcm": RENDER,
    "rtplan.dcm": "unsupported_media",
    "rtplan.dump": "corrupt_media",
    "rtplan_truncated.dcm": "unsupported_media",
    "rtstruct.dcm": "corrupt_media",
    "rtstruct.dump": "corrupt_media",
    "test-SR.dcm": "unsupported_media",
    "test1.json": "corrupt_media",
    "test_PN.json": "corrupt_media",
    "waveform_ecg.dcm": "unsupported_media",
    "zipMR.gz": "unsupported_media",
    # DICOMDIR test stubs: CT Image Storage files without pixel data
    "dicomdirtests/TINY_ALPHA/PT000000/ST000000/SE000000/IM*": "corrupt_media",
}
NIBABEL_FILES = {
    "externals/tests/data/example_1.nc": "corrupt_media",
    "gifti/tests/data/ascii.gii": "corrupt_media",
    "gifti/tests/data/ascii_flat_data.gii": "corrupt_media",
    "gifti/tests/data/base64bin.gii": "corrupt_media",
    "gifti/tests/data/external.dat": "corrupt_media",
    "gifti/tests/data/external.gii": "corrupt_media",
    "gifti/tests/data/external.gii.bz2": "unsupported_media",
    "gifti/tests/data/external.gii.gz": "unsupported_media",
    "gifti/tests/data/gzipbase64.gii": "corrupt_media",
    "gifti/tests/data/label.gii": "corrupt_media",
    "gifti/tests/data/rh.aparc.annot.gii": "corrupt_media",
    "gifti/tests/data/rh.shape.curv.gii": "corrupt_media",
    "gifti/tests/data/task.func.gii": "corrupt_media",
    "nicom/tests/data/0.dcm": RENDER,
    "nicom/tests/data/1.dcm": RENDER,
    "nicom/tests/data/ascconv_sample.txt": "corrupt_media",
    "nicom/tests/data/csa2_b0.bin": "corrupt_media",
    "nicom/tests/data/csa2_b1000.bin": "corrupt_media",
    "nicom/tests/data/csa2_zero_len.bin.gz": "unsupported_media",
    "nicom/tests/data/csa_slice_norm.dcm": "corrupt_media",
    "nicom/tests/data/csa_str_1001n_items.bin": "corrupt_media",
    "nicom/tests/data/csa_str_valid.bin": "corrupt_media",
    "nicom/tests/data/decimal_rescale.dcm": RENDER,
    "nicom/tests/data/philips_mprage.dcm.gz": "unsupported_media",
    "nicom/tests/data/siemens_dwi_0.dcm.gz": "unsupported_media",
    "nicom/tests/data/siemens_dwi_1000.dcm.gz": "unsupported_media",
    "nicom/tests/data/slicethickness_empty_string.dcm": RENDER,
    "tests/data/.gitignore": "corrupt_media",
    "tests/data/0.dcm": RENDER,
    "tests/data/1.dcm": RENDER,
    "tests/data/ADC_Map.PAR": "unsupported_media",
    "tests/data/ASL_3D_Multiecho.PAR": "unsupported_media",
    "tests/data/DTI.PAR": "unsupported_media",
    "tests/data/DTIv40.PAR": "unsupported_media",
    "tests/data/NA.PAR": "unsupported_media",
    "tests/data/Phantom_EPI_3mm_cor_20APtrans_15RLrot_SENSE_15_1.PAR": "unsupported_media",
    "tests/data/Phantom_EPI_3mm_cor_SENSE_8_1.PAR": "unsupported_media",
    "tests/data/Phantom_EPI_3mm_sag_15AP_SENSE_13_1.PAR": "unsupported_media",
    "tests/data/Phantom_EPI_3mm_sag_15FH_SENSE_12_1.PAR": "unsupported_media",
    "tests/data/Phantom_EPI_3mm_sag_15RL_SENSE_11_1.PAR": "unsupported_media",
    "tests/data/Phantom_EPI_3mm_sag_SENSE_7_1.PAR": "unsupported_media",
    "tests/data/Phantom_EPI_3mm_tra_-30AP_10RL_20FH_SENSE_14_1.PAR": "unsupported_media",
    "tests/data/Phantom_EPI_3mm_tra_15FH_SENSE_9_1.PAR": "unsupported_media",
    "tests/data/Phantom_EPI_3mm_tra_15RL_SENSE_10_1.PAR": "unsupported_media",
    "tests/data/Phantom_EPI_3mm_tra_SENSE_6_1.PAR": "unsupported_media",
    "tests/data/R11_T2W_TSE.PAR": "unsupported_media",
    "tests/data/README.rst": "corrupt_media",
    "tests/data/T1.PAR": "unsupported_media",
    "tests/data/T1_3echo_mag_real_imag_phase.PAR": "unsupported_media",
    "tests/data/T1_dual_echo.PAR": "unsupported_media",
    "tests/data/T2-interleaved.PAR": "unsupported_media",
    "tests/data/T2.PAR": "unsupported_media",
    "tests/data/T2_-interleaved.PAR": "unsupported_media",
    "tests/data/T2_.PAR": "unsupported_media",
    "tests/data/analyze.hdr": "unsupported_media",
    "tests/data/anatomical.nii": FRAMES,
    "tests/data/bad_attribute+orig.HEAD": "unsupported_media",
    "tests/data/bad_datatype+orig.HEAD": "unsupported_media",
    "tests/data/complex.trk": "corrupt_media",
    "tests/data/complex_big_endian.trk": "corrupt_media",
    "tests/data/empty.tck": "corrupt_media",
    "tests/data/empty.trk": "corrupt_media",
    "tests/data/example4d+orig.BRIK.gz": "unsupported_media",
    "tests/data/example4d+orig.HEAD": "unsupported_media",
    "tests/data/example4d.nii.gz": "unsupported_media",
    "tests/data/example_nifti2.nii.gz": "unsupported_media",
    "tests/data/fieldmap.PAR": "unsupported_media",
    "tests/data/functional.nii": "unsupported_media",
    "tests/data/matlab_nan.tck": "corrupt_media",
    "tests/data/minc1-no-att.mnc": "unsupported_media",
    "tests/data/minc1_1_scale.mnc": "unsupported_media",
    "tests/data/minc1_4d.mnc": "unsupported_media",
    "tests/data/minc2-4d-d.mnc": "unsupported_media",
    "tests/data/minc2-no-att.mnc": "unsupported_media",
    "tests/data/minc2_1_scale.mnc": "unsupported_media",
    "tests/data/minc2_4d.mnc": "unsupported_media",
    "tests/data/minc2_baddim.mnc": "unsupported_media",
    "tests/data/multiline_header_field.tck": "corrupt_media",
    "tests/data/nifti1.hdr": "unsupported_media",
    "tests/data/nifti2.hdr": "unsupported_media",
    "tests/data/no_header_end.tck": "corrupt_media",
    "tests/data/no_header_end_eof.tck": "corrupt_media",
    "tests/data/no_magic_number.tck": "corrupt_media",
    "tests/data/phantom_EPI_asc_CLEAR_2_1.PAR": "unsupported_media",
    "tests/data/phantom_EPI_asc_CLEAR_2_1.REC": "unsupported_media",
    "tests/data/phantom_fake_dualTR.PAR": "unsupported_media",
    "tests/data/phantom_fake_v4.PAR": "unsupported_media",
    "tests/data/phantom_fake_v4_1.PAR": "unsupported_media",
    "tests/data/phantom_truncated.PAR": "unsupported_media",
    "tests/data/phantom_truncated.REC": "unsupported_media",
    "tests/data/phantom_varscale.PAR": "unsupported_media",
    "tests/data/phantom_varscale.REC": "unsupported_media",
    "tests/data/reoriented_anat_moved.nii": FRAMES,
    "tests/data/resample_using_spm.m": "corrupt_media",
    "tests/data/resampled_anat_moved.nii": FRAMES,
    "tests/data/row_major.dconn.nii": "unsupported_media",
    "tests/data/scaled+tlrc.BRIK": "unsupported_media",
    "tests/data/scaled+tlrc.HEAD": "unsupported_media",
    "tests/data/simple.tck": "corrupt_media",
    "tests/data/simple.trk": "corrupt_media",
    "tests/data/simple_big_endian.tck": "corrupt_media",
    "tests/data/small.mnc": "unsupported_media",
    "tests/data/standard.LPS.trk": "corrupt_media",
    "tests/data/standard.nii.gz": FRAMES,
    "tests/data/standard.tck": "corrupt_media",
    "tests/data/standard.trk": "corrupt_media",
    "tests/data/test.mgz": "unsupported_media",
    "tests/data/tiny.mnc": "unsupported_media",
    "tests/data/tinypet.v": "corrupt_media",
    "tests/data/to_canonical.m": "corrupt_media",
    "tests/data/umass_anonymized.PAR": "unsupported_media",
    "tests/data/variant_v4_2_header.PAR": "unsupported_media",
}


def shipped_files() -> dict[str, tuple[Path, Path, str]]:
    """{"<library>/<path>": (root, file, expectation)} of every file the two libraries ship as test data."""
    found = {}
    for library, root, files, table in (
        ("pydicom", PYDICOM_ROOT, sorted(p for p in PYDICOM_ROOT.rglob("*") if p.is_file()), PYDICOM_FILES),
        ("nibabel", NIBABEL_ROOT, sorted(p for folder in NIBABEL_FOLDERS for p in (NIBABEL_ROOT / folder).iterdir()
                                         if p.is_file() and p.suffix not in (".py", ".pyc")), NIBABEL_FILES),
    ):
        used = set()
        for file in files:
            relative = str(file.relative_to(root))
            patterns = [pattern for pattern in table if fnmatch.fnmatchcase(relative, pattern)]
            assert len(patterns) == 1, f"{library}: {relative} is classified {len(patterns)} times (never: add it to the table)"
            used.add(patterns[0])
            found[f"{library}/{relative}"] = (root, file, table[patterns[0]])
        assert not set(table) - used, f"{library}: entries that name no shipped file: {sorted(set(table) - used)}"
    return found


def test_every_shipped_file_renders_right_or_is_refused_on_one_line(tmp_path, tiny_processor):
    files = shipped_files()
    assert len(files) > 230  # both libraries found, with their whole test-data folders
    records, expected = [], []
    for name, (root, file, expectation) in files.items():
        records.append({"id": name, "image": str(file), "conversations": [
            {"from": "human", "value": "<image>\nWhat is shown?"}, {"from": "gpt", "value": "a scan"}]})
        expected.append((name, file, expectation, "image"))
        if expectation == FRAMES:
            records.append({"id": name, "video": str(file), "conversations": [
                {"from": "human", "value": "<video>\nWhat is shown?"}, {"from": "gpt", "value": "a scan"}]})
            expected.append((name, file, expectation, "video"))
    data = tmp_path / "all.json"
    data.write_text(json.dumps(records))
    report = validate_source(LlavaJson(str(data), media_root="/"), tiny_processor)

    bad = {int(b.origin.rsplit("[", 1)[1].rstrip("]")): b for b in report.bad}
    for index, (name, file, expectation, as_what) in enumerate(expected):
        if expectation in (RENDER, FRAMES):
            assert index not in bad, f"{name} as {as_what}: {bad.get(index) and bad[index].line()}"
        else:
            assert index in bad, f"{name}: accepted, expected refused as {expectation}"
            line = bad[index].line()
            assert bad[index].kind == expectation, line
            assert "\n" not in line and str(file) in line and len(line) < 600, line
    frames_noted = sum(1 for _, _, expectation, as_what in expected if expectation == FRAMES and as_what == "image")
    assert report.notes and sum(report.notes.values()) == frames_noted  # every multi-frame image is reported


def reference(file: Path, frames: list[int] | None = None) -> list[np.ndarray]:
    return nifti_slices(file, frames) if file.name.endswith((".nii", ".nii.gz")) else dicom_frames(file, frames)


def frame_count(file: Path) -> int:
    if file.name.endswith((".nii", ".nii.gz")):
        return nibabel.as_closest_canonical(nibabel.load(str(file))).shape[2]
    return int(pydicom.dcmread(str(file), stop_before_pixels=True).get("NumberOfFrames", 1) or 1)


@pytest.mark.parametrize("name", [name for name, (_, _, e) in shipped_files().items() if e in (RENDER, FRAMES)])
def test_rendering_equals_the_libraries_own_within_one_grey_level(name):
    """Within one grey level: the reference and the loader evaluate the same affine maps (modality LUT, window,
    scaling to 0..255) in float64 in different orders, a few units in the last place apart, and a value that lands
    within that of k + 0.5 may round to either neighbour; nothing else may differ."""
    root, file, expectation = shipped_files()[name]
    image = np.asarray(load_image(file)).astype(int)
    expected = reference(file)[0].astype(int)
    assert image.shape == expected.shape and np.abs(image - expected).max() <= 1, name
    if expectation == FRAMES:
        indices = sample_frame_indices(frame_count(file), 4)
        frames = [np.asarray(f).astype(int) for f in load_video(file, 4)]
        for frame, want in zip(frames, reference(file, indices)):
            assert frame.shape == want.shape and np.abs(frame - want.astype(int)).max() <= 1, name
