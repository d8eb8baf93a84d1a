"""The data layer: file formats, sources, packing, the streams with exact resume, selection, masking, labelled
data and the evaluation sets. Imports dapt.config, dapt.runtime and dapt.model."""
