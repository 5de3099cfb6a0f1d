"""Output formats (40-export): the export stage and one module per writer, identities, deflate."""
