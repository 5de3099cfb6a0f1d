"""One run of a pipeline: stages as data, papermill execution, resume, records, audit chain, report."""
