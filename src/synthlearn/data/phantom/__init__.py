"""The offline multi-site glioma phantom (PHANTOM.md): ``make_phantom_study`` writes a study in the data
contract; ``generate_case`` makes one case in memory.

Modules: :mod:`.atlas` (MNI152 PV atlas, cached), :mod:`.anatomy` (subject warp), :mod:`.tumour` (labels,
phenotypes, placement, compartments), :mod:`.contrasts` (MRI contrasts and scanner effects), :mod:`.sites`
(site presets), :mod:`.generate` (cases and studies).
"""

from synthlearn.data.phantom.generate import PhantomCase, generate_case, make_phantom_study
from synthlearn.data.phantom.sites import PRESETS, STUDY_PRESETS

__all__ = ["PRESETS", "STUDY_PRESETS", "PhantomCase", "generate_case", "make_phantom_study"]
