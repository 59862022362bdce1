"""Parse one PDB/mmCIF file (plain or gzipped) into backbone arrays per protein chain.

Everything downstream (cache, batches, model) only sees :class:`ProteinChain`, so this is
the one place that knows about file formats and their quirks.  Every way a file can be
unusable is reported as a :class:`StructureError` with a short human reason, because a
dataset preparation over thousands of files must skip the bad ones and *say why*, not crash.
"""

from __future__ import annotations

import gzip
import io
import logging
import os
import re
import warnings
import zlib
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterable

import numpy as np

log = logging.getLogger(__name__)

#: Bump whenever the parsing result for the same bytes can change (new residue rules,
#: altloc handling, ...): it is part of the cache key, so old cache entries are re-parsed.
#: 2: coordinates that are not finite or are physically absurd make the file a skip.
#: 3: selenomethionine written as ATOM is kept (it was dropped: false chain breaks); at a
#:    microheterogeneous position the residue name with the most CA occupancy is taken;
#:    a CIF without coordinates is "not a structure file" (was "corrupt mmCIF"); mmCIF is
#:    reduced to model-1 backbone rows like PDB (a side-chain atom written twice was "corrupt").
PARSER_VERSION = 3

#: Largest coordinate magnitude accepted, in Angstrom: PDB's fixed columns (8.3f) cannot even
#: write more, and the largest in the shipped data is ~320.
MAX_ABS_COORD = 9999.999
#: Two CA atoms of consecutive residues closer than this (Angstrom) are the same atom written
#: twice or a placeholder position: a real peptide puts them 2.9 (cis) to 3.8 A apart, and the
#: closest pair in the shipped data (1,000 chains) is 2.7 A.
MIN_CA_CA = 1.0

#: One-letter alphabet; ``aatype`` indexes into it and 20 means "unknown".
RESTYPES = "ACDEFGHIKLMNPQRSTVWY"
UNKNOWN_AATYPE = 20
NUM_AATYPES = 21  # 20 standard + unknown

#: Backbone atoms stored per residue, in this order.
ATOM_NAMES = ("N", "CA", "C", "O")

_THREE_TO_ONE = {
    "ALA": "A", "CYS": "C", "ASP": "D", "GLU": "E", "PHE": "F", "GLY": "G", "HIS": "H",
    "ILE": "I", "LYS": "K", "LEU": "L", "MET": "M", "ASN": "N", "PRO": "P", "GLN": "Q",
    "ARG": "R", "SER": "S", "THR": "T", "VAL": "V", "TRP": "W", "TYR": "Y",
}
# Selenomethionine is chemically a methionine in the chain; keeping it avoids a fake chain
# break in every SeMet-phased crystal structure.  Most files write it as HETATM, some (1EMA,
# 3EK3) as ATOM: both are read as MET.
_HET_AS_STANDARD = {"MSE": "M"}
#: Residue names that can become a residue of a ProteinChain.
_PROTEIN_NAMES = frozenset(_THREE_TO_ONE) | frozenset(_HET_AS_STANDARD)

_PDB_SUFFIXES = (".pdb", ".ent")
_CIF_SUFFIXES = (".cif", ".mmcif")
STRUCTURE_SUFFIXES = _PDB_SUFFIXES + _CIF_SUFFIXES
_GZIP_MAGIC = b"\x1f\x8b"


class StructureError(Exception):
    """A file that cannot yield a protein chain; ``reason`` is short and human-readable."""

    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        self.reason = reason


@dataclass(eq=False)  # identity equality: comparing numpy fields with == is ambiguous
class ProteinChain:
    """Backbone of one protein chain (model 1), the unit the dataset is made of.

    Residues without a CA atom are dropped (they cannot be placed); other missing backbone
    atoms are zero in ``coords`` and False in ``atom_mask``.
    """

    id: str  # "<file stem>_<chain>", e.g. "101M_A"
    source: str  # file name (relative path inside the dataset once prepared)
    chain: str  # author chain id
    sequence: str  # one-letter, file order, CA-bearing residues only
    aatype: np.ndarray  # int8 [L], index into RESTYPES, 20 = unknown
    coords: np.ndarray  # float32 [L, 4, 3], atoms N, CA, C, O
    atom_mask: np.ndarray  # bool [L, 4]
    residue_index: np.ndarray  # int32 [L], author numbering, strictly increasing

    def __len__(self) -> int:
        return int(self.aatype.shape[0])

    @property
    def completeness(self) -> float:
        """Share of residues with N, CA and C: a proxy for a usable backbone."""
        if len(self) == 0:
            return 0.0
        return float(self.atom_mask[:, :3].all(axis=1).mean())


