"""Command-line edges: parse, call the library or the service, format. No logic here."""
