import sys

# nbformat imports jsonschema, which imports rfc3987_syntax when it is installed (jupyterlab
# brings it) and builds a Lark grammar for the "iri" format: 0.8 s of every command's start, for
# a format no notebook schema uses. Without the module jsonschema just skips that format.
sys.modules.setdefault("rfc3987_syntax", None)  # type: ignore[arg-type]

from imaging.cli import exit_now, main  # noqa: E402

if __name__ == "__main__":
    exit_now(main())