def structure_format(path: str | os.PathLike[str]) -> str | None:
    """``"pdb"``, ``"mmcif"`` or None (unsupported) from the file name, ignoring ``.gz``."""
    name = Path(path).name.lower()
    if name.endswith(".gz"):
        name = name[:-3]
    if name.endswith(_PDB_SUFFIXES):
        return "pdb"
    if name.endswith(_CIF_SUFFIXES):
        return "mmcif"
    return None


def chain_id_prefix(path: str | Path) -> str:
    """File name without ``.gz`` and structure suffix: the prefix of every chain id."""
    name = Path(path).name
    if name.lower().endswith(".gz"):
        name = name[:-3]
    stem, dot, ext = name.rpartition(".")
    return stem if dot and ext else name


def parse_structure(path: str | Path) -> list[ProteinChain]:
    """All protein chains of model 1 of ``path``; raises :class:`StructureError` otherwise."""
    path = Path(path)
    fmt = structure_format(path)
    if fmt is None:
        raise StructureError(
            f"unsupported extension (expected one of {', '.join(STRUCTURE_SUFFIXES)}, optionally .gz)")
    try:
        data = path.read_bytes()
    except IsADirectoryError:
        raise StructureError("unreadable: is a directory") from None
    except FileNotFoundError:
        raise StructureError("unreadable: file not found (dangling link?)") from None
    except OSError as e:
        raise StructureError(f"unreadable: {e.strerror or e}") from None
    return parse_structure_bytes(data, path.name)


def parse_structure_bytes(data: bytes, name: str, id_prefix: str | None = None) -> list[ProteinChain]:
    """Like :func:`parse_structure` for bytes already read (the cache hashes the same bytes)."""
    fmt = structure_format(name)
    if fmt is None:
        raise StructureError("unsupported extension")
    text = _decode(data, name)
    stripped = text.lstrip()
    if not stripped:
        raise StructureError("empty file")
    # Trust the content over the name for the PDB/mmCIF choice: a mislabelled file is common.
    if fmt == "pdb" and stripped.startswith("data_"):
        fmt = "mmcif"
    simple_cif = False
    if fmt == "pdb":
        _check_pdb_truncation(text)
        text, n_records = _backbone_records(text)
        if n_records == 0:
            raise StructureError("not a structure file (no ATOM/HETATM records)")
    else:
        if not _ATOM_SITE_ITEM.search(text):
            raise StructureError(_what_cif_without_atom_site(text))
        simple_cif = _atom_site_is_simple(text)
        if simple_cif:
            text = _cif_backbone_rows(text)
    structure = _run_biopython(fmt, text, simple_cif)
    models = structure.child_list
    if not models:
        if fmt == "pdb":  # atoms existed, but none was a backbone atom
            raise StructureError(_NO_PROTEIN)
        raise StructureError("not a structure file (no atom_site records)")
    prefix = id_prefix if id_prefix is not None else chain_id_prefix(name)
    chains = [c for c in (_chain_arrays(ch, prefix, name) for ch in models[0]) if c is not None]
    if not chains:
        raise StructureError(_NO_PROTEIN)
    for c in chains:
        why = implausible_coordinates(c)
        if why:
            raise StructureError(why)
    return chains


