"""The paper's Section-3 analyses, each a module with a DataFrame-returning function and a CLI."""
