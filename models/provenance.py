"""Attribution of the development data sets, for every model card derived from them.

The lines are the ones the shared data README asks to keep with any derived model card (CC BY 4.0).
A plain module without heavy imports, so the generator, encoder and reference-classifier exports and the
dataset release cards all quote the same text.
"""

from __future__ import annotations

KERMANY = """- Kermany D., Zhang K., Goldbaum M. (2018), "Labeled Optical Coherence Tomography (OCT) and Chest X-Ray
  Images for Classification", Mendeley Data v2, doi:10.17632/rscbjbr9sj.2 — CC BY 4.0."""
V7_LUNG_MASKS = (
    """- Lung masks: V7 Labs, "COVID-19 X-ray dataset" lung annotations of the Kermany images — CC BY 4.0."""
)
PNEUMONIAMNIST = """- PneumoniaMNIST: Yang J. et al. (2023), "MedMNIST v2", Scientific Data 10:41 — CC BY 4.0."""
DATA_SOURCES = "\n".join((KERMANY, V7_LUNG_MASKS, PNEUMONIAMNIST))


def data_sources_for(source: str) -> str:
    """Attribution lines of the data set a model was trained on (all known ones if unknown)."""
    s = source.lower()
    if "kermany" in s:
        return KERMANY
    if "pneumoniamnist" in s:
        return "\n".join((PNEUMONIAMNIST, KERMANY + " (the source images of PneumoniaMNIST)"))
    if "lung-seg" in s:
        return "\n".join((KERMANY, V7_LUNG_MASKS))
    return DATA_SOURCES