def implausible_coordinates(c: ProteinChain) -> str:
    """Why the chain's coordinates cannot be a real structure, or "" if they can.

    Biopython reads ``nan``, ``inf`` and any magnitude as a float, and the loss silently zeroes
    non-finite atoms, so without this a corrupt file would train as if its atoms sat at the
    origin. Checked on the stored (backbone, present) atoms: non-finite values, values beyond
    :data:`MAX_ABS_COORD`, and consecutive CA atoms closer than :data:`MIN_CA_CA` (which also
    catches a chain whose atoms all sit at one point). One bad chain makes the whole file a skip:
    a file with impossible numbers in it is not trusted for its other chains either.
    """
    xyz = np.where(c.atom_mask[..., None], c.coords, np.float32(0))
    finite = np.isfinite(xyz)
    if not finite.all():
        r, a, k = np.argwhere(~finite)[0]
        return (f"non-finite coordinates: chain {c.chain.strip() or '-'} residue {c.residue_index[r]} "
                f"{ATOM_NAMES[a]} {'xyz'[k]} = {xyz[r, a, k]}")
    big = np.abs(xyz) > MAX_ABS_COORD
    if big.any():
        r, a, k = np.argwhere(big)[0]
        return (f"absurd coordinates: chain {c.chain.strip() or '-'} residue {c.residue_index[r]} "
                f"{ATOM_NAMES[a]} {'xyz'[k]} = {xyz[r, a, k]:.3f} (beyond +-{MAX_ABS_COORD} A)")
    if len(c) > 1:
        ca = c.coords[:, 1].astype(np.float64)
        gap = np.linalg.norm(ca[1:] - ca[:-1], axis=-1)
        close = np.flatnonzero(gap < MIN_CA_CA)
        if close.size:
            i = int(close[0])
            return (f"absurd coordinates: chain {c.chain.strip() or '-'}: the CA atoms of residues "
                    f"{c.residue_index[i]} and {c.residue_index[i + 1]} are {gap[i]:.2f} A apart "
                    f"({close.size} of {gap.size} consecutive pairs closer than {MIN_CA_CA:g} A)")
    return ""


def _decode(data: bytes, name: str) -> str:
    if len(data) == 0:
        raise StructureError("empty file")
    if data[:2] == _GZIP_MAGIC:
        try:
            data = gzip.decompress(data)
        except EOFError:
            raise StructureError("corrupt gzip: truncated") from None
        except (OSError, zlib.error) as e:
            raise StructureError(f"corrupt gzip: {e}") from None
        if not data:
            raise StructureError("empty file (empty gzip stream)")
    elif name.lower().endswith(".gz"):
        raise StructureError("corrupt gzip: not gzip data despite the .gz name")
    if b"\x00" in data[:65536]:
        raise StructureError("not a text structure file (binary data)")
    # Coordinate records are ASCII; latin-1 never fails on odd bytes in REMARK lines.
    return data.decode("latin-1")


def _check_pdb_truncation(text: str) -> None:
    """A PDB file cut inside an ATOM record loses coordinates; Biopython may not notice."""
    if text.endswith(("\n", "\r")):
        return
    last = text.rsplit("\n", 1)[-1]
    if last.startswith(("ATOM", "HETATM")) and len(last.rstrip()) < 54:
        raise StructureError("truncated file: last ATOM record is incomplete")


_NO_PROTEIN = "no protein chain (no standard amino acid with a CA atom)"
_BACKBONE_NAMES = frozenset(ATOM_NAMES)
_WATER_NAMES = frozenset({"HOH", "WAT", "DOD", "H2O"})


def _backbone_records(text: str) -> tuple[str, int]:
    """Model-1 backbone ATOM/HETATM lines only: the same result, ~3x faster to parse.

    Biopython builds an object per atom and that dominates preparation time; side chains,
    waters, ANISOU records and later NMR models never reach a :class:`ProteinChain`.
    Altlocs are resolved per atom, so dropping other atoms does not change the choice.
    Microheterogeneity (two residue names at one position) is resolved here, by
    :func:`_major_names`: Biopython's PDB parser drops the second name when the first has a
    blank-altloc atom (1EJG residue 22 loses its SER), so it must only ever see one name.
    Returns the reduced text and the number of ATOM/HETATM records seen in model 1.
    """
    keep: list[str] = []
    n_records = 0
    residues: list[tuple[str, str, str, str]] = []  # (position, name, atom, occupancy) of protein lines
    for line in text.splitlines():
        rec = line[:6]
        if rec == "ATOM  " or rec == "HETATM":
            n_records += 1
            atom, resname = line[12:16].strip(), line[17:20].strip()
            if atom in _BACKBONE_NAMES and resname not in _WATER_NAMES:
                keep.append(line)
                if resname in _PROTEIN_NAMES:
                    residues.append((line[21:27], resname, atom, line[54:60]))
        elif rec == "ENDMDL" or rec == "END   " or line.rstrip() == "END":
            break  # model 1 only
        elif rec.startswith("TER") or rec.startswith("MODEL"):
            keep.append(line)
    winners = _major_names(residues)
    if winners:
        keep = [line for line in keep
                if line[:6] not in ("ATOM  ", "HETATM") or line[17:20].strip() not in _PROTEIN_NAMES
                or winners.get(line[21:27], line[17:20].strip()) == line[17:20].strip()]
    keep.append("END")
    return "\n".join(keep) + "\n", n_records


def _major_names(atoms: Iterable[tuple[object, str, str, str]]) -> dict[object, str]:
    """The residue name to keep at each microheterogeneous position, from
    ``(position, residue name, atom name, occupancy text)`` of protein atoms in file order.

    The rule (README "Data"): the name whose CA atoms carry the most occupancy, summed over
    that name's alternate locations; ties go to the name listed first.  Then only that
    name's atoms are used (a blank-altloc atom written under the other name is not borrowed).
    Deterministic and independent of the file format, so the PDB and mmCIF files of one
    entry give the same sequence.  Only positions with more than one name are returned.
    """
    names: dict[object, dict[str, float]] = {}
    for pos, name, atom, occ in atoms:
        per_name = names.setdefault(pos, {})
        total = per_name.setdefault(name, 0.0)
        if atom == "CA":
            per_name[name] = total + _occupancy(occ)
    # max() keeps the first of equal values, and dicts keep insertion (= file) order
    return {pos: max(per_name, key=per_name.__getitem__)
            for pos, per_name in names.items() if len(per_name) > 1}


def _occupancy(text: str) -> float:
    """An occupancy field; blank or unknown (``?``, ``.``) counts as full, as Biopython reads it."""
    try:
        return float(text)
    except ValueError:
        return 1.0


_ATOM_SITE_ITEM = re.compile(r"^_atom_site\.", re.MULTILINE)


def _what_cif_without_atom_site(text: str) -> str:
    """The skip reason of a CIF without an ``_atom_site`` table: what the file is instead.

    Valid CIFs of other kinds sit next to structures in real folders (ligand definitions,
    refinement restraints, reflection data); calling them corrupt sends people looking for
    damage that is not there.
    """
    if "_chem_comp_atom." in text:
        what = "a chemical-component or monomer-library CIF"
    elif "_refln." in text or "_refln_" in text:
        what = "a structure-factor (reflection) CIF"
    elif "_atom_site_fract_" in text or "_atom_site_label" in text:
        what = "a small-molecule (core) CIF, not mmCIF"
    else:
        what = "a CIF"
    return f"not a structure file ({what}: no atom_site records)"


def _cif_backbone_rows(text: str) -> str:
    """``text`` with only the atom_site rows that can reach a :class:`ProteinChain`: model 1,
    backbone atom names, no water, and at a microheterogeneous position only the major
    residue name (:func:`_major_names`).  The mmCIF twin of :func:`_backbone_records`.

    Why the same reduction for both formats: the PDB and mmCIF files of one entry must give
    the same chains, and Biopython is stricter on what it is shown than on what we keep (a
    side-chain atom written twice, as in 4GCN's PDB file, made the mmCIF form "corrupt"
    while the PDB form parsed), and building only backbone atoms is several times faster.
    Only for a simple atom_site loop (one whitespace-separated row per line, see
    :func:`_atom_site_is_simple`); other files go to Biopython whole and microheterogeneity
    is resolved on its residues instead.
    """
    lines = text.split("\n")
    columns: list[str] = []
    start = end = -1
    for i, line in enumerate(lines):
        if start < 0:
            if line.startswith("_atom_site."):
                columns.append(line.split()[0][len("_atom_site."):])
            elif columns:
                start = i
        if start >= 0 and (not line.strip() or line.startswith(("#", "loop_", "_", "data_"))):
            end = i
            break
    if start < 0:
        return text
    if end < 0:
        end = len(lines)
    col = {c: k for k, c in enumerate(columns)}
    name_k = col.get("label_comp_id", col.get("auth_comp_id"))
    atom_k = col.get("label_atom_id", col.get("auth_atom_id"))
    chain_k = col.get("auth_asym_id", col.get("label_asym_id"))
    seq_k = col.get("auth_seq_id", col.get("label_seq_id"))
    occ_k, model_k, icode_k = col.get("occupancy"), col.get("pdbx_PDB_model_num"), col.get("pdbx_PDB_ins_code")
    if name_k is None or atom_k is None or chain_k is None or seq_k is None or occ_k is None:
        return text  # the parser names what is missing

    rows = [line.split() for line in lines[start:end]]
    if not rows:
        return text
    first_model = rows[0][model_k] if model_k is not None else ""
    keep = [(line, r) for line, r in zip(lines[start:end], rows)
            if r[atom_k] in _BACKBONE_NAMES and r[name_k] not in _WATER_NAMES
            and (model_k is None or r[model_k] == first_model)]
    if not keep:
        keep = [(lines[start], rows[0])]  # the parser still sees a structure without protein

    def position(row: list[str]) -> tuple[str, ...]:
        return (row[chain_k], row[seq_k], row[icode_k] if icode_k is not None else "")

    winners = _major_names((position(r), r[name_k], r[atom_k], r[occ_k])
                           for _, r in keep if r[name_k] in _PROTEIN_NAMES)
    kept = [line for line, r in keep
            if r[name_k] not in _PROTEIN_NAMES or winners.get(position(r), r[name_k]) == r[name_k]]
    return "\n".join(lines[:start] + kept + lines[end:])


def _run_biopython(fmt: str, text: str, simple_cif: bool) -> Any:  # -> Bio.PDB.Structure.Structure
    # lazy: keeps `import foldhpc.data` light; the modules Bio.PDB re-exports the parsers from
    from Bio.PDB.MMCIFParser import MMCIFParser
    from Bio.PDB.PDBParser import PDBParser
    from Bio.PDB.MMCIFParser import FastMMCIFParser

    if fmt == "mmcif" and simple_cif:
        # FastMMCIFParser reads only the atom_site loop with str.split (3-4x faster than the
        # full tokenizer) and gives identical chains on plain files; anything it chokes on
        # gets a second opinion (and a better error message) from the full parser.
        try:
            return _quiet(FastMMCIFParser(QUIET=True), text)  # type: ignore[no-untyped-call]  # Bio: unannotated
        except Exception:  # noqa: BLE001 - fall through to the full parser
            log.debug("FastMMCIFParser failed, retrying with MMCIFParser", exc_info=True)
    # Bio's parsers are unannotated
    parser = PDBParser(QUIET=True) if fmt == "pdb" else MMCIFParser(QUIET=True)  # type: ignore[no-untyped-call]
    try:
        return _quiet(parser, text)
    except Exception as e:  # Biopython raises many types (ValueError, KeyError, IndexError, ...)
        kind = "PDB" if fmt == "pdb" else "mmCIF"
        if fmt == "mmcif" and isinstance(e, KeyError) and str(e.args[0] if e.args else "").startswith("_"):
            # a well-formed CIF that lacks an item Biopython needs is not damage: say what is missing
            raise StructureError(f"not a structure file (mmCIF without the {e.args[0]} item that "
                                 "atomic coordinates need)") from None
        msg = str(e).strip().splitlines()[0] if str(e).strip() else ""
        msg = f"{type(e).__name__} {msg}".strip() if isinstance(e, KeyError) or not msg else msg
        if fmt == "pdb":  # line numbers refer to the reduced text, not the file
            msg = re.sub(r" at line \d+", "", msg)
        if len(msg) > 120:
            msg = msg[:117] + "..."
        raise StructureError(f"corrupt {kind}: {msg}") from None


def _quiet(parser: Any, text: str) -> Any:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return parser.get_structure("x", io.StringIO(text))


def _atom_site_is_simple(text: str) -> bool:
    """True if every atom_site row splits on whitespace into exactly one token per column.

    That is the one assumption FastMMCIFParser makes; quoted names (nucleic acid ``"O5'"``)
    or multi-line values would silently shift columns, so those files take the slow path.
    """
    n_fields = 0
    in_loop = in_rows = False
    for line in text.splitlines():
        if in_rows:
            if not line.strip() or line.startswith(("#", "loop_", "_", "data_")):
                return True
            if "'" in line or '"' in line or line.startswith(";") or len(line.split()) != n_fields:
                return False
        elif line.startswith("_atom_site."):
            n_fields = n_fields + 1 if in_loop else 0
            if not in_loop:
                return False  # key-value form (a single atom): leave it to the full parser
        elif line.startswith("loop_"):
            in_loop, n_fields = True, 0
        elif n_fields and in_loop:
            in_rows = True
            if "'" in line or '"' in line or len(line.split()) != n_fields:
                return False
        else:
            in_loop = False
    return in_rows


def _chain_arrays(chain: Any, prefix: str, source: str) -> ProteinChain | None:
    letters: list[str] = []
    coords: list[np.ndarray] = []
    masks: list[list[bool]] = []
    numbers: list[int] = []
    for residue in chain:
        if residue.is_disordered() == 2:  # two residue names here that the text pass left
            residue = _major_residue(residue)
        hetflag, resseq, _icode = residue.id
        resname = residue.get_resname()
        if hetflag == " " and resname in _THREE_TO_ONE:
            letter = _THREE_TO_ONE[resname]
        elif resname in _HET_AS_STANDARD and hetflag != "W":  # MSE as HETATM or as ATOM
            letter = _HET_AS_STANDARD[resname]
        else:
            continue  # water, ligand, nucleotide, non-standard residue
        if "CA" not in residue:
            continue
        xyz = np.zeros((4, 3), dtype=np.float32)
        mask = [False] * 4
        for k, atom_name in enumerate(ATOM_NAMES):
            if atom_name in residue:
                xyz[k] = residue[atom_name].get_coord()
                mask[k] = True
        letters.append(letter)
        coords.append(xyz)
        masks.append(mask)
        numbers.append(int(resseq))
    if not letters:
        return None
    sequence = "".join(letters)
    chain_id = str(chain.id)
    return ProteinChain(
        id=f"{prefix}_{chain_id.strip() or '-'}",
        source=source,
        chain=chain_id,
        sequence=sequence,
        aatype=sequence_to_aatype(sequence),
        coords=np.stack(coords).astype(np.float32, copy=False),
        atom_mask=np.asarray(masks, dtype=np.bool_),
        residue_index=strictly_increasing(numbers),
    )


def _major_residue(disordered: Any) -> Any:  # Bio.PDB DisorderedResidue -> Residue
    """The child residue :func:`_major_names` picks (an mmCIF whose atom_site loop is not
    simple enough for the text pass); Biopython itself selects the name read last."""
    children = [r for r in disordered.disordered_get_list() if r.get_resname() in _PROTEIN_NAMES]
    if not children:
        return disordered
    atoms = []
    for r in children:
        for atom in r:
            for a in (atom.disordered_get_list() if atom.is_disordered() else [atom]):
                atoms.append((0, r.get_resname(), a.get_id(), str(a.get_occupancy())))
    winner = _major_names(atoms).get(0, children[0].get_resname())
    return next(r for r in children if r.get_resname() == winner)


def sequence_to_aatype(sequence: str) -> np.ndarray:
    """int8 indices into :data:`RESTYPES`; anything else maps to :data:`UNKNOWN_AATYPE`."""
    lut = np.full(256, UNKNOWN_AATYPE, dtype=np.int8)
    for i, letter in enumerate(RESTYPES):
        lut[ord(letter)] = i
    return lut[np.frombuffer(sequence.encode("ascii", "replace"), dtype=np.uint8)]


def strictly_increasing(numbers: Iterable[int]) -> np.ndarray:
    """Author numbers, bumped just enough to be strictly increasing.

    Insertion codes (100, 100A, 100B, 101) repeat a number; the model uses differences of
    ``residue_index`` as relative positions, so repeats would fuse neighbours.  Real gaps
    (missing residues) are kept; the numbering re-synchronises at the next gap.
    """
    out = np.asarray(list(numbers), dtype=np.int64)
    if out.size > 1:
        # out[i] = max(raw[i], out[i-1] + 1)  <=>  cummax(raw - i) + i
        ramp = np.arange(out.size, dtype=np.int64)
        out = np.maximum.accumulate(out - ramp) + ramp
    return out.astype(np.int32)


def select_chain(
    chains: list[ProteinChain],
    min_length: int,
    max_length: int,
    min_completeness: float,
) -> tuple[ProteinChain | None, str]:
    """The file's primary chain: the longest chain within the length limits that is
    complete enough (first in file order on ties), or None with the reason why not.

    Mirrors the MANIFEST rule so that one file contributes one training example and
    homo-oligomer copies do not count twice.
    """
    if not chains:
        return None, "no protein chain"
    complete = [c for c in chains if c.completeness >= min_completeness]
    if not complete:
        best = max(c.completeness for c in chains)
        return None, f"no chain with backbone completeness >= {min_completeness:g} (best {best:.2f})"
    fitting = [c for c in complete if min_length <= len(c) <= max_length]
    if not fitting:
        lengths = sorted({len(c) for c in complete})
        return None, (f"no chain with {min_length}-{max_length} residues "
                      f"(lengths: {', '.join(map(str, lengths[:5]))}{'...' if len(lengths) > 5 else ''})")
    best_chain = max(fitting, key=len)  # max() keeps the first of equal lengths
    return best_chain, ""


def is_structure_file(path: str | os.PathLike[str]) -> bool:
    """True if the name has a supported structure suffix (optionally ``.gz``)."""
    return structure_format(path) is not None
